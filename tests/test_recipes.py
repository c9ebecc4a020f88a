"""Every shipped recipe config runs as shipped, end to end, through `accelerate launch`.

One test per `recipes/configs/*.yaml` (a new config is covered without editing this file). Each runs its recipe
(the script named on the config header's `Launch:` line) with the accelerate config named there — its CPU twin
where that one is for GPUs — and every setting of the YAML, except:
  * the model: a tiny random model of the same architecture (model type and tied/untied LM head from the shipped
    shape of that model in `rlhf_ext/plan_shapes`), with a word-level tokenizer that keeps the real tokenizer's
    chat template (or its lack: GPT-2) and special tokens; as many layers as the config's `lora_top_layers` needs;
  * a Hub dataset: a small local folder in the same format (`<split>.jsonl`); shipped data stays;
  * output and reward-model paths: in a temporary folder; PPO configs take the artifact of the reward config whose
    `output_dir` their `reward_model_path` names (run once per session, shared with that config's own test);
  * `--max_steps 2`, and `--use_cpu true` where a GPU accelerate config was swapped for its CPU twin (transformers
    refuses bf16 without a GPU unless `use_cpu` is set; accelerate's own `use_cpu` does not reach that check);
  * PPO: the monitor's reference length/EOS measured on 8 prompts (`--monitor_reference_prompts`, default 64: four
    batches of the 7B recipe's 256-token rollouts before the first iteration, twice the two iterations' sampling).
Everything else — 4-bit, bf16, LoRA, ensembles, KL control, shapers, batch sizes, lengths — runs as shipped.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
CONFIGS = sorted((RECIPES / "configs").glob("*.yaml"))
ACCELERATE = Path(sys.executable).with_name("accelerate")
# GPU accelerate configs → the CPU config with the same process layout
CPU_TWIN = {"single_gpu.yaml": "cpu.yaml", "multi_gpu.yaml": "cpu_2proc.yaml"}
OVERRIDES = ["--max_steps", "2"]


# ------------------------------------------------------------------------------------------------- configs
def header(config: Path) -> str:
    lines = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").rstrip("\\ "))
    return " ".join(lines)


def launch_of(config: Path) -> tuple[Path, Path, bool]:
    """(recipe script, accelerate config, swapped) from the header's `Launch:` line: the accelerate config named
    there, or its CPU twin (swapped = True) where it is a GPU config."""
    launch = re.search(r"Launch:\s*accelerate launch (.*?)(?:Hardware:|$)", header(config))
    assert launch, f"{config.name}: the header has no 'Launch: accelerate launch …' line"
    acc = re.search(r"--config_file\s+(\S+)", launch.group(1))
    script = re.search(r"(\S+\.py)\s+--config\s+(\S+)", launch.group(1))
    assert acc and script, f"{config.name}: cannot read the Launch line: {launch.group(1)!r}"
    assert (ROOT / script.group(2)).resolve() == config.resolve(), f"{config.name}: Launch names {script.group(2)}"
    acc_path = ROOT / acc.group(1)
    assert acc_path.is_file() and (ROOT / script.group(1)).is_file(), launch.group(1)
    twin = CPU_TWIN.get(acc_path.name)
    return ROOT / script.group(1), acc_path.with_name(twin or acc_path.name), twin is not None


def settings(config: Path) -> dict:
    return yaml.safe_load(config.read_text())


# ------------------------------------------------------------------------------------------- tiny models
def tokenizer_like(model_type: str):
    """The tiny word-level tokenizer, with the special tokens and chat template of the real model's tokenizer."""
    from rlhf_ext.testing import tiny_tokenizer

    tok = tiny_tokenizer()  # ChatML template, eos = pad = <|im_end|> (SmolLM2)
    if model_type == "gpt2":  # GPT-2: no chat template, <|endoftext|> is bos/eos/unk, no pad token
        tok.chat_template = None
        tok.eos_token = tok.bos_token = "<|endoftext|>"
        tok.pad_token = None
    elif model_type == "qwen2":  # Qwen2.5-Instruct: ChatML, eos <|im_end|>, pad <|endoftext|>
        tok.pad_token = "<|endoftext|>"
    return tok


