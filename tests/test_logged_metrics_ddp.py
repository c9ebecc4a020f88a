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


# -- the reward trainer ------------------------------------------------------------------------------------------
REWARD_WORKER = '''
import json, sys
import torch
torch.set_num_threads(1)
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer
from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer
from rlhf_ext.rl_math import pearson
from tests.conftest import preference_rows
from tests.test_trl_parity import ptok

out, path = sys.argv[1], sys.argv[2]
common = dict(max_steps=2, per_device_train_batch_size=3, gradient_accumulation_steps=2, logging_steps=1,
              per_device_eval_batch_size=4, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
              disable_tqdm=True, seed=0, gradient_checkpointing=False, learning_rate=1e-3,
              center_rewards_coefficient=0.01)
train, evals = Dataset.from_list(preference_rows(24, 0)), Dataset.from_list(preference_rows(13, 1))
result = {}
for name in ("trl", "ours", "heads2"):
    model = AutoModelForSequenceClassification.from_pretrained(path)
    if name == "trl":
        tr = RewardTrainer(model, args=RewardConfig(out + "/" + name, **common), train_dataset=train,
                           eval_dataset=evals, processing_class=ptok())
    else:
        K = 1 if name == "ours" else 2
        cfg = RewardEnsembleConfig(out + "/" + name, ensemble_size=K, normalization_samples=4, **common)
        tr = RewardEnsembleTrainer(model, args=cfg, train_dataset=train, eval_dataset=evals, processing_class=ptok(),
                                   peft_config=LoraConfig(r=4, target_modules=["q_proj"]) if K > 1 else None)
    tr.train()
    ev = tr.evaluate()
    whole = {}
    if name == "heads2":  # the whole set in one batch, on one process: every pair once
        ens = tr.accelerator.unwrap_model(tr.model).eval()
        batch = tr.data_collator([tr.eval_dataset[i] for i in range(len(tr.eval_dataset))])
        with torch.no_grad():
            r = ens(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).float()
        d = r[:13] - r[13:]
        whole = {"eval_accuracy_ensemble": (d.mean(-1) > 0).float().mean().item(),
                 "eval_accuracy_member_1": (d[:, 1] > 0).float().mean().item(),
                 "eval_ensemble_disagreement": r.std(-1).mean().item(),
                 "eval_length_pearson": pearson(r.mean(-1), batch["response_length"]).item()}
    drop = lambda h: {k: v for k, v in h.items() if "runtime" not in k and "per_second" not in k}
    result[name] = {"history": [drop(h) for h in tr.state.log_history], "evaluate": drop(ev), "whole": whole}
json.dump(result, open(f"{out}/rank{tr.accelerator.process_index}.json", "w"))
'''


def test_reward_trainer_metrics_are_trls_and_global_under_ddp(tmp_path):
    """Two processes, an eval set (13 pairs, batches of 4) that does not divide over them: every logged key is the
    same on both ranks and, with one member, the same as trl.RewardTrainer's (total_flos included: ours logged 0);
    the whole-set keys of an ensemble count every eval pair once (accelerate fills the last batches with pairs from
    the start of the set)."""
    from tests.test_trl_parity import ptok

    import torch
    from transformers import LlamaForSequenceClassification

    from rlhf_ext.testing import tiny_config

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_config(ptok(), num_labels=1))
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path / "rm")
    (tmp_path / "worker.py").write_text(REWARD_WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "recipes/accelerate_configs/cpu_2proc.yaml"),
           "--main_process_port", "29692", str(tmp_path / "worker.py"), str(tmp_path), str(tmp_path / "rm")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0] == ranks[1]
    theirs, ours, ens = (ranks[0][n] for n in ("trl", "ours", "heads2"))
    assert len(theirs["history"]) == len(ours["history"]) == 4  # 2 steps, the run's summary, the evaluate()
    for t, o in [*zip(theirs["history"], ours["history"]), (theirs["evaluate"], ours["evaluate"])]:
        assert set(t) <= set(o)
        for key, value in t.items():
            assert o[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert theirs["history"][2]["total_flos"] > 0
    for key, value in ens["whole"].items():
        assert ens["evaluate"][key] == pytest.approx(value, abs=1e-5), key
