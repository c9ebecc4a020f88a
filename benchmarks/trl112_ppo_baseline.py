"""TRL 1.12 `trl.experimental.ppo.PPOTrainer` on the benchmark configuration (run by ppo_throughput.py --baseline
inside a venv with trl==1.12.0). Policy + LoRA r=16 q_proj/v_proj (reference = adapter-disabled policy); value and
reward models are full `AutoModelForSequenceClassification` copies of the same checkpoint, as TRL required.

--precision fp32: every model in float32, bf16=False (shared/baselines' setting); bf16: every model loaded in
bfloat16 (as a GPU user loads them) and PPOConfig(bf16=True), accelerate's bf16 autocast."""

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import trl.experimental.ppo.ppo_trainer as ppo_mod  # noqa: E402
from _common import baseline_prompts, step_timer, summary, timed  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--completion-length", type=int, default=32, help="response_length")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--json-out", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model, padding_side="left")
    tok.pad_token = "<|endoftext|>"  # TRL 1.12 masks pad ids; SmolLM2's own pad (<|im_end|>) is in every prompt
    bf16 = a.precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, dtype=dtype)
    print(f"trl 1.12: weights {dtype}, bf16={bf16}", flush=True)
    for m in (policy, value, reward):
        m.config.pad_token_id = tok.pad_token_id
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
           for p in baseline_prompts(64)]
    ids = [x["input_ids"] if not isinstance(x, list) else x for x in ids]
    iter_times, gen_times = [], []
    ppo_mod.batch_generation = timed(ppo_mod.batch_generation, gen_times)
    cfg = PPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.prompts, gradient_accumulation_steps=1,
                    num_mini_batches=1, num_ppo_epochs=a.epochs, response_length=a.completion_length,
                    total_episodes=a.prompts * a.iters, local_rollout_forward_batch_size=a.prompts,
                    num_sample_generations=0, stop_token=None, bf16=bf16,
                    fp16=False, use_cpu=True, seed=0, report_to="none", eval_strategy="no", save_strategy="no",
                    temperature=0.7)
    tr = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                    train_dataset=Dataset.from_dict({"input_ids": ids}), value_model=value,
                    peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
                    callbacks=[step_timer(iter_times)])
    tr.train()
    with open(a.json_out, "w") as f:
        json.dump({**summary(iter_times, gen_times, a.prompts * a.completion_length, tr.model, reward),
                   "base_dtype": str(dtype).replace("torch.", "")}, f)


if __name__ == "__main__":
    main()
