"""Data parallel through accelerate: 2 CPU processes (gloo) launched with `accelerate launch` and
recipes/accelerate_configs/cpu_2proc.yaml. What a user expects data parallelism to mean: each process trains on
a disjoint half of the batch, the adapters stay identical on both ranks, the KL guard holds on every iteration, and
the result equals one process training on the whole batch (within float tolerance)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")


def _run(out, mode, *extra, world):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    worker = [str(ROOT / "tests" / "ddp_worker.py"), str(out), mode, "8", *extra]
    if world == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "recipes/accelerate_configs/cpu_2proc.yaml"),
               "--main_process_port", str(29640 + (mode == "reward")), *worker]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return [(json.loads((out / f"info_w{world}_r{i}.json").read_text()),
             load_file(str(out / f"params_w{world}_r{i}.safetensors"))) for i in range(world)]


def _close(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, worst
    return worst


@pytest.mark.parametrize("mode", ["ppo", "reward"])
def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path, tok, mode):
    extra = []
    if mode == "reward":
        from rlhf_ext.testing import save_tiny_model

        extra = [save_tiny_model(tmp_path / "base", tok)]
    (i1, p1), = _run(tmp_path, mode, *extra, world=1)
    (ia, pa), (ib, pb) = _run(tmp_path, mode, *extra, world=2)
    assert ia["world"] == ib["world"] == 2 and ia["wrapped"] == "DistributedDataParallel"
    _close(pa, pb, 0.0)  # the same adapters on both ranks, bit for bit
    if mode == "ppo":
        assert not set(ia["first_batch"]) & set(ib["first_batch"])  # disjoint halves ...
        assert sorted(ia["first_batch"] + ib["first_batch"]) == sorted(i1["first_batch"])  # ... of the same batch
        assert ia["kl_after"] == ib["kl_after"] and all(k <= 0.005 + 1e-6 for k in ia["kl_after"])
        assert ia["backtracks"] > 0  # the guard acted, identically on both ranks
        assert ia["kl_after"] == pytest.approx(i1["kl_after"], abs=1e-4)
    else:
        assert not set(ia["pairs"]) & set(ib["pairs"]) and sorted(ia["pairs"] + ib["pairs"]) == sorted(i1["pairs"])
    moved = max(float(v.abs().max()) for k, v in p1.items() if "lora_B" in k)
    assert moved > 1e-3
    _close(pa, p1, 1e-4 * max(1.0, moved))
