"""The human-in-the-loop cycle end to end on tiny models: PPO on a length-biased reward model raises the monitor's
alarm and queues pairs → a person decides (here: scripted through the same queue API the page uses) → the reward
model is retrained on the original data plus the decisions → PPO resumes from its checkpoint with the new one."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import PPOConfig, PPOTrainer, RewardEnsembleConfig, RewardEnsembleTrainer, load_reward_model
from rlhf_ext.models import load_model
from rlhf_ext.monitor.queue import ReviewQueue

from .conftest import preference_rows
from .test_monitor import eos_prone_model


def _reward_model(out, base, tok, data, extra=None):
    args = RewardEnsembleConfig(str(out), ensemble_size=2, max_steps=12, per_device_train_batch_size=16,
                                learning_rate=5e-3, report_to="none", save_strategy="no", use_cpu=True,
                                disable_tqdm=True, normalization_samples=32, extra_preferences=extra)
    tr = RewardEnsembleTrainer(base, args=args, train_dataset=data, processing_class=tok,  # + extra_preferences
                               peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    tr.train()
    tr.save_model(str(out))
    return out


def test_train_alarm_review_retrain_resume(tmp_path, tok):
    base = str(tmp_path / "base")
    eos_prone_model(tok).save_pretrained(base)
    tok.save_pretrained(base)
    # a length-biased preference set: the longer response always "wins"
    rows = []
    for r in preference_rows(96, 0, conversational=False):
        long, short = r["chosen"] + " and the movie was very very so good", r["rejected"]
        rows.append({"prompt": r["prompt"], "chosen": long, "rejected": short})
    data = Dataset.from_list(rows)
    rm1 = _reward_model(tmp_path / "rm1", base, tok, data)

    prompts = Dataset.from_dict({"prompt": [f"write a short review of the {w} ." for w in "movie book song film".split() * 8]})
    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=16, max_steps=4, learning_rate=5e-2,
                     max_completion_length=12, kl_controller="fixed", init_kl_coef=0.0, use_cpu=True,
                     save_strategy="steps", save_steps=2, disable_tqdm=True, logging_steps=1000, seed=0,
                     # the loop is under test, not the alarm's noise gate (test_detector_rates): 16 samples, z = 0
                     monitor_detectors=[{"name": "length_correlation", "threshold": 0.3, "action": "queue", "z": 0}],
                     monitor_cooldown=1)
    ppo = PPOTrainer(load_model(base, "causal"), reward_funcs=[str(rm1)], args=args, train_dataset=prompts,
                     processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ppo.train()
    out = tmp_path / "ppo"
    alarms = [json.loads(x) for x in (out / "monitor" / "alarms.jsonl").read_text().splitlines()]
    assert alarms, "the length-biased reward model should raise the reward-length correlation alarm"

    queue = ReviewQueue(out)
    pairs = queue.records()
    assert pairs
    for rec in pairs:  # the reviewer prefers the shorter answer of each pair
        queue.decide(rec["id"], "flagged" if rec["flagged"]["length"] < rec["reference"]["length"] else "reference")
    prefs = [json.loads(x) for x in queue.preferences_path.read_text().splitlines()]
    assert len(prefs) == len({r["id"] for r in pairs}) and all(p["source"]["queue_id"] for p in prefs)

    rm2 = _reward_model(tmp_path / "rm2", base, tok, data, extra=[str(queue.preferences_path)])
    spec = json.loads((rm2 / "rlhf_ext_reward.json").read_text())
    assert spec["mode"] == "heads" and load_reward_model(rm2).score_texts(["a "], ["good ."]).shape == (1, 2)

    args.max_steps = 6
    resumed = PPOTrainer(load_model(base, "causal"), reward_funcs=[str(rm2)], args=args, train_dataset=prompts,
                         processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    hist = resumed.train(resume_from_checkpoint=True)
    assert resumed.iteration == 6 and len(hist) == 6
    assert hist[-1]["rewards/member_0_raw"] != hist[3]["rewards/member_0_raw"]  # scored by the new reward model


def _length_biased(n, seed):
    return Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"] + " and the movie was very very so good",
                               "rejected": r["rejected"]} for r in preference_rows(n, seed, conversational=False)])


def _fine_tune(out, base, tok, data, **kw):
    args = RewardEnsembleConfig(str(out), **{"ensemble_size": 2, "max_steps": 8, "per_device_train_batch_size": 16,
                                             "learning_rate": 5e-3, "report_to": "none", "save_strategy": "no",
                                             "use_cpu": True, "disable_tqdm": True, "normalization_samples": 32, **kw})
    tr = RewardEnsembleTrainer(base, args=args, train_dataset=data, processing_class=tok,
                               peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return tr


def test_reviewed_pairs_fine_tune_the_reward_model_the_run_used(tmp_path, tok, tiny_path):
    """The loop's retrain: `init_reward_model` starts from the saved reward model exactly (at learning rate 0 its
    scores come back unchanged), `extra_preferences_weight` repeats the reviewed pairs, and the fine-tune turns the
    reward model toward them; a reward model of another shape is refused, naming what differs."""
    data = _length_biased(96, 0)
    rm1 = _reward_model(tmp_path / "rm1", tiny_path, tok, data)
    reviewed = [{"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]} for r in data.select(range(8))]
    prefs = tmp_path / "preferences.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in reviewed))

    def margins(path):
        ens = load_reward_model(path)
        s = lambda key: ens.score_texts([r["prompt"] for r in reviewed], [r[key] for r in reviewed]).mean(-1)
        return (s("chosen") - s("rejected")).mean().item(), ens.score_texts(["a "], ["good ."])

    before, probe = margins(rm1)
    assert before < 0  # the length-biased model prefers the long answers the reviewer rejected

    same = _fine_tune(tmp_path / "same", tiny_path, tok, data, learning_rate=0.0, init_reward_model=str(rm1))
    same.train()
    same.save_model()
    torch.testing.assert_close(margins(tmp_path / "same")[1], probe)  # raw scores: identical weights

    tr = _fine_tune(tmp_path / "ft", tiny_path, tok, data, init_reward_model=str(rm1), max_steps=12,
                    extra_preferences=[str(prefs)], extra_preferences_weight=16)
    assert len(tr.train_dataset) == 96 + 16 * 8
    tr.train()
    tr.save_model()
    after, _ = margins(tmp_path / "ft")
    assert after > 0 > before, (before, after)  # now it sides with the reviewer

    with pytest.raises(ValueError, match="members.*ensemble_size/ensemble_mode"):
        _fine_tune(tmp_path / "k1", tiny_path, tok, data, ensemble_size=1, init_reward_model=str(rm1)).train()
    with pytest.raises(ValueError, match="extra_preferences_weight must be an integer ≥ 1"):
        RewardEnsembleConfig(str(tmp_path / "x"), extra_preferences_weight=0)
    with pytest.raises(FileNotFoundError, match="init_reward_model: .* is not a saved rlhf_ext reward model"):
        RewardEnsembleConfig(str(tmp_path / "x"), init_reward_model=str(tmp_path / "nowhere"))
