"""PPO throughput and memory: rlhf_ext vs TRL 1.12's PPO (the last TRL release with PPO), in fp32 and bf16.

    python benchmarks/ppo_throughput.py                       # ours: 8 prompts x 32 tokens, 4 epochs, 1 minibatch
    python benchmarks/ppo_throughput.py --baseline            # + TRL 1.12 PPO in its own venv, same run, ratios
    python benchmarks/ppo_throughput.py --prompts 16 --epochs 1 --rloo   # + TRL 1.16 RLOO 8x2, matched budget
    python benchmarks/ppo_throughput.py --lora-layers 0,8 --baseline   # also LoRA on the top 8 layers (cache on)
    python benchmarks/ppo_throughput.py --lora-layers 0,8 --baseline --precision fp32,bf16   # both precisions
    python benchmarks/ppo_throughput.py --baseline --precision fp32,bf16 --iters 2 --completion-length 8  # smoke
    python benchmarks/ppo_throughput.py --baseline --baseline-kept-memory   # + TRL with ours' malloc setting
    python benchmarks/ppo_throughput.py --share-prefix on,off --baseline   # ours with and without prefix sharing
    python benchmarks/ppo_throughput.py --stop-on-eos --completion-length 96   # ours, responses ending at EOS
    python benchmarks/ppo_throughput.py --baseline --precision fp32,bf16 --rounds 3   # alternated 3 times: the
        # spread of the ratio over rounds (the machine's speed drifts between minutes; a ratio is only read within one)

Configuration (as shared/baselines): SmolLM2-135M-Instruct, LoRA r=16 (alpha 32) on q_proj/v_proj, every response
exactly 32 tokens (no EOS stop), temperature 0.7, seed 0, 6 iterations, median of iterations 2..N.
Precision (`--precision`, a comma list; default fp32):
  fp32  weights loaded in float32, no autocast — both trainers (shared/baselines' setting).
  bf16  weights loaded in bfloat16, as a GPU user loads them, and bf16=True (autocast) — both trainers: ours through
        PPOConfig(model_init_kwargs={"dtype": "bfloat16"}, bf16=True); TRL 1.12's policy, value and reward models
        from_pretrained(dtype=torch.bfloat16) and its PPOConfig(bf16=True).
Ours keeps everything on one base: reference = adapters off, value head on the policy trunk, and the reward
member (an untrained LoRA adapter + head: speed only, like the baseline's random-head reward model). On CPU ours
keeps freed memory in the heap (PPOConfig.cpu_keep_freed_memory, on by default); `--baseline-kept-memory` also runs
TRL with the same glibc setting, made through the environment.
The benchmark's prompts are a chat template with SmolLM2's default system prompt, 8 prompts of one instruction
template per batch: their first 31 of 41 tokens are the same, which ours runs once per pass (PPOConfig.
share_prompt_prefix, on by default; `--share-prefix off` measures without it, TRL 1.12 has no such thing).
Each configuration runs in a fresh subprocess so peak RSS is its own. The goals printed at the end: on the
all-layer configuration (TRL's own), ≥ 3× TRL 1.12's tokens/s at equal precision, peak RSS ≤ 0.45× TRL's, and
iteration time ≤ 2× generation time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
BASELINE_VENV = HERE.parent / ".bench-venvs" / "trl112"
PRECISIONS = ("fp32", "bf16")
GOALS = {"tok_per_s_ratio": 3.0, "peak_rss_ratio": 0.45, "iter_over_generate": 2.0}


def build_ours(args):
    """Our PPOTrainer as this benchmark configures it (also used by ppo_floor.py)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from _common import baseline_prompts
    from rlhf_ext import PPOConfig, PPOTrainer
    from rlhf_ext.models import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    layers = top_layers(args.model, int(args.lora_layers))
    rm_dir = args.rm_dir or reward_artifact(args.model, int(args.lora_layers))
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in baseline_prompts(64)]})
    bf16 = args.precision == "bf16"
    cfg = PPOConfig(tempfile.mkdtemp(prefix="ppo_bench_"), per_device_train_batch_size=args.prompts,
                    max_completion_length=args.completion_length, stop_on_eos=args.stop_on_eos, temperature=0.7,
                    num_ppo_epochs=args.epochs, num_mini_batches=1, kl_controller=args.kl_controller, kl_target=4.0,
                    max_steps=args.iters, save_strategy="no", use_cpu=True, seed=0, logging_steps=10**6,
                    disable_tqdm=True, critic=args.critic, bf16=bf16, share_prompt_prefix=args.share_prefix == "on",
                    model_init_kwargs={"dtype": "bfloat16"} if bf16 else None)
    tr = PPOTrainer(args.model, reward_funcs=[str(rm_dir)], args=cfg, train_dataset=data, processing_class=tok,
                    peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                           layers_to_transform=layers))
    return tr


