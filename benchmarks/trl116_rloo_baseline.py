"""TRL 1.16 `RLOOTrainer` at the budget matched to one PPO epoch (run by ppo_throughput.py --rloo, in our own
venv: TRL 1.16 is what we build on). As shared/baselines/trl116_rloo.py: SmolLM2-135M-Instruct + LoRA r=16
q_proj/v_proj, 8 prompts x 2 generations x exactly 32 tokens, beta=0.05 (reference = adapter-disabled policy),
reward = a full `AutoModelForSequenceClassification` copy with a random head, one optimizer step per rollout."""

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from trl import RLOOConfig, RLOOTrainer  # noqa: E402

from _common import baseline_prompts, step_timer, summary, timed  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (x 2 generations)")
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--json-out", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model, padding_side="left")
    tok.pad_token = "<|endoftext|>"  # as the shared baseline
    policy = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, dtype=torch.float32)
    reward.config.pad_token_id = tok.pad_token_id
    reward.eval()
    iter_times, gen_times = [], []

    n = a.prompts * 2
    cfg = RLOOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=n, gradient_accumulation_steps=1,
                     num_generations=2, max_completion_length=32, num_iterations=1, beta=0.05, max_steps=a.iters,
                     generation_kwargs={"min_new_tokens": 32}, gradient_checkpointing=False, bf16=False, fp16=False,
                     use_cpu=True, seed=0, report_to="none", save_strategy="no", logging_steps=10**6)
    tr = RLOOTrainer(model=policy, reward_funcs=reward, args=cfg, processing_class=tok,
                     train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in baseline_prompts(64)]}),
                     peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
                     callbacks=[step_timer(iter_times)])
    tr._generate = timed(tr._generate, gen_times)
    tr.train()
    with open(a.json_out, "w") as f:
        json.dump(summary(iter_times, gen_times, n * 32, tr.model, reward), f)


if __name__ == "__main__":
    main()