def build_tiny_model(name: str, out: Path, num_layers: int, four_bit: bool) -> str:
    """A random model of `name`'s architecture (hidden 64 where 4-bit: NF4 needs ≥ 64 inputs per layer, else 32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_ext.plan import load_shape

    shape = load_shape(name)  # offline: the shipped shape of this model (model type, tied head)
    tok = tokenizer_like(shape["model_type"])
    hidden = 64 if four_bit else 32
    cfg = AutoConfig.for_model(
        shape["model_type"], vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=shape["tie_word_embeddings"],
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    assert model.config.model_type == shape["model_type"] and model.config.num_hidden_layers == num_layers
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


# ------------------------------------------------------------------------------------------ local datasets
POS = "good great nice love happy wonderful excellent fun best".split()
NEG = "bad awful terrible hate sad boring worst poor".split()
FILL = "the movie was it and very so quite really just".split()
SUBJECTS = "movie book song film food place day night city dog".split()


def _question(r):
    return f"please write a short review of the {r.choice(SUBJECTS)} ."


def _answer(r, words):
    return " ".join(r.choice(FILL) for _ in range(r.randint(2, 6))) + f" {r.choice(words)} ."


def _post(r):
    return (f"SUBREDDIT: r/{r.choice(SUBJECTS)} TITLE: my {r.choice(SUBJECTS)} POST: "
            + " ".join(r.choice(FILL + SUBJECTS) for _ in range(r.randint(10, 40))) + " TL;DR:")


# Hub id → {split: row maker}: the columns and value types of the real dataset
HUB_STAND_INS = {
    # conversational preference, implicit prompt (the user turn opens chosen and rejected)
    "trl-lib/ultrafeedback_binarized": {split: lambda r: (lambda q: {
        "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": _answer(r, POS)}],
        "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": _answer(r, NEG)}],
        "score_chosen": 8.0, "score_rejected": 4.0})(_question(r)) for split in ("train", "test")},
    # conversational prompt-only
    "trl-lib/ultrafeedback-prompt": {split: lambda r: {"prompt": [{"role": "user", "content": _question(r)}]}
                                     for split in ("train", "test")},
    # prompt / completion text
    "trl-lib/tldr": {split: lambda r: {"prompt": _post(r), "completion": " " + _answer(r, POS)}
                     for split in ("train", "validation", "test")},
    # preference text, explicit prompt
    "trl-lib/tldr-preference": {split: lambda r: {"prompt": _post(r), "chosen": " " + _answer(r, POS),
                                                  "rejected": " " + _answer(r, NEG)} for split in ("train", "validation")},
}
ROWS = {"train": 64, "test": 16, "validation": 16}


def local_dataset(hub_id: str, out: Path) -> str:
    assert hub_id in HUB_STAND_INS, f"No local stand-in for the Hub dataset {hub_id!r}: add one to HUB_STAND_INS."
    out.mkdir(parents=True, exist_ok=True)
    for i, (split, row) in enumerate(HUB_STAND_INS[hub_id].items()):
        r = random.Random(i)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(row(r)) + "\n" for _ in range(ROWS[split])))
    return str(out)


# ------------------------------------------------------------------------------------------------- running
class Runs:
    """Tiny models, datasets and reward artifacts, made once per session."""

    def __init__(self, tmp: Path):
        self.tmp, self.models, self.rewards = tmp, {}, {}

    def model(self, name: str, num_layers: int, four_bit: bool) -> str:
        key = (name, num_layers, four_bit)
        if key not in self.models:
            out = self.tmp / "models" / f"{re.sub(r'[^A-Za-z0-9.]+', '_', name)}-{num_layers}L{'-4bit' if four_bit else ''}"
            self.models[key] = build_tiny_model(name, out, num_layers, four_bit)
        return self.models[key]

    def base_for(self, configs: list[Path]) -> str:
        """One tiny base for a reward config and the PPO config that uses its artifact (they must share it)."""
        s = [settings(c) for c in configs]
        names = {x.get("model_name_or_path") or "smollm2-135m-instruct" for x in s}
        assert len(names) == 1, f"{[c.name for c in configs]} name different base models: {names}"
        layers = max([2] + [x.get("lora_top_layers", 0) + 2 for x in s])  # keep lora_top_layers as shipped
        return self.model(names.pop(), layers, any(x.get("load_in_4bit") for x in s))

    def arguments(self, config: Path, extra: list[str]) -> list[str]:
        """The recipe's command line after `--config`: what this file replaces (see the top), then `extra`."""
        script, _, swapped = launch_of(config)
        s = settings(config)
        args = ["--output_dir", str(self.tmp / "out" / config.stem)]
        if swapped:  # a GPU config's CPU twin: transformers' bf16 check wants use_cpu
            args += ["--use_cpu", "true"]
        if script.name == "ppo.py":
            args += ["--monitor_reference_prompts", "8"]
        name = s.get("dataset_name")
        if name and not name.startswith("shipped:") and not (config.parent / name).exists():  # a Hub id
            args += ["--dataset_name", local_dataset(name, self.tmp / "data" / name.replace("/", "__"))]
        return [*args, *extra, *OVERRIDES]

    def run(self, config: Path, extra: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
        script, acc, _ = launch_of(config)
        out = self.tmp / "out" / config.stem
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}
        cmd = [str(ACCELERATE), "launch", "--config_file", str(acc), str(script), "--config", str(config),
               *self.arguments(config, extra)]
        r = subprocess.run(cmd, cwd=self.tmp, env=env, capture_output=True, text=True, timeout=timeout)
        r.output_dir = out if "--output_dir" not in extra else Path(extra[extra.index("--output_dir") + 1])
        assert r.returncode == 0, f"{config.name} exited {r.returncode}:\n{' '.join(cmd)}\n{r.stderr[-6000:]}"
        return r

    def reward(self, config: Path):
        """The reward config's run (its artifact), once per session; a failure is reported once, then referred to."""
        if config not in self.rewards:
            base = self.base_for([config] + users_of(config))
            try:
                self.rewards[config] = self.run(config, ["--model_name_or_path", base])
            except AssertionError as e:
                self.rewards[config] = e
                raise
        if isinstance(self.rewards[config], AssertionError):
            pytest.fail(f"{config.name} (the reward artifact) failed earlier in this session: "
                        f"{str(self.rewards[config])[-3000:]}")
        return self.rewards[config]