def trainer_at(precision: str):
    """The benchmark's trainer with every other option at its default (for the scripts that time one part of it)."""
    return build_ours(parser().parse_args(["--precision", precision]))


def run_ours(args) -> dict:
    from _common import summary

    tr = build_ours(args)
    base_dtype = str(next(tr.policy.peft.get_base_model().parameters()).dtype).replace("torch.", "")
    print(f"ours: base weights {base_dtype}, autocast {tr.policy.autocast}, compute {tr.compute_dtype}, prompt-prefix "
          f"sharing {tr.startup['shared_prompt_prefix']}", flush=True)
    hist = tr.train()
    it = [h["time/iteration_s"] for h in hist]
    gen = [h["time/generate_s"] for h in hist]
    toks = args.prompts * args.completion_length
    for i, (a, b) in enumerate(zip(it, gen), 1):
        print(f"ITER {i}: {a:.2f}s (generate {b:.2f}s) {toks / a:.1f} tok/s", flush=True)

    return {**summary(it, gen, toks, tr.model, tr.policy.value_head),
            "trainable_m": sum(p.numel() for p in tr.trainable_parameters()) / 1e6, "base_dtype": base_dtype,
            # where the rest goes: scoring + reference after sampling, then θ_old + the epochs (medians, 2..N)
            "score_ref_s": median(h["time/rollout_s"] - h["time/generate_s"] for h in hist[1:]),
            "update_s": median(h["time/update_s"] for h in hist[1:])}


def top_layers(model: str, top: int) -> list[int] | None:
    n_layers = 30 if "smollm2" in model.lower() else None
    return list(range(n_layers - top, n_layers)) if top else None


def reward_artifact(model: str, top: int) -> str:
    """The random-head reward artifact `ours` scores with. Built by the parent, not in the measured worker: it is a
    file a user already has from the reward trainer, and building it loads an fp32 trunk that would otherwise count
    in the worker's peak RSS (and leave its freed pages in the worker's heap)."""
    from _common import random_reward_artifact
    from rlhf_ext.models import load_tokenizer

    out = Path(tempfile.mkdtemp(prefix="rm_bench_"))
    return str(random_reward_artifact(out, model, load_tokenizer(model), top_layers(model, top)))


def ensure_baseline_venv() -> Path:
    """TRL 1.12's venv, built once. Complete only once `.complete` is written after every install: a build that
    failed or was killed midway is rebuilt on the next run instead of being used without its packages."""
    import shutil

    py, done = BASELINE_VENV / "bin" / "python", BASELINE_VENV / ".complete"
    if not done.is_file() and py.exists() and subprocess.run(  # one built before the marker existed
            [str(py), "-c", "import torch, trl, peft, datasets; assert trl.__version__ == '1.12.0'"],
            capture_output=True).returncode == 0:
        done.touch()
    if done.is_file():
        return py
    if BASELINE_VENV.exists():
        print(f"{BASELINE_VENV} is incomplete (an earlier build failed or was stopped): rebuilding it", flush=True)
        shutil.rmtree(BASELINE_VENV)
    print(f"creating {BASELINE_VENV} with trl==1.12.0 (one time; needs PyPI)…", flush=True)
    import transformers

    steps = [[sys.executable, "-m", "venv", str(BASELINE_VENV)],
             [str(py), "-m", "pip", "install", "-q", "torch==2.13.0"],
             [str(py), "-m", "pip", "install", "-q", "trl==1.12.0", f"transformers=={transformers.__version__}",
              "peft", "accelerate", "datasets"]]
    for cmd in steps:
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"--baseline: building TRL 1.12's venv failed at `{' '.join(cmd)}` (output above). Fix "
                             f"that (network, pip configuration) and rerun: the half-built {BASELINE_VENV} is "
                             f"replaced on the next run.")
    done.touch()
    return py


