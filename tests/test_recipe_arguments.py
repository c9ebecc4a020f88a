"""The recipes read TRL's arguments as TRL's own scripts do. `ModelConfig`'s loading fields — `model_revision`,
`attn_implementation`, `dtype`, and `load_in_4bit` with `bnb_4bit_quant_type`, `use_bnb_nested_quant`,
`bnb_4bit_quant_storage` (`recipes.model_loading`); `load_in_8bit` is refused, not ignored — checked on what was
loaded: the 4-bit layers' quantisation state, the config's attention implementation, the revision handed to
`from_pretrained` for the weights and the tokenizer, the reward artifact's recorded layout and a separate load of it.
`ScriptArguments.dataset_streaming` and `resume_from_checkpoint` (a folder, or `true` for the newest) reach both
trainers. Everything runs in this process on tiny models, one or two steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from trl import ModelConfig, ScriptArguments, TrlParser

from rlhf_ext import PPOConfig, RewardEnsembleConfig
from rlhf_ext.recipes import model_loading

from .conftest import FOUR_BIT_HIDDEN, preference_rows, rlhf_ext_in_this_process

ROOT = Path(__file__).resolve().parents[1]
bnb = pytest.importorskip("bitsandbytes")

# what a user would write in a YAML beside the shipped keys (each differs from what the recipes did before: NF4 with
# double quantisation, sdpa, no revision)
LOADING = {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "use_bnb_nested_quant": False,
           "attn_implementation": "eager", "model_revision": "v1.0"}


def parse(config_cls, settings: dict):
    return TrlParser((ScriptArguments, config_cls, ModelConfig)).parse_dict(settings)


def four_bit_states(model) -> list:
    return [m.weight.quant_state for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def four_bit_storage(model) -> set:
    """The dtypes the packed 4-bit weights are stored in (`bnb_4bit_quant_storage`)."""
    return {m.weight.dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_model_loading_reads_trl_fields_like_trls_scripts():
    _, args, model_args = parse(PPOConfig, {"output_dir": "o", "use_cpu": True, "dtype": "bfloat16",
                                            "model_init_kwargs": {"dtype": "float16", "low_cpu_mem_usage": True},
                                            **LOADING, "bnb_4bit_quant_storage": "bfloat16"})
    qc = model_loading(model_args, args)
    # ModelConfig's fields win over the YAML's own model_init_kwargs, which are kept otherwise
    assert args.model_init_kwargs == {"dtype": "bfloat16", "low_cpu_mem_usage": True, "revision": "v1.0",
                                      "attn_implementation": "eager"}
    assert qc.load_in_4bit and qc.bnb_4bit_quant_type == "fp4" and qc.bnb_4bit_use_double_quant is False
    assert qc.bnb_4bit_compute_dtype == torch.bfloat16 and qc.bnb_4bit_quant_storage == torch.bfloat16
    # the defaults: float32, TRL's "main" revision not passed on, no attention override, full precision
    _, args, model_args = parse(PPOConfig, {"output_dir": "o", "use_cpu": True})
    assert model_loading(model_args, args) is None and args.model_init_kwargs == {"dtype": "float32"}


def test_shipped_4bit_yamls_keep_double_quantisation_as_the_plan_counts_it():
    for path in sorted((ROOT / "recipes" / "configs").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        if not cfg.get("load_in_4bit"):
            continue
        config_cls = PPOConfig if "reward_model_path" in cfg else RewardEnsembleConfig
        _, args, model_args = parse(config_cls, {**cfg, "use_cpu": True, "bf16": False})
        qc = model_loading(model_args, args)
        assert qc.bnb_4bit_quant_type == "nf4" and qc.bnb_4bit_use_double_quant is True, path.name
        assert qc.bnb_4bit_compute_dtype == getattr(torch, cfg.get("dtype", "float32")), path.name


@pytest.mark.parametrize("recipe", ["ppo", "reward_modeling"])
def test_load_in_8bit_is_refused_with_the_fix(tmp_path, recipe, monkeypatch, capsys):
    import importlib

    module = importlib.import_module(f"recipes.{recipe}")
    config_cls = PPOConfig if recipe == "ppo" else RewardEnsembleConfig
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text("{}")  # a reward folder the recipe's first check accepts
    script, args, model_args = parse(config_cls, {"output_dir": str(tmp_path), "use_cpu": True, "load_in_8bit": True,
                                                  "dataset_name": "shipped:sentiment", "dataset_config": "prompts"
                                                  if recipe == "ppo" else "preferences",
                                                  **({"reward_model_path": str(tmp_path / "rm")} if recipe == "ppo"
                                                     else {})})
    with pytest.raises(ValueError, match=r"load_in_8bit.*not supported.*load_in_4bit: true"):
        module.main(script, args, model_args)
    # from the command line: one line and argparse's status 2, before anything loads (was a traceback, status 1)
    name = "ppo" if recipe == "ppo" else "reward"
    status, err = rlhf_ext_in_this_process([name, "--config", f"{name}_smollm2_sentiment", "--load_in_8bit", "true",
                                            "--output_dir", tmp_path / "out"], tmp_path, monkeypatch, capsys)
    assert status == 2 and "Traceback" not in err, err[-2000:]
    assert f"rlhf-ext {name}: error: load_in_8bit: " in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("config_cls", [PPOConfig, RewardEnsembleConfig])
def test_optional_bools_work_as_bare_flags_and_help_names_config(config_cls, capsys):
    """`--gradient_checkpointing` alone (TRL's RewardConfig takes it so; ours, an optional bool, wanted a value) and
    `--bf16` alone mean true; `--bf16 false` still false. `--help` says what `--config` takes (it is read outside
    argparse, so it was missing)."""
    from rlhf_ext.recipes import parse_arguments

    _, args, _, _ = parse_arguments(config_cls, ["--output_dir", "o", "--use_cpu", "--gradient_checkpointing",
                                                 "--bf16", "--max_steps", "1"])
    assert args.gradient_checkpointing is True and args.bf16 is True and args.max_steps == 1
    _, args, _, _ = parse_arguments(config_cls, ["--output_dir", "o", "--use_cpu", "--bf16", "false"])
    assert args.bf16 is False
    with pytest.raises(SystemExit):
        parse_arguments(config_cls, ["--help"])
    assert "--config FILE" in capsys.readouterr().out


@pytest.fixture
def loads(monkeypatch):
    """(class, path, revision) of every from_pretrained call for weights or a tokenizer."""
    calls = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModel, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained

        def spy(*a, _original=original, _cls=cls, **kw):
            calls.append((_cls.__name__, str(a[0]), kw.get("revision")))
            return _original(*a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


def test_model_init_kwargs_as_trls_scripts_fill_them(tmp_path, tiny_path, monkeypatch):
    """TRL's scripts put `trust_remote_code` into `model_init_kwargs` (beside revision, dtype, attention). Both trainers
    load a model by name with it — PPO failed with "got multiple values for keyword argument 'trust_remote_code'" —
    and its weights and tokenizer both follow it, over the config's own `trust_remote_code` (False)."""
    from datasets import Dataset

    from rlhf_ext import PPOTrainer, RewardEnsembleTrainer

    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModel, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained

        def spy(*a, _original=original, _cls=cls, **kw):
            seen.append((_cls.__name__, kw.get("trust_remote_code")))
            return _original(*a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    init = {"trust_remote_code": True, "dtype": "float32", "attn_implementation": "eager"}
    PPOTrainer(tiny_path, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
               train_dataset=Dataset.from_dict({"prompt": ["say something good", "say something nice"]}),
               args=PPOConfig(str(tmp_path / "ppo"), use_cpu=True, max_steps=1, per_device_train_batch_size=2,
                              model_init_kwargs=init))
    RewardEnsembleTrainer(tiny_path, train_dataset=Dataset.from_list(preference_rows(8, 0)),
                          args=RewardEnsembleConfig(str(tmp_path / "rm"), use_cpu=True, ensemble_size=2,
                                                    report_to="none", model_init_kwargs=init))
    assert {"AutoTokenizer", "AutoModel", "AutoModelForCausalLM"} <= {cls for cls, _ in seen}
    assert {trust for _, trust in seen} == {True}, seen


def local_data(folder: Path) -> str:
    """TRL-format preference pairs (train, test) and prompts (train, test) as `<kind>_<split>.jsonl` files."""
    folder.mkdir()
    for split, (n, seed) in {"train": (16, 0), "test": (8, 1)}.items():
        rows = preference_rows(n, seed)
        (folder / f"preferences_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"prompts_{split}.jsonl").write_text("".join(json.dumps({"prompt": r["chosen"][:1]}) + "\n"
                                                               for r in preference_rows(n // 2, seed + 2)))
    return str(folder)


def test_recipes_load_what_model_config_asks(tmp_path, tok, loads):
    """Both recipes, one step each, with fp4 without double quantisation stored in bf16, eager attention and a
    revision."""
    import recipes.ppo as ppo_recipe
    import recipes.reward_modeling as reward_recipe
    from rlhf_ext import load_reward_model
    from rlhf_ext.reward.artifact import read_spec
    from rlhf_ext.testing import save_tiny_model

    base = save_tiny_model(tmp_path / "base", tok, hidden_size=FOUR_BIT_HIDDEN)
    data = local_data(tmp_path / "data")
    common = {"model_name_or_path": base, "dataset_name": data, "use_cpu": True, "max_steps": 1,
              "save_strategy": "no", "report_to": "none", "use_peft": True, "lora_target_modules": ["q_proj", "v_proj"],
              "lora_dropout": 0.0, **LOADING, "bnb_4bit_quant_storage": "bfloat16"}

    reward_out = tmp_path / "rm"
    rm = reward_recipe.main(*parse(RewardEnsembleConfig, {
        **common, "output_dir": str(reward_out), "dataset_config": "preferences", "ensemble_size": 2,
        "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8}))
    ppo = ppo_recipe.main(*parse(PPOConfig, {
        **common, "output_dir": str(tmp_path / "ppo"), "dataset_config": "prompts",
        "reward_model_path": str(reward_out), "per_device_train_batch_size": 4, "max_completion_length": 4,
        "num_ppo_epochs": 1, "monitor_reference_prompts": 4}))

    for name, model in (("reward", rm.model), ("ppo", ppo.model)):
        states = four_bit_states(model)
        assert states and {s.quant_type for s in states} == {"fp4"} and not any(s.nested for s in states), name
        assert four_bit_storage(model) == {torch.bfloat16}, name
        cfg = model.get_base_model().config if hasattr(model, "get_base_model") else model.model.base_model.config
        assert cfg._attn_implementation == "eager", (name, cfg._attn_implementation)
    # the revision reached the weights and the tokenizer of the base, in both recipes (a local folder ignores it)
    base_loads = [(cls, rev) for cls, path, rev in loads if path == base]
    assert {("AutoTokenizer", "v1.0"), ("AutoModel", "v1.0"), ("AutoModelForCausalLM", "v1.0")} <= set(base_loads)
    assert all(rev == "v1.0" for _, rev in base_loads), base_loads
    # the artifact records the layout; PPO hosted its members on its own base; a separate load quantises alike
    assert read_spec(reward_out)["four_bit"] == {"quant_type": "fp4", "double_quant": False,
                                                 "compute_dtype": "float32", "quant_storage": "bfloat16"}
    from rlhf_ext.reward.ensemble import RewardEnsemble

    hosted = [m for m in ppo.rewards.members if isinstance(m, RewardEnsemble)]
    assert hosted and not any(m.owns_base for m in hosted)
    alone = load_reward_model(reward_out)
    states = four_bit_states(alone.model)
    assert states and {s.quant_type for s in states} == {"fp4"} and not any(s.nested for s in states)
    assert four_bit_storage(alone.model) == {torch.bfloat16}


def test_dataset_streaming_reaches_both_trainers(tmp_path, tok, tiny_path, monkeypatch):
    """`dataset_streaming: true` (TRL's ScriptArguments) loads the splits as `IterableDataset`s, as TRL's scripts do:
    the reward trainer trains and evaluates on them as they stream; PPO reads its prompts (train and test) from them."""
    from datasets import IterableDataset

    import recipes.ppo as ppo_recipe
    import recipes.reward_modeling as reward_recipe
    from rlhf_ext import PPOTrainer, RewardEnsembleTrainer

    seen = {}
    for name, cls in (("reward", RewardEnsembleTrainer), ("ppo", PPOTrainer)):
        original = cls.__init__

        def spy(self, *a, _original=original, _name=name, **kw):
            seen[_name] = (type(kw["train_dataset"]), type(kw["eval_dataset"]))
            _original(self, *a, **kw)

        monkeypatch.setattr(cls, "__init__", spy)
    data = local_data(tmp_path / "data")
    common = {"model_name_or_path": tiny_path, "dataset_name": data, "dataset_streaming": True, "use_cpu": True,
              "max_steps": 2, "save_strategy": "no", "report_to": "none"}
    rm = reward_recipe.main(*parse(RewardEnsembleConfig, {**common, "output_dir": str(tmp_path / "rm"),
                                                          "dataset_config": "preferences", "ensemble_size": 2,
                                                          "per_device_train_batch_size": 4}))
    assert rm.state.global_step == 2 and "eval_accuracy" in json.loads((tmp_path / "rm" / "eval_results.json").read_text())
    ppo = ppo_recipe.main(*parse(PPOConfig, {**common, "output_dir": str(tmp_path / "ppo"), "dataset_config": "prompts",
                                             "reward_model_path": str(tmp_path / "rm"), "eval_strategy": "steps",
                                             "eval_steps": 1, "per_device_train_batch_size": 4,
                                             "max_completion_length": 4, "num_ppo_epochs": 1,
                                             "monitor_reference_prompts": 4}))
    assert seen == {"reward": (IterableDataset, IterableDataset), "ppo": (IterableDataset, IterableDataset)}
    assert ppo.state.global_step == 2 and len(ppo.prompts) == 8
    assert any("eval_kl" in h for h in ppo.state.log_history)


def test_killed_recipes_resume_from_the_newest_checkpoint(tmp_path, tiny_path, monkeypatch):
    """`--resume_from_checkpoint true` (or a folder), as TRL's scripts pass it to `train()`: the reward recipe ignored
    it and trained again from scratch. Each recipe stops after its first checkpoint (a shorter run stands in for the
    kill; constant learning rate, so the schedule does not depend on the run's length), then runs again to the end:
    only the steps after the checkpoint run, and the reward model's weights equal an uninterrupted run's exactly."""
    import recipes.ppo as ppo_recipe
    import recipes.reward_modeling as reward_recipe
    from rlhf_ext import PPOTrainer, RewardEnsembleTrainer

    steps = []
    for cls, method in ((RewardEnsembleTrainer, "training_step"), (PPOTrainer, "_iteration")):
        original = getattr(cls, method)

        def spy(self, *a, _original=original, **kw):
            steps.append(type(self).__name__)
            return _original(self, *a, **kw)

        monkeypatch.setattr(cls, method, spy)
    data = local_data(tmp_path / "data")
    reward = {"model_name_or_path": tiny_path, "dataset_name": data, "dataset_config": "preferences", "use_cpu": True,
              "report_to": "none", "ensemble_size": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
              "lr_scheduler_type": "constant", "save_strategy": "steps", "save_steps": 2}
    whole = reward_recipe.main(*parse(RewardEnsembleConfig, {**reward, "output_dir": str(tmp_path / "a"),
                                                             "max_steps": 4}))
    reward_recipe.main(*parse(RewardEnsembleConfig, {**reward, "output_dir": str(tmp_path / "b"), "max_steps": 2}))
    steps.clear()
    resumed = reward_recipe.main(*parse(RewardEnsembleConfig, {**reward, "output_dir": str(tmp_path / "b"),
                                                               "max_steps": 4, "resume_from_checkpoint": "true"}))
    assert steps == ["RewardEnsembleTrainer"] * 2 and resumed.state.global_step == 4
    want, got = whole.model.state_dict(), resumed.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    ppo = {"model_name_or_path": tiny_path, "dataset_name": data, "dataset_config": "prompts", "use_cpu": True,
           "report_to": "none", "output_dir": str(tmp_path / "ppo"), "reward_model_path": str(tmp_path / "a"),
           "per_device_train_batch_size": 4, "max_completion_length": 4, "num_ppo_epochs": 1,
           "monitor_reference_prompts": 4, "save_strategy": "steps", "save_steps": 1}
    ppo_recipe.main(*parse(PPOConfig, {**ppo, "max_steps": 1}))
    steps.clear()
    trainer = ppo_recipe.main(*parse(PPOConfig, {**ppo, "max_steps": 2, "resume_from_checkpoint": "True"}))
    assert steps == ["PPOTrainer"] and trainer.iteration == 2


def test_ctrl_c_stops_the_ppo_recipe_after_the_iteration_with_its_checkpoint(tmp_path, tiny_path):
    """Ctrl-C during `rlhf-ext ppo` (save_strategy 'no': nothing would have been saved): the console script finishes
    the iteration under way, writes it as a checkpoint, says how to resume and exits 130 — one line, no traceback
    (a 25-frame KeyboardInterrupt traceback and every iteration lost before) — and the run resumes from it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import recipes.reward_modeling as reward_recipe

    data = local_data(tmp_path / "data")
    reward_recipe.main(*parse(RewardEnsembleConfig, {
        "model_name_or_path": tiny_path, "dataset_name": data, "dataset_config": "preferences", "use_cpu": True,
        "report_to": "none", "output_dir": str(tmp_path / "rm"), "per_device_train_batch_size": 4, "max_steps": 1}))
    out = tmp_path / "ppo"
    cmd = [str(Path(sys.executable).with_name("rlhf-ext")), "ppo", "--model_name_or_path", tiny_path,
           "--dataset_name", data, "--dataset_config", "prompts", "--use_cpu", "true", "--report_to", "none",
           "--output_dir", str(out), "--reward_model_path", str(tmp_path / "rm"), "--per_device_train_batch_size",
           "4", "--max_completion_length", "4", "--num_ppo_epochs", "1", "--monitor_reference_prompts", "4",
           "--save_strategy", "no", "--max_steps", "100000"]  # not over before the signal
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Ctrl-C's default, as a terminal gives it: a suite run as a background job (`cmd &` in a script) hands its
    # children SIGINT ignored, which training keeps (as a `nohup` job) — the run then never saw the Ctrl-C
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                            cwd=tmp_path, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics, deadline = out / "monitor" / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1) and proc.poll() is None:
        assert time.monotonic() < deadline, "no iteration finished in time"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=240)[1]
    assert proc.returncode == 130 and "Traceback" not in err, (proc.returncode, err[-3000:])
    done = [p.name for p in out.glob("checkpoint-*")]
    assert len(done) == 1 and f"Stopped after iteration {done[0].split('-')[1]}: {done[0]} is saved" in err
    n = int(done[0].split("-")[1])
    resumed = subprocess.run(cmd[:-1] + [str(n + 1), "--resume_from_checkpoint", "true"], capture_output=True,
                             text=True, env=env, cwd=tmp_path, timeout=240)
    assert resumed.returncode == 0 and f"Resuming from {out / done[0]} (iteration {n} of {n + 1})" in resumed.stderr
    iterations = [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()]
    assert iterations == list(range(1, n + 2))  # the interrupted run's iterations, then the one after: none twice


def test_a_large_or_streamed_prompt_set_is_tokenized_under_a_progress_bar(tok, capsys):
    """PPO tokenizes its prompts once at start-up: seconds for tens of thousands (and a streamed set's length is not
    known), so a set of PROGRESS_ROWS or more, or a stream, shows a bar on the main process; a small set, another
    process or `disable_tqdm` does not."""
    from types import SimpleNamespace

    from datasets import Dataset

    from rlhf_ext.data import PROGRESS_ROWS, tokenize_prompts

    def bar(n, streamed=False, **kw):
        args = SimpleNamespace(max_prompt_length=64, prompt_overflow="error", per_device_train_batch_size=1,
                               **{"disable_tqdm": False, "process_index": 0, **kw})
        data = Dataset.from_dict({"prompt": [f"say something good {i % 7}" for i in range(n)]})
        assert len(tokenize_prompts(data.to_iterable_dataset() if streamed else data, tok, args)) == n
        return capsys.readouterr().err

    assert f"Tokenizing prompts:   0%|          | 0/{PROGRESS_ROWS}" in bar(PROGRESS_ROWS)
    assert "Tokenizing prompts: 0prompt" in bar(20, streamed=True)  # no total: a count
    assert "Tokenizing" not in bar(PROGRESS_ROWS - 1)
    assert "Tokenizing" not in bar(PROGRESS_ROWS, disable_tqdm=True)
    assert "Tokenizing" not in bar(PROGRESS_ROWS, process_index=1)
