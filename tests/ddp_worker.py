"""Run by test_two_process_data_parallel under torch.distributed.run (2 CPU processes, gloo)."""

import json
import sys

import torch
import torch.distributed as dist
from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import PPOConfig, PPOTrainer
from rlhf_ext.testing import tiny_causal_lm, tiny_tokenizer
from tests.test_ppo import good_counter

torch.set_num_threads(1)
tok = tiny_tokenizer()
args = PPOConfig(sys.argv[1], per_device_train_batch_size=4, max_steps=2, learning_rate=3e-2, max_completion_length=6,
                 kl_controller="hard", kl_target=0.5, use_cpu=True, save_strategy="no", disable_tqdm=True,
                 logging_steps=1000, seed=0)
tr = PPOTrainer(tiny_causal_lm(tok), reward_funcs=good_counter(tok), args=args, train_dataset=Dataset.from_dict({"prompt": [f"write a review of movie {i} ." for i in range(32)]}),
                processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
before = torch.cat([p.detach().flatten().clone() for p in tr.trainable_parameters()])
first_batch = [p for p, _ in tr._next_prompts()]
tr.data_pos = 0
hist = tr.train()
after = torch.cat([p.detach().flatten() for p in tr.trainable_parameters()])
gathered = [torch.zeros_like(after) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, after)
out = {"rank": dist.get_rank(), "changed": float((after - before).abs().max()),
       "max_diff_between_ranks": float(max((g - after).abs().max() for g in gathered)),
       "kl_after": [h["kl/after_update"] for h in hist], "first_batch": first_batch}
with open(f"{sys.argv[1]}/rank{dist.get_rank()}.json", "w") as f:
    json.dump(out, f)
