"""Under DDP the logged token statistics are each optimizer step's mean over every process's tokens — the loss the
step's gradient is of (`PPOTrainer._token_share`) — and objective/kl the mean over every kept sequence; they were
the mean of the processes' own means, which differs as soon as the processes keep different numbers of tokens
(responses of different lengths, rewards dropped on one process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")
TOKEN_MEANS = ("loss/policy", "loss/value", "policy/clipfrac", "policy/approx_kl", "val/clipfrac", "policy/entropy")


def test_logged_token_means_and_kl_are_over_the_global_batch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "recipes/accelerate_configs/cpu_2proc.yaml"),
           "--main_process_port", "29691",  # (29690: test_reward_resume.py)
           str(ROOT / "tests" / "metrics_ddp_worker.py"), str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for it0, it1 in zip(*ranks):
        logged = it0["logged"]
        assert {k: v for k, v in logged.items() if not k.startswith("time/")} == \
               {k: v for k, v in it1["logged"].items() if not k.startswith("time/")}
        for key in TOKEN_MEANS:
            s0, s1 = ([s for s in it["steps"] if key in s] for it in (it0, it1))
            assert len(s0) == len(s1) == 4  # 2 epochs × 2 minibatches, the same steps on both processes
            per_step = [(a[key] * a["n"] + b[key] * b["n"]) / (a["n"] + b["n"]) for a, b in zip(s0, s1)]
            assert logged[key] == pytest.approx(sum(per_step) / len(per_step), rel=1e-6, abs=1e-9), key
            assert sum(a["n"] for a in s0) != sum(b["n"] for b in s1)  # the case that tells the two apart
        kl = it0["kl"] + it1["kl"]  # rank 0 kept 5 sequences, rank 1 all 8
        assert (len(it0["kl"]), len(it1["kl"])) == (5, 8)
        assert logged["objective/kl"] == pytest.approx(sum(kl) / len(kl), rel=1e-6, abs=1e-12)
    # the old mean of means differs on this run (a check that the test can tell them apart)
    last0, last1 = ranks[0][-1], ranks[1][-1]
    old_kl = (sum(last0["kl"]) / 5 + sum(last1["kl"]) / 8) / 2
    assert abs(old_kl - last0["logged"]["objective/kl"]) > 1e-4
