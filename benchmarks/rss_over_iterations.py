"""Does a long PPO run's memory level off? RSS after every iteration, responses ending at EOS (lengths vary).

    python benchmarks/rss_over_iterations.py                       # fp32, 30 iterations
    python benchmarks/rss_over_iterations.py --precision bf16 --iters 60
    python benchmarks/rss_over_iterations.py --precision bf16 --iters 20 --live-columns off   # full packed grids

On CPU oneDNN compiles and keeps a kernel per product shape (≈ 0.7 MiB each), and PPO's passes change their row
counts with every rollout's lengths: unbounded, RSS would grow with each new length. rlhf_ext rounds the row counts it
hands oneDNN (rlhf_ext/cpu_linear.py), so the shapes — and RSS — stop growing after the first iterations. Configuration:
SmolLM2-135M-Instruct, LoRA r=16 on q/v of every layer, 8 prompts × up to 32 tokens (stopping at EOS), one PPO epoch,
a length reward, `cpu_matmul_backend` as given (default "auto"). Prints RSS after each iteration, then the growth
from the first iteration to the last and over the second half.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import _common  # noqa: F401  (offline env, flush denormals)
from _common import baseline_prompts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from gpu_check import rss_bytes  # noqa: E402  (the current RSS, as memory_plan_check.py reads it)


def rss_mib() -> float:
    return rss_bytes("VmRSS") / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--cpu-matmul-backend", default="auto", choices=["auto", "onednn", "torch"])
    ap.add_argument("--live-columns", default="on", choices=["on", "off"],
                    help="off: packed passes run every masked column too (rlhf_ext/shared_prefix.py MIN_LEFT_OUT "
                         "beyond reach), to compare their memory with the default's")
    args = ap.parse_args()
    if args.live_columns == "off":
        import rlhf_ext.shared_prefix

        rlhf_ext.shared_prefix.MIN_LEFT_OUT = float("inf")

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from rlhf_ext import PPOConfig, PPOTrainer
    from rlhf_ext.models import load_tokenizer

    seen = []

    class Track(TrainerCallback):
        def on_step_end(self, _args, state, control, **kw):
            seen.append(rss_mib())
            print(f"iteration {state.global_step:3d}: RSS {seen[-1]:7.0f} MiB", flush=True)

    bf16 = args.precision == "bf16"
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in baseline_prompts(64)]})
    cfg = PPOConfig(tempfile.mkdtemp(prefix="rss_"), per_device_train_batch_size=8, max_completion_length=32,
                    stop_on_eos=True, num_ppo_epochs=1, max_steps=args.iters, kl_controller="fixed", monitor=False,
                    save_strategy="no", use_cpu=True, logging_steps=10**6, disable_tqdm=True, seed=0, bf16=bf16,
                    model_init_kwargs={"dtype": "bfloat16"} if bf16 else None,
                    cpu_matmul_backend=args.cpu_matmul_backend)
    tr = PPOTrainer(args.model, reward_funcs=[lambda completions, **kw: [float(len(c)) for c in completions]],
                    args=cfg, train_dataset=data, processing_class=load_tokenizer(args.model), callbacks=[Track()],
                    peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    tr.train()
    half = len(seen) // 2
    print(f"{args.precision}, matmuls: {tr.startup['cpu_matmul']}; RSS {seen[0]:.0f} → {seen[-1]:.0f} MiB over "
          f"{len(seen)} iterations (+{seen[-1] - seen[0]:.0f}); second half +{seen[-1] - seen[half]:.0f} MiB")


if __name__ == "__main__":
    main()