def sub(cmd, env=None) -> dict:
    out = tempfile.mktemp(suffix=".json")
    r = subprocess.run(cmd + ["--json-out", out], env=env)
    if r.returncode != 0:
        raise SystemExit(f"benchmark subprocess failed: {' '.join(cmd)}")
    return json.loads(Path(out).read_text())


def layers_label(n: int) -> str:
    return f"top {n} layers" if n else "all layers"


def print_table(rows: list[dict], args) -> None:
    print(f"\n{args.prompts} prompts x {args.completion_length} tokens, {args.epochs} PPO epochs, 1 minibatch, "
          f"{args.iters} iterations (median of 2..N); ours: critic={args.critic}, kl_controller={args.kl_controller}")
    print(f"{'trainer':34s} {'precision':>9s} {'s/iter':>7s} {'tok/s':>7s} {'gen s':>6s} {'score+ref s':>11s} "
          f"{'update s':>8s} {'iter/gen':>8s} {'peak RSS MiB':>12s} {'params M':>9s}")
    for r in rows:
        split = (f"{r['score_ref_s']:11.2f} {r['update_s']:8.2f}" if "update_s" in r else f"{'—':>11s} {'—':>8s}")
        print(f"{r['name'] + round_label(r):34s} {r['precision']:>9s} {r['iter_s']:7.2f} {r['tok_per_s']:7.1f} "
              f"{r['generate_s']:6.2f} "
              f"{split} {r['iter_s'] / r['generate_s']:8.2f} {r['peak_rss_mib']:12.0f} {r['params_resident_m']:9.1f}")


def paired(rows: list[dict], base_name: str):
    """(ours, baseline) for every `ours` row and the `base_name` row of the same precision and round: a ratio is only
    read between runs of one round."""
    for base in [r for r in rows if r["name"] == base_name]:
        for o in [r for r in rows if r["kind"] == "ours" and r["precision"] == base["precision"]
                  and r.get("round") == base.get("round")]:
            yield o, base


def print_ratios(rows: list[dict]) -> None:
    """Each `ours` row against the baseline of the same precision and round; the goals on the all-layer
    configuration."""
    for base_name in ("trl 1.12 PPO", "trl 1.12 PPO, kept memory", "trl 1.16 RLOO"):
        for o, base in paired(rows, base_name):
            tok = o["tok_per_s"] / base["tok_per_s"]
            rss = o["peak_rss_mib"] / base["peak_rss_mib"]
            line = (f"ratios{round_label(o)} {o['name']} / {base_name} ({base['precision']}): tok/s {tok:.2f}x, "
                    f"peak RSS {rss:.2f}x, iteration / generation {o['iter_s'] / o['generate_s']:.2f}")
            if base_name == "trl 1.12 PPO" and o["layers"] == 0 and o["tree"] == "this":
                met = [f"tok/s ≥ {GOALS['tok_per_s_ratio']}x: "
                       f"{'met' if tok >= GOALS['tok_per_s_ratio'] else 'NOT met'}",
                       f"peak RSS ≤ {GOALS['peak_rss_ratio']}x: "
                       f"{'met' if rss <= GOALS['peak_rss_ratio'] else 'NOT met'}",
                       f"iteration ≤ {GOALS['iter_over_generate']}x generation: "
                       f"{'met' if o['iter_s'] <= GOALS['iter_over_generate'] * o['generate_s'] else 'NOT met'}"]
                line += "   goals (all layers): " + "; ".join(met)
            print(line)


def round_label(row: dict) -> str:
    return f" [round {row['round']}]" if row.get("round") is not None else ""


