"""The reward recipe under DeepSpeed ZeRO-2 (recipes/accelerate_configs/deepspeed_zero2.yaml) on CPU: 2 processes,
gloo (DeepSpeed picks its CPU accelerator where it finds no GPU; its first launch compiles its shared-memory collective). What a user
expects of ZeRO-2: the same training as data parallel (cpu_2proc.yaml's DDP) to float rounding — with bootstrap
weights, K adapters and gradient checkpointing on, as reward_7b_qlora.yaml trains — a saved artifact our loader
loads, and a resume from a checkpoint that ends where the uninterrupted run ends. Skipped where deepspeed is not
installed (it is not a dependency: `pip install deepspeed`). The first DeepSpeed launch on a machine also compiles
DeepSpeed's shared-memory collective (~30 s, cached in ~/.cache/torch_extensions)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

DEEPSPEED = importlib.util.find_spec("deepspeed")
pytestmark = pytest.mark.skipif(DEEPSPEED is None, reason="deepspeed is not installed (pip install deepspeed)")

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
ACCELERATE = Path(sys.executable).with_name("accelerate")
STEPS = 6
# the 7B reward recipe's member layout, checkpointing and gradient accumulation on a tiny model (accumulation: a
# DeepSpeed config that fixes gradient_accumulation_steps refuses any other in the training config);
# length_decorrelation_coef 0: its |corr| has a kink at 0, and with a fresh model's near-constant rewards rounding
# alone can flip a member's gradient there
SETTINGS = ["--heads_only", "false", "--cache_frozen_layers", "false", "--lora_top_layers", "0",
            "--ensemble_size", "2", "--ensemble_mode", "adapters", "--gradient_checkpointing", "true",
            "--length_decorrelation_coef", "0", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "2",
            "--max_steps", str(STEPS),
            "--logging_steps", "1", "--normalization_samples", "32", "--save_strategy", "steps", "--save_steps", "3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(out: Path) -> str:
    """Conversational preference pairs in the tiny tokenizer's words: a positive answer over a negative one."""
    import random

    pos = "good great nice love happy wonderful excellent fun best".split()
    neg = "bad awful terrible hate sad boring worst poor".split()
    fill = "the movie was it and very so quite really just".split()
    subjects = "movie book song film food place day night city dog".split()
    out.mkdir(parents=True)
    for split, seed, n in (("train", 0, 64), ("test", 1, 16)):
        r = random.Random(seed)

        def answer(words):
            return " ".join(r.choice(fill) for _ in range(r.randint(2, 6))) + f" {r.choice(words)} ."

        rows = [{"prompt": [{"role": "user", "content": f"please write a short review of the {r.choice(subjects)} ."}],
                 "chosen": [{"role": "assistant", "content": answer(pos)}],
                 "rejected": [{"role": "assistant", "content": answer(neg)}]} for _ in range(n)]
        (out / f"preferences_{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    return str(out)


def _recipe(accelerate_config: Path, out: Path, base: str, data: str, *extra: str) -> subprocess.CompletedProcess:
    """The reward recipe as a user launches it, under `accelerate_config`, writing into `out`."""
    path = [str(ROOT), str(Path(DEEPSPEED.origin).parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRL_EXPERIMENTAL_SILENCE": "1"}
    cmd = [str(ACCELERATE), "launch", "--config_file", str(accelerate_config), "--main_process_port", str(_free_port()),
           str(RECIPES / "reward_modeling.py"), "--config", str(RECIPES / "configs" / "reward_smollm2_sentiment.yaml"),
           "--model_name_or_path", base, "--dataset_name", data, "--output_dir", str(out), *SETTINGS, *extra]
    return subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)


def _launch(accelerate_config: Path, out: Path, base: str, data: str, *extra: str) -> list[float]:
    """`_recipe`, which must succeed; → the logged training losses."""
    r = _recipe(accelerate_config, out, base, data, *extra)
    assert r.returncode == 0, f"{' '.join(r.args)}\n{r.stderr[-6000:]}"
    return [float(ast.literal_eval(m)["loss"]) for m in re.findall(r"\{'loss'.*?\}", r.stdout + r.stderr)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tok):
    from rlhf_ext.testing import save_tiny_model

    tmp = tmp_path_factory.mktemp("deepspeed")
    base, data = save_tiny_model(tmp / "base", tok, num_layers=3), _data(tmp / "data")
    zero2 = tmp / "zero2.yaml"  # the shipped config with fp32 (bf16: test_the_shipped_config_runs_in_bf16)
    zero2.write_text((RECIPES / "accelerate_configs" / "deepspeed_zero2.yaml").read_text()
                     .replace("mixed_precision: bf16", 'mixed_precision: "no"'))
    ddp = RECIPES / "accelerate_configs" / "cpu_2proc.yaml"
    losses = {"zero2": _launch(zero2, tmp / "zero2", base, data), "ddp": _launch(ddp, tmp / "ddp", base, data)}
    resumed = tmp / "resumed"  # a copy of the ZeRO-2 run's checkpoint-3, resumed to the end
    resumed.mkdir()
    subprocess.run(["cp", "-r", str(tmp / "zero2" / "checkpoint-3"), str(resumed)], check=True)
    losses["resumed"] = _launch(zero2, resumed, base, data, "--resume_from_checkpoint", "true")
    return tmp, losses, base, data


def _weights(folder: Path) -> dict:
    files = [folder / "heads.safetensors", *sorted((folder / "adapters").glob("*"))]
    return {f"{f.relative_to(folder)}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def _scores(folder: Path, data: str) -> torch.Tensor:
    from rlhf_ext.reward.artifact import load_reward_model

    rows = [json.loads(line) for line in open(Path(data) / "preferences_test.jsonl")]
    rm = load_reward_model(folder)
    prompts = [r["prompt"] for r in rows]
    return torch.cat([rm.score_texts(prompts, [r["chosen"] for r in rows]),
                      rm.score_texts(prompts, [r["rejected"] for r in rows])])


def test_zero2_trains_as_ddp_does(runs):
    tmp, losses, _, data = runs
    # ZeRO-2 did shard: one optimizer partition per process in DeepSpeed's checkpoint
    step = tmp / "zero2" / "checkpoint-3" / "global_step3"
    shards = sorted(p.name for p in step.glob("zero_pp_rank_*_optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert len(losses["zero2"]) == STEPS and losses["zero2"][-1] < losses["zero2"][0] - 0.005, losses["zero2"]
    assert losses["zero2"] == pytest.approx(losses["ddp"], abs=1e-4)
    a, b = _weights(tmp / "zero2"), _weights(tmp / "ddp")
    assert a.keys() == b.keys() and len(a) > 2
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)
    assert moved > 1e-3  # the adapters trained
    sa, sb = _scores(tmp / "zero2", data), _scores(tmp / "ddp", data)
    assert sa.shape == (32, 2) and torch.allclose(sa, sb, atol=1e-5)
    spec = json.loads((tmp / "zero2" / "rlhf_ext_reward.json").read_text())
    assert spec["dtype"] == "float32" and spec["mode"] == "adapters"


def test_zero2_resumes_where_it_stopped(runs):
    tmp, losses, _, _ = runs
    assert losses["resumed"] == pytest.approx(losses["zero2"][3:], abs=1e-6)
    a, b = _weights(tmp / "resumed"), _weights(tmp / "zero2")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_the_shipped_config_runs_in_bf16(runs):
    """deepspeed_zero2.yaml as shipped (mixed_precision bf16; `--bf16 true` on CPU, where transformers leaves it off):
    DeepSpeed casts the whole model, score heads included, to bf16 and runs no autocast. It trains, and its scores
    are the fp32 run's to bf16 rounding of the weights."""
    tmp, losses, base, data = runs
    out = tmp / "bf16"
    bf16 = _launch(RECIPES / "accelerate_configs" / "deepspeed_zero2.yaml", out, base, data, "--bf16", "true",
                   "--save_strategy", "no")
    assert bf16 == pytest.approx(losses["zero2"], abs=2e-3)
    assert json.loads((out / "rlhf_ext_reward.json").read_text())["dtype"] == "float32"  # the base as loaded
    s, ref = _scores(out, data), _scores(tmp / "zero2", data)
    assert float((s - ref).abs().max()) < 0.1 * float(ref.abs().max())


def test_checkpoints_leave_the_frozen_base_out(runs):
    """As transformers' DeepSpeed checkpoint of a PeftModel (`exclude_frozen_parameters`): the module state holds what
    trains (adapters, heads), not the frozen base again in every checkpoint-N."""
    tmp, _, _, _ = runs
    state = torch.load(tmp / "zero2" / "checkpoint-3" / "global_step3" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)["module"]
    assert state and all("lora_" in k or k.startswith("heads.") for k in state), sorted(state)[:4]


def test_a_4bit_base_resumes(tmp_path, tok):
    """reward_7b_qlora's layout (4-bit base) under ZeRO-2, resumed from a checkpoint: DeepSpeed loaded the module
    state strictly, and a 4-bit base's quantisation state (absmax, quant_map…) was refused as unexpected keys."""
    from rlhf_ext.testing import save_tiny_model

    base = save_tiny_model(tmp_path / "base", tok, num_layers=2, hidden_size=64)  # NF4: ≥ 64 inputs per layer
    data = _data(tmp_path / "data")
    zero2 = tmp_path / "zero2.yaml"
    zero2.write_text((RECIPES / "accelerate_configs" / "deepspeed_zero2.yaml").read_text()
                     .replace("mixed_precision: bf16", 'mixed_precision: "no"'))
    steps = ["--max_steps", "4", "--save_steps", "2", "--load_in_4bit", "true"]
    full = _launch(zero2, tmp_path / "full", base, data, *steps)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    subprocess.run(["cp", "-r", str(tmp_path / "full" / "checkpoint-2"), str(resumed)], check=True)
    assert _launch(zero2, resumed, base, data, *steps, "--resume_from_checkpoint", "true") == \
        pytest.approx(full[2:], abs=1e-6)


def test_no_cpu_accelerator_warning_outside_deepspeed(monkeypatch):
    """accelerate imports deepspeed wherever it is installed (every trainer's unwrap_model), and DeepSpeed logged
    "Setting accelerator to CPU. If you have GPU …, we were unable to detect it" in every CPU run — PPO included. Kept
    where DeepSpeed runs (accelerate launch with a DeepSpeed config sets ACCELERATE_USE_DEEPSPEED)."""
    import logging

    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_DEEPSPEED"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    code = ("import rlhf_ext, torch; from accelerate import Accelerator; "
            "Accelerator(cpu=True).unwrap_model(torch.nn.Linear(1, 1)); import sys; assert 'deepspeed' in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Setting accelerator to CPU" not in r.stdout + r.stderr, r.stdout + r.stderr
    record = logging.LogRecord("DeepSpeed", logging.WARNING, "real_accelerator.py", 213, "Setting accelerator to CPU. "
                               "If you have GPU or other accelerator, we were unable to detect it.", None, None)
    shown = lambda: all(f.filter(record) for f in logging.getLogger("DeepSpeed").filters)  # noqa: E731
    assert not shown()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert shown()


def test_a_resume_with_other_settings_names_them(runs, tmp_path):
    """DeepSpeed resumes from its own files, past our checkpoint check: a resume with another ensemble_size failed on
    "The ZeRO checkpoint parameter-alignment layout does not match …", naming a setting the user never set."""
    tmp, _, base, data = runs
    subprocess.run(["cp", "-r", str(tmp / "zero2" / "checkpoint-3"), str(tmp_path)], check=True)
    r = _recipe(tmp / "zero2.yaml", tmp_path, base, data, "--ensemble_size", "3", "--resume_from_checkpoint", "true")
    assert r.returncode != 0 and "was saved with members" in r.stderr, r.stderr[-3000:]
