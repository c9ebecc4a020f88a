"""PPO throughput and memory: rlhf_ext vs TRL 1.12's PPO (the last TRL release with PPO).

    python benchmarks/ppo_throughput.py                       # ours: 8 prompts x 32 tokens, 4 epochs, 1 minibatch
    python benchmarks/ppo_throughput.py --baseline            # + TRL 1.12 PPO in its own venv, same run, ratios
    python benchmarks/ppo_throughput.py --prompts 16 --epochs 1 --rloo   # + TRL 1.16 RLOO 8x2, matched budget
    python benchmarks/ppo_throughput.py --lora-layers 0,8 --baseline   # also LoRA on the top 8 layers (cache on)

Configuration (as shared/baselines): SmolLM2-135M-Instruct fp32, LoRA r=16 (alpha 32) on q_proj/v_proj, every
response exactly 32 tokens (no EOS stop), temperature 0.7, seed 0, 6 iterations, median of iterations 2..N.
Ours keeps everything on one base: reference = adapters off, value head on the policy trunk, and the reward
member (an untrained LoRA adapter + head: speed only, like the baseline's random-head reward model).
Each configuration runs in a fresh subprocess so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASELINE_VENV = HERE.parent / ".bench-venvs" / "trl112"


def run_ours(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from _common import baseline_prompts, summary
    from rlhf_ext import PPOConfig, PPOTrainer
    from rlhf_ext.models import load_tokenizer
    from _common import random_reward_artifact

    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    n_layers = 30 if "smollm2" in args.model.lower() else None
    top = int(args.lora_layers)
    layers = list(range(n_layers - top, n_layers)) if top else None
    rm_dir = random_reward_artifact(Path(tempfile.mkdtemp(prefix="rm_bench_")), args.model, tok, layers)
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in baseline_prompts(64)]})
    cfg = PPOConfig(tempfile.mkdtemp(prefix="ppo_bench_"), per_device_train_batch_size=args.prompts,
                    max_completion_length=32, stop_on_eos=False, temperature=0.7, num_ppo_epochs=args.epochs,
                    num_mini_batches=1, kl_controller=args.kl_controller, kl_target=4.0, max_steps=args.iters,
                    save_strategy="no", use_cpu=True, seed=0, logging_steps=10**6, disable_tqdm=True,
                    critic=args.critic)
    tr = PPOTrainer(args.model, reward_funcs=[str(rm_dir)], args=cfg, train_dataset=data, processing_class=tok,
                    peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                           layers_to_transform=layers))
    hist = tr.train()
    it = [h["time/iteration_s"] for h in hist]
    gen = [h["time/generate_s"] for h in hist]
    toks = args.prompts * 32
    for i, (a, b) in enumerate(zip(it, gen), 1):
        print(f"ITER {i}: {a:.2f}s (generate {b:.2f}s) {toks / a:.1f} tok/s", flush=True)
    return {**summary(it, gen, toks, tr.model, tr.policy.value_head),
            "trainable_m": sum(p.numel() for p in tr.trainable_parameters()) / 1e6}


def ensure_baseline_venv() -> Path:
    py = BASELINE_VENV / "bin" / "python"
    if not py.exists():
        print(f"creating {BASELINE_VENV} with trl==1.12.0 (one time)…", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(BASELINE_VENV)], check=True)
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        import transformers

        subprocess.run(pip + ["trl==1.12.0", f"transformers=={transformers.__version__}", "peft", "accelerate",
                              "datasets"], check=True)
    return py


def sub(cmd, env=None) -> dict:
    out = tempfile.mktemp(suffix=".json")
    r = subprocess.run(cmd + ["--json-out", out], env=env)
    if r.returncode != 0:
        raise SystemExit(f"benchmark subprocess failed: {' '.join(cmd)}")
    return json.loads(Path(out).read_text())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--kl-controller", default="fixed", help="fixed (the baseline's penalty) or hard (+1 KL forward)")
    ap.add_argument("--critic", default="shared")
    ap.add_argument("--lora-layers", default="0",
                    help="LoRA on the top N layers only (0 = all, as the baseline); a list such as 0,8 runs each")
    ap.add_argument("--baseline", action="store_true", help="also run TRL 1.12 PPO (own venv) and print ratios")
    ap.add_argument("--rloo", action="store_true", help="also run TRL 1.16 RLOO, 8 prompts x 2 (this venv)")
    ap.add_argument("--other-tree", help="also run `ours` from another checkout of rlhf_ext (e.g. a git worktree of an "
                                         "earlier commit), in the same invocation: before/after ratios")
    ap.add_argument("--worker", choices=["ours", "trl112"], help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = run_ours(args) if args.worker == "ours" else None
        Path(args.json_out).write_text(json.dumps(res))
        return
    from rlhf_ext.models import resolve_model_path

    model_dir = resolve_model_path(args.model)
    common = ["--prompts", str(args.prompts), "--epochs", str(args.epochs), "--iters", str(args.iters)]
    rows = {}
    for n in [int(x) for x in str(args.lora_layers).split(",")]:
        name = f"ours ({'top ' + str(n) if n else 'all'} layers)"
        rows[name] = sub([sys.executable, __file__, "--worker", "ours", "--model", args.model, "--kl-controller",
                          args.kl_controller, "--critic", args.critic, "--lora-layers", str(n)] + common)
    if args.other_tree:
        other = Path(args.other_tree).resolve()
        rev = subprocess.run(["git", "-C", str(other), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip() or other.name
        for n in [int(x) for x in str(args.lora_layers).split(",")]:
            rows[f"ours@{rev} ({'top ' + str(n) if n else 'all'})"] = sub(
                [sys.executable, str(other / "benchmarks" / "ppo_throughput.py"), "--worker", "ours", "--model",
                 args.model, "--kl-controller", args.kl_controller, "--critic", args.critic, "--lora-layers", str(n)]
                + common, env={**os.environ, "PYTHONPATH": str(other)})
    ours_rows = list(rows)
    if args.baseline:
        py = ensure_baseline_venv()
        rows["trl 1.12 PPO"] = sub([str(py), str(HERE / "trl112_ppo_baseline.py"), "--model", model_dir] + common)
    if args.rloo:
        rows["trl 1.16 RLOO"] = sub([sys.executable, str(HERE / "trl116_rloo_baseline.py"), "--model", model_dir,
                                     "--iters", str(args.iters)])
    print(f"\n{args.prompts} prompts x 32 tokens, {args.epochs} PPO epochs, 1 minibatch, {args.iters} iterations "
          f"(median of 2..N); ours: critic={args.critic}, kl_controller={args.kl_controller}")
    print(f"{'trainer':22s} {'s/iter':>7s} {'tok/s':>7s} {'gen s':>6s} {'iter/gen':>8s} {'peak RSS MiB':>12s} {'params M':>9s}")
    for name, r in rows.items():
        print(f"{name:22s} {r['iter_s']:7.2f} {r['tok_per_s']:7.1f} {r['generate_s']:6.2f} "
              f"{r['iter_s'] / r['generate_s']:8.2f} {r['peak_rss_mib']:12.0f} {r['params_resident_m']:9.1f}")
    for base in ("trl 1.12 PPO", "trl 1.16 RLOO"):
        for name in ours_rows if base in rows else []:
            b, o = rows[base], rows[name]
            print(f"ratios {name} / {base}: tok/s {o['tok_per_s'] / b['tok_per_s']:.2f}x, "
                  f"peak RSS {o['peak_rss_mib'] / b['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