def ratio_spread(rows: list[dict]) -> list[dict]:
    """Over rounds, per `ours` configuration and precision: the tokens/s and peak-RSS ratios against TRL 1.12 of each
    round (both measured minutes apart), their median, least and greatest, and in how many rounds ≥ 3× held."""
    groups: dict[tuple, dict] = {}
    for o, base in paired(rows, "trl 1.12 PPO"):
        g = groups.setdefault((o["name"], o["precision"]), {"name": o["name"], "precision": o["precision"],
                                                           "tok_ratios": [], "rss_ratios": []})
        g["tok_ratios"].append(o["tok_per_s"] / base["tok_per_s"])
        g["rss_ratios"].append(o["peak_rss_mib"] / base["peak_rss_mib"])
    out = [{**g, "met": sum(t >= GOALS["tok_per_s_ratio"] for t in g["tok_ratios"])} for g in groups.values()]
    for s in out:
        t = sorted(s["tok_ratios"])
        print(f"over {len(t)} rounds, {s['name']} / trl 1.12 PPO ({s['precision']}): tok/s median {median(t):.2f}x "
              f"(least {t[0]:.2f}x, greatest {t[-1]:.2f}x; ≥ {GOALS['tok_per_s_ratio']}x in {s['met']} of {len(t)}), "
              f"peak RSS ≤ {max(s['rss_ratios']):.2f}x")
    return out


