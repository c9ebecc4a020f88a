"""scripts/gpu_check.py must not rot before a GPU shows up: its --cpu mode runs the same code path (models built
from shapes, the synthetic tokenizer, PPOTrainer with the hard KL controller, the plan's prediction) at tiny sizes."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_ext.testing import tiny_causal_lm

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "cpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(out)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_cpu_mode_json_shape_and_kl_bound(cpu_run):
    data, stdout = cpu_run
    assert data["status"] == "ok" and data["mode"] == "cpu"
    delta = data["delta"]
    assert delta == pytest.approx(0.1)
    names = [c["name"] for c in data["cases"]]
    assert {"tiny-gpt2-fp32", "tiny-llama-fp32"} <= set(names) and any(n.endswith("4bit") for n in names)
    ran = [c for c in data["cases"] if c["status"] == "ok"]
    assert len(ran) >= 2
    for c in ran:
        for key in ("tokens_per_s", "iteration_s", "generation_share", "measured_peak_gib",
                    "planned_peak_allocated_gib", "planned_peak_gib", "ratio"):
            assert isinstance(c[key], float) and math.isfinite(c[key]) and c[key] > 0, (c["name"], key, c[key])
        assert 0 < c["generation_share"] < 1
        assert len(c["iterations"]) == data["iterations_per_case"] == len(c["kl_after_update"])
        assert c["kl_ok"] and all(k <= delta + 1e-6 for k in c["kl_after_update"]), c["kl_after_update"]
        assert c["planned_peak_phase"] in ("generation", "reward scoring", "reference pass", "training step",
                                           "exact-KL check", "monitor")
    assert sum(c["kl_backtracks"] for c in ran) > 0  # the guard really had to act to keep KL ≤ δ
    dtypes = {c["name"]: c.get("compute_dtype") for c in ran}
    assert dtypes.get("tiny-llama-bf16") == "bfloat16" and dtypes["tiny-llama-fp32"] == "float32"
    assert any(c["name"] == "tiny-llama-4bit-gc" and c["gradient_checkpointing"] for c in ran)
    four = next(c for c in data["cases"] if c["name"].endswith("4bit"))
    if four["status"] == "ok":
        assert four["quantized"] is True
    else:
        assert four["status"].startswith("skipped")
    assert "tok/s" in stdout and "tiny-llama-fp32" in stdout


def test_isolated_worker_subprocess(tmp_path):
    """The GPU mode's wrapper: each case in a fresh `--worker` process, its row read back."""
    out = tmp_path / "iso.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--isolate", "--only", "tiny-llama-fp32", "--out",
                        str(out)], env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["cases"]] == ["tiny-llama-fp32"] and data["cases"][0]["kl_ok"]
    assert not list(tmp_path.glob("iso.*.json"))  # the per-case files are cleaned up


def test_missing_dependencies_are_named_with_the_fix(tmp_path, monkeypatch, capsys):
    gc = _module()
    monkeypatch.setitem(gc.DEPENDENCIES, "no_such_module_xyz", ("no-such-module-xyz==1.0", "a test", True))
    out = tmp_path / "missing.json"
    assert gc.main(["--cpu", "--out", str(out)]) == 3
    printed = capsys.readouterr().out
    assert "no_such_module_xyz" in printed and "pip download --no-deps -d shared/wheels" in printed
    assert "--install-wheels" in printed
    assert json.loads(out.read_text())["status"] == "missing dependencies"


def test_synthetic_tokenizer_decodes_every_id():
    gc = _module()
    tok = gc.synthetic_tokenizer(5000)
    assert len(tok) == 5000 and tok.pad_token_id == tok.eos_token_id
    text = tok.decode(list(range(4, 5000)))
    assert text.split()[-1] == "w4999"
    assert len(tok(text=" ".join(gc.prompts(1, 17, 5000)))["input_ids"]) == 17


# What only a GPU run reaches, checked on this CPU with the meta device standing in for the GPU (found by reading the
# CUDA-only paths: no GPU has been lent yet)

def test_a_model_loaded_on_the_cpu_moves_to_the_training_device_before_the_value_head_is_built(tok, monkeypatch):
    """On a GPU, a model loaded by name sits on the CPU; Trainer.__init__ moved only the PeftModel, so the value head
    (built on the model's device, and what PolicyAndValue.device reads) and every rollout stayed on the CPU. The move
    now happens first — except for a bnb-quantised model (bitsandbytes placed it) or one a device_map spread.
    ("meta" stands in for the GPU: this CPU has none.)"""
    from types import SimpleNamespace

    from rlhf_ext.ppo import trainer as ppo_trainer

    args = SimpleNamespace(device=torch.device("meta"), place_model_on_device=True)
    model = tiny_causal_lm(tok)
    assert ppo_trainer.place_on_training_device(model, args)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert not ppo_trainer.place_on_training_device(model, args)  # already there
    spread = tiny_causal_lm(tok)
    spread.hf_device_map = {"model.layers.0": 0, "model.layers.1": 1}
    assert not ppo_trainer.place_on_training_device(spread, args)
    monkeypatch.setattr(ppo_trainer, "is_quantized", lambda m: True)
    assert not ppo_trainer.place_on_training_device(tiny_causal_lm(tok), args)


def test_metrics_over_parts_on_two_devices_reduce_together():
    """The iteration's metric parts live on the accelerator (values, returns, masks) and on the CPU (scores, lengths):
    one torch.stack of both raised "Expected all tensors to be on the same device" at the end of every GPU iteration.
    ("meta" stands in for the GPU.)"""
    from types import SimpleNamespace

    from rlhf_ext.ppo.trainer import PPOTrainer

    seen = []

    def global_sum(t):  # the all-reduce: one tensor, on the training device
        seen.append(t.device.type)
        return torch.tensor([6.0, 3.0, 2.0, 4.0], dtype=torch.float64)

    fake = SimpleNamespace(args=SimpleNamespace(device=torch.device("meta")), _global_sum=global_sum)
    parts = {"value": (torch.ones(3, device="meta"), torch.ones(3, device="meta")),
             "score": (torch.tensor([1.0, 1.0]), torch.ones(4))}
    assert PPOTrainer._global_means(fake, parts) == {"value": 2.0, "score": 0.5}
    assert seen == ["meta"]