def users_of(reward_config: Path) -> list[Path]:
    out = settings(reward_config).get("output_dir")
    return [c for c in CONFIGS if settings(c).get("reward_model_path") == out]


def reward_config_for(ppo_config: Path) -> Path:
    want = settings(ppo_config).get("reward_model_path")
    found = [c for c in CONFIGS if c != ppo_config and settings(c).get("output_dir") == want]
    assert len(found) == 1, f"{ppo_config.name}: reward_model_path {want!r} is the output_dir of {found} (want one)"
    return found[0]


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("recipes"))


def _check_reward_artifact(path: Path, config: dict):
    from rlhf_ext.integrity import verify_manifest
    from rlhf_ext.reward.artifact import read_spec

    assert (path / "manifest.json").is_file() and (path / "heads.safetensors").is_file()
    verify_manifest(path, "rerun", required=("heads.safetensors",))
    spec = read_spec(path)
    assert spec["ensemble_size"] == config.get("ensemble_size", 1)
    assert spec["load_in_4bit"] == bool(config.get("load_in_4bit"))
    assert spec["normalization"] and len(spec["normalization"]["mean"]) == spec["ensemble_size"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_recipe_runs_as_shipped(runs, config):
    script, _, _ = launch_of(config)
    s = settings(config)
    if script.name == "reward_modeling.py":
        r = runs.reward(config)
        _check_reward_artifact(r.output_dir, s)
    elif script.name == "ppo.py":
        rm_config = reward_config_for(config)
        rm = runs.reward(rm_config)
        base = runs.base_for([rm_config, config])
        r = runs.run(config, ["--model_name_or_path", base, "--reward_model_path", str(rm.output_dir)])
        out = r.output_dir
        for f in ("adapter_model.safetensors", "adapter_config.json", "manifest.json"):
            assert (out / f).is_file(), f"{config.name}: {f} missing from {sorted(p.name for p in out.iterdir())}"
        assert json.loads((out / "adapter_config.json").read_text())["r"] == s.get("lora_r", 16)
    else:
        pytest.fail(f"{config.name}: no check for recipe {script.name}")


def test_the_7b_ppo_recipe_runs_on_a_t4_with_the_overrides_its_header_gives(runs):
    """recipes/configs/ppo_7b_qlora.yaml's header (and the README's Precision section) tell a GPU before Ampere to add
    `--dtype float16 --bf16 false --fp16 true --per_device_train_batch_size 12`: the 4-bit base then computes in fp16
    and every pass runs under fp16 autocast with the loss scaler. Those overrides, as given, run the recipe."""
    config = RECIPES / "configs" / "ppo_7b_qlora.yaml"
    header = config.read_text()
    overrides = ["--dtype", "float16", "--bf16", "false", "--fp16", "true", "--per_device_train_batch_size", "12"]
    assert " ".join(overrides) in " ".join(line.lstrip("# ") for line in header.splitlines())
    rm_config = reward_config_for(config)
    rm = runs.reward(rm_config)
    base = runs.base_for([rm_config, config])
    out = runs.tmp / "out" / "t4"
    r = runs.run(config, ["--model_name_or_path", base, "--reward_model_path", str(rm.output_dir), *overrides,
                          "--output_dir", str(out)])
    assert (out / "adapter_model.safetensors").is_file(), r.stdout[-3000:]
    assert "'optim/loss_scale'" in r.stdout, r.stdout[-3000:]  # a scaler: the passes computed in fp16


def test_ppo_recipe_evaluates_and_rotates_checkpoints(runs, monkeypatch, capsys):
    """TrainingArguments given on the command line reach the PPO run: `--eval_strategy steps` samples the dataset's
    test split each iteration (eval_* metrics, as TRL's recipes pass `dataset_test_split`), `--save_total_limit 1`
    keeps only the newest checkpoint. (A smaller batch and shorter completions than shipped: what is tested here is
    the command line reaching the run, and the shipped settings run in test_recipe_runs_as_shipped. The recipe's own
    `__main__` path, `recipes.run`, in this process: the launcher is what the test above covers.)"""
    import recipes.ppo as ppo_recipe
    from recipes import run
    from rlhf_ext import PPOConfig

    config = RECIPES / "configs" / "ppo_smollm2_sentiment.yaml"
    rm_config = reward_config_for(config)
    rm = runs.reward(rm_config)
    base = runs.base_for([rm_config, config])
    monkeypatch.chdir(runs.tmp)
    capsys.readouterr()
    run(ppo_recipe.main, PPOConfig, ["--config", str(config), *runs.arguments(config, [
        "--model_name_or_path", base, "--reward_model_path", str(rm.output_dir),
        "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
        "--save_total_limit", "1", "--per_device_train_batch_size", "8", "--max_completion_length", "16",
        "--output_dir", str(runs.tmp / "out" / "eval")])])
    evals = [line for line in capsys.readouterr().out.splitlines() if "'eval_kl'" in line]
    assert len(evals) == 2, evals
    assert sorted(p.name for p in (runs.tmp / "out" / "eval").glob("checkpoint-*")) == ["checkpoint-2"]