def parser() -> argparse.ArgumentParser:
    """This benchmark's options; `parser().parse_args([...])` is its configuration for other scripts too."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--completion-length", type=int, default=32, help="tokens per response (every response is "
                    "exactly this long); 32 as shared/baselines, fewer for a smoke run")
    ap.add_argument("--kl-controller", default="fixed", help="fixed (the baseline's penalty) or hard (+1 KL forward)")
    ap.add_argument("--critic", default="shared")
    ap.add_argument("--lora-layers", default="0",
                    help="LoRA on the top N layers only (0 = all, as the baseline); a list such as 0,8 runs each")
    ap.add_argument("--precision", default="fp32",
                    help="comma list of fp32 (float32 weights) and bf16 (bfloat16 weights + bf16=True autocast); "
                         "every trainer runs in each")
    ap.add_argument("--share-prefix", default="on", help="ours with prompt-prefix sharing: on, off, or on,off (both)")
    ap.add_argument("--baseline", action="store_true", help="also run TRL 1.12 PPO (own venv) and print ratios")
    ap.add_argument("--baseline-kept-memory", action="store_true",
                    help="also run TRL 1.12 PPO with glibc's thresholds raised through the environment as ours raises "
                         "them in-process (rlhf_ext/cpu_memory.py): how much of the ratio that setting alone explains")
    ap.add_argument("--rloo", action="store_true", help="also run TRL 1.16 RLOO, 8 prompts x 2 (this venv; fp32)")
    ap.add_argument("--stop-on-eos", action="store_true",
                    help="ours only (not with --baseline): responses end at EOS, as PPOConfig's default, so the passes "
                         "hold masked columns after the shorter responses")
    ap.add_argument("--other-tree", help="also run `ours` from another checkout of rlhf_ext (e.g. a git worktree of an "
                                         "earlier commit), in the same invocation: before/after ratios")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every configuration this many times, alternated (ours, TRL, ours, TRL, …), and print "
                         "each round's ratios and their spread")
    ap.add_argument("--json-out", help="(workers) where to write the row; (main) where to write every row, "
                                       "rewritten after each run")
    ap.add_argument("--worker", choices=["ours", "trl112"], help=argparse.SUPPRESS)
    ap.add_argument("--rm-dir", help=argparse.SUPPRESS)  # (worker) the reward artifact the parent built
    return ap


def main():
    args = parser().parse_args()
    if args.worker:
        res = run_ours(args) if args.worker == "ours" else None
        Path(args.json_out).write_text(json.dumps(res))
        return
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise SystemExit(f"--precision: unknown {bad}; use a comma list of {', '.join(PRECISIONS)}")
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be ≥ 1, got {args.rounds}")
    if args.iters < 2:  # every row is a median over iterations 2..N (the first one warms up)
        raise SystemExit(f"--iters must be ≥ 2 (the medians are over iterations 2..N), got {args.iters}")
    try:
        layer_counts = [int(x) for x in str(args.lora_layers).split(",")]
    except ValueError:
        raise SystemExit(f"--lora-layers: {args.lora_layers!r}; use a comma list of integers (0 = all layers)")
    if args.rloo and (args.prompts, args.completion_length, args.epochs) != (16, 32, 1):
        print("note: --rloo runs TRL 1.16 RLOO at its fixed 8 prompts x 2 x 32 tokens, one update per rollout; its "
              "ratio is a matched budget only with --prompts 16 --completion-length 32 --epochs 1", flush=True)
    if args.json_out:
        Path(args.json_out).resolve().parent.mkdir(parents=True, exist_ok=True)
    if args.baseline or args.baseline_kept_memory:
        ensure_baseline_venv()  # before any measurement: a failed build must not come after minutes of ours
    from rlhf_ext.integrity import write_text_atomic
    from rlhf_ext.models import resolve_model_path

    model_dir = resolve_model_path(args.model)
    common = ["--prompts", str(args.prompts), "--epochs", str(args.epochs), "--iters", str(args.iters),
              "--completion-length", str(args.completion_length)]
    rows: list[dict] = []
    rm_dirs = {n: reward_artifact(args.model, n) for n in layer_counts}

    def add(result: dict, **meta) -> None:
        rows.append({**result, **meta, "round": rnd if args.rounds > 1 else None})
        if args.json_out:  # after every run: a long invocation stopped midway keeps what it measured
            write_text_atomic(args.json_out, json.dumps(rows, indent=2))

    if args.stop_on_eos and (args.baseline or args.baseline_kept_memory or args.rloo):
        raise SystemExit("--stop-on-eos runs ours only: TRL's baselines sample every response to its full length.")
    eos = ["--stop-on-eos"] if args.stop_on_eos else []
    sharing = [x.strip() for x in args.share_prefix.split(",")]
    if not sharing or set(sharing) - {"on", "off"}:
        raise SystemExit(f"--share-prefix: {args.share_prefix!r}; use on, off or on,off")
    for rnd in range(args.rounds):  # each round runs every configuration once, in the same order
        for precision in precisions:
            for n in layer_counts:
                for share in sharing:
                    add(sub([sys.executable, __file__, "--worker", "ours", "--model", args.model, "--kl-controller",
                             args.kl_controller, "--critic", args.critic, "--lora-layers", str(n), "--precision",
                             precision, "--rm-dir", rm_dirs[n], "--share-prefix", share] + common + eos),
                        name=f"ours ({layers_label(n)}{'' if share == 'on' else ', no sharing'})", kind="ours",
                        precision=precision, layers=n, tree="this" if share == "on" else "this, no sharing")
            if args.other_tree:
                other = Path(args.other_tree).resolve()
                rev = subprocess.run(["git", "-C", str(other), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip() or other.name
                for n in layer_counts:  # an older checkout may lack --precision / --completion-length: fp32, 32 only
                    extra = (["--precision", precision, "--completion-length", str(args.completion_length)]
                             if (precision != "fp32" or args.completion_length != 32) else [])
                    add(sub([sys.executable, str(other / "benchmarks" / "ppo_throughput.py"), "--worker", "ours",
                             "--model", args.model, "--kl-controller", args.kl_controller, "--critic", args.critic,
                             "--lora-layers", str(n), "--prompts", str(args.prompts), "--epochs", str(args.epochs),
                             "--iters", str(args.iters)] + extra + eos, env={**os.environ, "PYTHONPATH": str(other)}),
                        name=f"ours@{rev} ({layers_label(n)})", kind="ours", precision=precision, layers=n, tree=rev)
            trl112 = [str(HERE / "trl112_ppo_baseline.py"), "--model", model_dir, "--precision", precision] + common
            if args.baseline:
                add(sub([str(ensure_baseline_venv())] + trl112), name="trl 1.12 PPO", kind="baseline",
                    precision=precision, layers=0, tree="")
            if args.baseline_kept_memory:
                from rlhf_ext.cpu_memory import THRESHOLD

                kept = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(THRESHOLD),
                        "MALLOC_TRIM_THRESHOLD_": str(THRESHOLD)}
                add(sub([str(ensure_baseline_venv())] + trl112, env=kept), name="trl 1.12 PPO, kept memory",
                    kind="baseline", precision=precision, layers=0, tree="")
            if args.rloo and precision == "fp32":
                add(sub([sys.executable, str(HERE / "trl116_rloo_baseline.py"), "--model", model_dir,
                         "--iters", str(args.iters)]), name="trl 1.16 RLOO", kind="baseline", precision="fp32",
                    layers=0, tree="")
    print_table(rows, args)
    print_ratios(rows)
    if args.rounds > 1:
        ratio_spread(rows)


if __name__ == "__main__":
    main()
