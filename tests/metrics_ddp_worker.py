"""Run by tests/test_logged_metrics_ddp.py under `accelerate launch` with 2 CPU processes: one PPO run whose ranks keep
different numbers of response tokens (rank 0 drops 3 of its 8 rewards), recording, per optimizer step, each rank's
own token means and token counts and, per iteration, its per-sequence KL. Writes OUT_DIR/rank<r>.json.

    python tests/metrics_ddp_worker.py OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import PPOConfig, PPOTrainer
from rlhf_ext import rl_math
from rlhf_ext.testing import tiny_causal_lm, tiny_tokenizer

torch.set_num_threads(1)
OUT, RANK = Path(sys.argv[1]), int(os.environ.get("RANK", "0"))
tok = tiny_tokenizer()
steps, kls = [], []


def reward(completion_ids, **kw):
    out = [0.5 * len(ids) + (ids[0] % 3 if ids else 0) for ids in completion_ids]
    return [None if RANK == 0 and i in (1, 4, 6) else v for i, v in enumerate(out)]


def recording(fn, names):
    def wrapped(*a, **k):
        out = fn(*a, **k)
        mask = a[3]  # policy_loss(logp, old_logp, adv, mask, ε), value_loss(v, old_v, returns, mask, ε_v)
        steps.append({"n": float(mask.sum()), **{n: float(v) for n, v in zip(names, out)}})
        return out
    return wrapped


rl_math.policy_loss = recording(rl_math.policy_loss, ["loss/policy", "policy/clipfrac", "policy/approx_kl"])
rl_math.value_loss = recording(rl_math.value_loss, ["loss/value", "val/clipfrac"])
entropy = PPOTrainer._entropy


def recorded_entropy(logits, mask):
    out = entropy(logits, mask)
    steps.append({"n": float(mask.sum()), "policy/entropy": float(out)})
    return out


PPOTrainer._entropy = staticmethod(recorded_entropy)
data = Dataset.from_dict({"prompt": [f"write a short review of the {w} ." for w in
                                     2 * "movie book song film food place day night".split()]})
args = PPOConfig(str(OUT / "ppo"), per_device_train_batch_size=8, max_steps=2, max_completion_length=6,
                 num_mini_batches=2, num_ppo_epochs=2, clip_range=0.05, clip_range_value=0.05, learning_rate=3e-2,
                 kl_controller="fixed", init_kl_coef=0.05, use_cpu=True, save_strategy="no", disable_tqdm=True,
                 logging_steps=1000, seed=0, report_to=[])
tr = PPOTrainer(tiny_causal_lm(tok), reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
advantages = tr._advantages


def recorded_advantages(ro, old_logp, old_values):
    kl_t, adv, ret = advantages(ro, old_logp, old_values)
    kls.append([float(kl_t[b].sum()) for b in range(len(kl_t)) if bool(ro.valid[b])])
    return kl_t, adv, ret


tr._advantages = recorded_advantages
per_iteration = []
original = tr._iteration


def iteration():
    steps.clear()
    metrics = original()
    per_iteration.append({"steps": list(steps), "kl": kls[-1], "logged": metrics})
    return metrics


tr._iteration = iteration
tr.train()
(OUT / f"rank{RANK}.json").write_text(json.dumps(per_iteration))
tr.accelerator.wait_for_everyone()
import torch.distributed as dist  # noqa: E402

if dist.is_initialized():
    dist.destroy_process_group()
