"""Reward-model training step time on CPU, one setting against another: freed memory kept in the heap or handed back
(RewardEnsembleConfig's `cpu_keep_freed_memory`, rlhf_ext/cpu_memory.py), the frozen trunk's fp32 matmuls through
oneDNN or torch's kernel (`cpu_matmul_backend`, rlhf_ext/cpu_linear.py), or grouped-query attention with the
key/value heads unrepeated or repeated as transformers does under a mask (rlhf_ext/grouped_kv.py).

    python benchmarks/reward_step_time.py                          # fp32 and bf16, each setting in a fresh process
    python benchmarks/reward_step_time.py --precision fp32 --steps 8 --repeat 2
    python benchmarks/reward_step_time.py --compare matmul --precision fp32 --repeat 2
    python benchmarks/reward_step_time.py --compare grouped_kv --repeat 2

Configuration: SmolLM2-135M-Instruct, the shipped sentiment preference pairs, 8 pairs per step, K=2 heads, LoRA r=16
on q_proj/v_proj. bf16 = bf16 weights + bf16=True, as for PPO (ppo_throughput.py). Prints the median step time over
steps 3..N and the peak RSS of each run, then kept / handed back per precision. The malloc setting is per process
and cannot be undone, so every run is its own subprocess; `--repeat` alternates the two settings. The setting not
compared stays at its default.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import _common  # noqa: F401  (offline env, flush denormals)
from _common import median, peak_rss_mib, step_timer


def worker(args) -> dict:
    from peft import LoraConfig

    from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer
    from rlhf_ext.data import SHIPPED, load_split

    bf16 = args.precision == "bf16"
    if args.grouped_kv == "off":  # transformers' own behaviour: k and v repeated to the query heads under a mask
        from contextlib import nullcontext

        from rlhf_ext.reward import ensemble
        ensemble.grouped_kv_attention = lambda *a: nullcontext()
    train = load_split(SHIPPED / "sentiment", "train", "preferences").select(range(8 * args.steps))
    cfg = RewardEnsembleConfig(tempfile.mkdtemp(prefix="rm_step_"), ensemble_size=2, ensemble_mode="heads",
                               per_device_train_batch_size=8, max_steps=args.steps, save_strategy="no",
                               report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=10**6,
                               normalization_samples=8, bf16=bf16, cpu_keep_freed_memory=args.keep == "on",
                               cpu_matmul_backend=args.matmul,
                               model_init_kwargs={"dtype": "bfloat16"} if bf16 else None)
    times: list[float] = []
    tr = RewardEnsembleTrainer(args.model, args=cfg, train_dataset=train, callbacks=[step_timer(times)],
                               peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    tr.train()
    return {"precision": args.precision, "keep": args.keep, "matmul": args.matmul, "grouped_kv": args.grouped_kv,
            "routed": tr.cpu_matmul,
            "allocator": tr.cpu_memory,
            "step_s": median(times[2:]), "peak_rss_mib": peak_rss_mib()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precision", default="fp32,bf16", help="a comma list of fp32, bf16")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each setting, alternated")
    ap.add_argument("--compare", choices=["keep", "matmul", "grouped_kv"], default="keep",
                    help="keep: freed memory kept / handed back; matmul: the trunk's fp32 matmuls via oneDNN / torch; "
                         "grouped_kv: grouped-query attention with k, v unrepeated / repeated")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--keep", choices=["on", "off"], default="on", help=argparse.SUPPRESS)
    ap.add_argument("--matmul", choices=["auto", "onednn", "torch"], default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--grouped-kv", choices=["on", "off"], default="on", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("ROW " + json.dumps(worker(args)), flush=True)
        return
    if args.steps < 3:  # the step time is the median of steps 3..N (the first two warm up)
        ap.error(f"--steps must be ≥ 3 (the step time is the median of steps 3..N), got {args.steps}")
    rows = []
    settings = {"keep": [("--keep", "off"), ("--keep", "on")], "matmul": [("--matmul", "torch"), ("--matmul", "onednn")],
                "grouped_kv": [("--grouped-kv", "off"), ("--grouped-kv", "on")]}
    label = {"off": "freed memory handed back", "on": "freed memory kept", "torch": "torch's matmuls",
             "onednn": "oneDNN's matmuls"}
    if args.compare == "grouped_kv":
        label.update(off="k, v repeated", on="k, v unrepeated")
    for precision in args.precision.split(","):
        for _ in range(args.repeat):
            for flag, value in settings[args.compare]:
                cmd = [sys.executable, __file__, "--worker", flag, value, "--precision", precision, "--model",
                       args.model, "--steps", str(args.steps)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    sys.stderr.write(res.stderr[-3000:])
                    raise SystemExit(f"worker failed ({precision}, {flag} {value}): its error is above")
                out = res.stdout
                rows.append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("ROW "))[4:]))
                r = rows[-1]
                print(f"{precision:5s} {label[value]:25s} ({r['allocator']}, {r['routed']} linears via oneDNN) "
                      f"step {r['step_s']:6.2f} s   peak RSS {r['peak_rss_mib']:6.0f} MiB", flush=True)
    key = args.compare
    (_, base), (_, other) = settings[args.compare]
    for precision in args.precision.split(","):
        b = median([r["step_s"] for r in rows if r["precision"] == precision and r[key] == base])
        o = median([r["step_s"] for r in rows if r["precision"] == precision and r[key] == other])
        print(f"{precision}: step time {label[other]} / {label[base]} = {o / b:.2f} (median {o:.2f} vs {b:.2f} s)")

if __name__ == "__main__":
    main()
