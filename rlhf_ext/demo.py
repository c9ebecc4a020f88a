"""The main job, offline on the embedded default: reward ensemble → PPO (hard KL + length penalty + uwo) →
report before/after on held-out prompts and on transfer prompts never trained on (gold, per-sentence sentiment, raw
VADER, length, EOS rate, distinct-2, repetition, KL vs δ) and a plot.

PPO's defaults are the reward-hacking benchmark's recommended configuration (`all` in
benchmarks/overoptimization.py): uwo aggregation, hard KL δ=5 (β starts at 0.01), a linear length penalty and a
missing-EOS penalty. The reward model is K=4 heads with length de-correlation 0.2, trained on the frozen base
(`heads_only`, response pooling): unlike the benchmark's LoRA-tuned proxies, it tracks per-sentence sentiment on the
policy's own answers, transfer prompts included (README, demo section).

    rlhf-ext demo [--iterations 16] [--output-dir outputs/demo] [--resume]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "overoptimization.json"


def lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def reward_config(out: Path, args):
    import torch

    from .reward.config import RewardEnsembleConfig

    return RewardEnsembleConfig(
        str(out), ensemble_size=args.ensemble_size, ensemble_mode="heads", num_train_epochs=args.reward_epochs,
        heads_only=args.reward_heads_only, pooling=args.reward_pooling, weight_decay=0.1 if args.reward_heads_only else 0.0,
        # LoRA on the top layers + the frozen-prefix cache: epochs after the first run only those layers (heads only:
        # the adapter stays at zero, so one layer is enough and every layer below it is computed once per text)
        lora_top_layers=1 if args.reward_heads_only else args.lora_layers, cache_frozen_layers=True,
        per_device_train_batch_size=16, per_device_eval_batch_size=32, learning_rate=args.reward_lr, max_length=160,
        length_decorrelation_coef=args.length_decorrelation, logging_steps=8, save_strategy="no",
        eval_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(), seed=args.seed,
        normalization_samples=128,
    )


def train_reward(out: Path, data: Path, args, cfg=None) -> dict:
    from .data import load_split

    from .reward.trainer import RewardEnsembleTrainer

    cfg = reward_config(out, args) if cfg is None else cfg
    trainer = RewardEnsembleTrainer(
        MODEL, args=cfg, train_dataset=load_split(str(data), "train", "preferences"),
        eval_dataset=load_split(str(data), "test", "preferences"),
        peft_config=lora(),
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(out))
    return metrics


def ppo_config(out: Path, args):
    import torch

    from .ppo.config import PPOConfig

    return PPOConfig(
        str(out), kl_controller="hard", kl_target=args.kl_target, init_kl_coef=args.beta, aggregation="uwo",
        aggregation_kwargs={"lam": 1.0}, shapers=[{"name": "linear", "alpha": args.length_alpha, "free_tokens": 24},
                                                  {"name": "missing_eos", "penalty": args.eos_penalty}]
        + ([{"name": "batch_novelty", "alpha": args.novelty_alpha}] if args.novelty_alpha else []),
        per_device_train_batch_size=args.batch_size, max_completion_length=48, temperature=1.0, num_ppo_epochs=4,
        learning_rate=args.learning_rate, value_head_init=args.value_head_init, max_steps=args.iterations,
        save_steps=max(1, args.iterations // 2),
        use_cpu=not torch.cuda.is_available(), seed=args.seed, logging_steps=1, lora_top_layers=args.lora_layers,
        # a demo run that does not resume trains from the beginning (resume_point says so): it replaces the earlier
        # run's checkpoints and monitor log instead of being refused after stage 1 (the review decisions are kept)
        overwrite_output_dir=True,
    )


def run_ppo(out: Path, data: Path, reward_path: Path, args, cfg=None):
    import torch

    from .data import load_split
    from .sentiment import distinct_n, gold_judge, repetition_judge, sentiment_judge, vader_judge

    from .ppo.trainer import PPOTrainer

    vader = vader_judge()
    cfg = ppo_config(out, args) if cfg is None else cfg
    trainer = PPOTrainer(
        MODEL, reward_funcs=[str(reward_path)], args=cfg, train_dataset=load_split(str(data), "train", "prompts"),
        peft_config=lora(),
        audit_funcs=[vader],
    )
    judges = {"gold": gold_judge(trainer.tokenizer.eos_token_id), "sentiment": sentiment_judge(), "vader": vader,
              "rep4": repetition_judge(4)}
    # held-out prompts of the training family, and the transfer prompts (other topics and phrasings, never trained on)
    splits = {"heldout": load_split(str(data), "test", "prompts"), "transfer": load_split(str(data), "transfer", "prompts")}
    # each prompt sampled eval_samples times, so a change can be told from sampling noise (paired_change)
    splits = {k: v.select([i for i in range(min(len(v), args.eval_prompts)) for _ in range(args.eval_samples)])
              for k, v in splits.items()}

    def measure(adapters):
        res = {}
        for name, ds in splits.items():
            torch.manual_seed(args.seed)  # the same draws before and after
            r = trainer.evaluate_policy(ds, judges, adapters=adapters, batch_size=16)
            res[name] = {**r, "distinct2_mean": distinct_n(r["samples"]["texts"], 2)}
        return res

    before = measure(adapters=False)
    resumed = resume_point(out, args.resume)
    history = trainer.train(resume_from_checkpoint=resumed)
    after = measure(adapters=True)
    trainer.save_model(str(out / "policy"))
    return trainer, history, before, after, resumed


def resume_point(ppo_dir: Path, resume: bool) -> str | None:
    """The newest complete checkpoint of `ppo_dir` when `resume` (a killed demo continues from it; a finished one
    trains no further and is only evaluated again), else None — saying so when a checkpoint is left unused."""
    from .ppo.checkpoint import newest_complete_checkpoint

    found = newest_complete_checkpoint(ppo_dir)  # None for a folder that does not exist yet
    if resume:
        print(f"      resuming PPO from {found}" if found else f"      --resume: no complete checkpoint in {ppo_dir}; "
              f"PPO starts from the beginning")
        return found
    if found:
        print(f"      {ppo_dir} holds {Path(found).name} from an earlier run: training again from the beginning, "
              f"replacing it (--resume would continue from it)")
    return None


def plot(history, before, after, kl_target, path: Path):
    import torch

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = range(1, len(history) + 1)
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot(it, [h["objective/scores"] for h in history], label="proxy (ensemble uwo, shaped)")
    ax[0].plot(it, [h.get("audit/gold_vader", float("nan")) for h in history], label="raw VADER (audit)")
    ax[0].set_title("reward per iteration (train rollouts)")
    ax[0].legend()
    ax[1].plot(it, [h.get("kl/after_update", float("nan")) for h in history], label="KL after update (exact)")
    ax[1].plot(it, [h["objective/kl"] for h in history], label="rollout KL (k1)", alpha=0.6)
    ax[1].axhline(kl_target, color="r", ls="--", label="δ")
    ax[1].set_title("KL(π‖π_ref), nats / sequence")
    ax[1].legend()
    labels = ["gold", "length / 48", "KL / δ"]
    before, after = before["heldout"], after["heldout"]
    b = [before["gold_mean"], before["length_mean"] / 48, before["kl_mean"] / kl_target]
    a = [after["gold_mean"], after["length_mean"] / 48, after["kl_mean"] / kl_target]
    x = torch.arange(3).float()
    ax[2].bar(x - 0.2, b, 0.4, label="before")
    ax[2].bar(x + 0.2, a, 0.4, label="after")
    ax[2].set_xticks(x.tolist(), labels)
    ax[2].set_title("held-out prompts")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def check_options(ap: argparse.ArgumentParser, args) -> None:
    """Refuse (exit 2, naming the flag) a value that would fail or train nonsense in a later stage: stage 2's
    settings fail only after stage 1 has trained for minutes."""
    import math

    for flag in ("eval_prompts", "eval_samples", "iterations", "batch_size", "ensemble_size"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be ≥ 1, got {getattr(args, flag)}")
    if args.lora_layers < 0:
        ap.error(f"--lora-layers must be ≥ 0 (0 = every layer), got {args.lora_layers}")
    if args.ensemble_size < 2:  # PPO combines the members with uwo, which PPOTrainer refuses for one member
        ap.error(f"--ensemble-size must be ≥ 2: the demo's PPO aggregates its reward members with uwo, got "
                 f"{args.ensemble_size}")
    if not 0 <= args.seed < 2**32:  # transformers' set_seed refuses others, inside the first trainer
        ap.error(f"--seed must be in [0, 2**32 - 1], got {args.seed}")
    # a rate of 0 trains nothing; a KL bound of 0 allows no change; epochs scale the reward model's steps
    for flag in ("kl_target", "learning_rate", "reward_lr", "reward_epochs"):
        v = getattr(args, flag)
        if not (math.isfinite(v) and v > 0):
            ap.error(f"--{flag.replace('_', '-')} must be a finite number > 0, got {v}")
    # coefficients of a penalty (0 = off): a negative one rewards what it should charge
    for flag in ("beta", "length_alpha", "eos_penalty", "novelty_alpha", "length_decorrelation"):
        v = getattr(args, flag)
        if not (math.isfinite(v) and v >= 0):
            ap.error(f"--{flag.replace('_', '-')} must be a finite number ≥ 0 (0 = off), got {v}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="rlhf-ext demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--output-dir", default="outputs/demo")
    ap.add_argument("--data-dir", default=None, help="folder of preferences_*.jsonl / prompts_*.jsonl (default: the "
                    "shipped sentiment data)")
    ap.add_argument("--iterations", type=int, default=16)
    ap.add_argument("--eval-prompts", type=int, default=40, help="prompts per split (held-out, transfer) for the "
                    "before/after report")
    ap.add_argument("--eval-samples", type=int, default=2, help="samples per prompt in the before/after report")
    ap.add_argument("--ensemble-size", type=int, default=4)
    ap.add_argument("--kl-target", type=float, default=5.0)
    ap.add_argument("--beta", type=float, default=0.01, help="initial KL penalty coefficient (the hard controller adapts it)")
    ap.add_argument("--length-alpha", type=float, default=0.05)
    ap.add_argument("--eos-penalty", type=float, default=1.0, help="the missing_eos shaper's charge for an answer "
                    "that does not end within the token budget (0 = off)")
    ap.add_argument("--novelty-alpha", type=float, default=0.0, help="the batch_novelty shaper's α: charge the share "
                    "of an answer's token pairs that other answers in the batch use too (0 = off)")
    ap.add_argument("--length-decorrelation", type=float, default=0.2)
    ap.add_argument("--learning-rate", type=float, default=2e-3)
    ap.add_argument("--value-head-init", choices=("normal", "zeros"), default="zeros", help="how the critic's "
                    "value head starts (PPOConfig.value_head_init; zeros: on this task a random head's baseline stays "
                    "worse than none through the run and sentiment rose less: README, demo section)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32, help="prompts per PPO iteration (at 8 the batch-to-batch "
                    "reward noise hides the sentiment signal: README, demo section)")
    ap.add_argument("--reward-heads-only", action=argparse.BooleanOptionalAction, default=True,
                    help="train the reward heads on the frozen base model (a linear probe; --no-reward-heads-only: "
                    "LoRA on the top --lora-layers layers, as the benchmark's proxies)")
    ap.add_argument("--reward-pooling", choices=("response", "mean", "last"), default="response")
    ap.add_argument("--reward-lr", type=float, default=3e-3)
    ap.add_argument("--reward-epochs", type=float, default=3)
    ap.add_argument("--lora-layers", type=int, default=8, help="LoRA on the last N of 30 layers (0 = all)")
    ap.add_argument("--reuse-reward", action="store_true", help="skip stage 1 if the reward artifact exists")
    ap.add_argument("--resume", action="store_true", help="continue PPO from the newest complete checkpoint in "
                    "OUTPUT_DIR/ppo (a killed demo picks up where it stopped; a finished one is evaluated again) and "
                    "reuse the reward model if it is there; same options as the run that wrote it")
    for action in ap._actions:  # every default in --help (the README's output paths follow --output-dir's)
        if action.option_strings and not any(action.default is x for x in (None, False, argparse.SUPPRESS)) \
                and "default" not in (action.help or ""):
            action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"
    args = ap.parse_args(argv)
    args.reuse_reward = args.reuse_reward or args.resume
    check_options(ap, args)
    from .data import SHIPPED

    out, data = Path(args.output_dir), Path(args.data_dir) if args.data_dir else SHIPPED / "sentiment"
    reward_path = out / "reward"
    reuse = args.reuse_reward and (reward_path / "rlhf_ext_reward.json").is_file()
    needed = [f"prompts_{split}.jsonl" for split in ("train", "test", "transfer")]
    if not reuse:  # the reward model is trained here: its pairs too
        needed += [f"preferences_{split}.jsonl" for split in ("train", "test")]
    missing = [name for name in needed if not (data / name).is_file()]
    if missing:
        ap.error(f"--data-dir {data} lacks {', '.join(missing)} (the demo reads prompts_{{train,test,transfer}}.jsonl "
                 f"and, to train its reward model, preferences_{{train,test}}.jsonl; the shipped set in that layout: "
                 f"{SHIPPED / 'sentiment'})")
    try:  # every rule of the two stages' configs, before stage 1 spends minutes on the reward ensemble
        ppo_cfg = ppo_config(out / "ppo", args)
        reward_cfg = None if reuse else reward_config(reward_path, args)
    except (ValueError, TypeError) as e:
        ap.error(str(e))
    from transformers import AutoConfig

    from .models import resolve_model_path

    n_layers = AutoConfig.from_pretrained(resolve_model_path(MODEL)).num_hidden_layers
    if args.lora_layers > n_layers:  # PPOTrainer would refuse it, but only after stage 1
        ap.error(f"--lora-layers {args.lora_layers}: the model has {n_layers} layers; use 1…{n_layers} (0 = all)")
    t0 = time.time()
    trunk = "frozen base (heads only)" if args.reward_heads_only else f"LoRA on the top {args.lora_layers} layers"
    print(f"[1/2] reward ensemble (K={args.ensemble_size} heads, {trunk}, {args.reward_pooling} pooling, length "
          f"de-correlation {args.length_decorrelation}) on {data}/preferences_train.jsonl")
    if reuse:
        # its held-out metrics: the demo's own record, or the reward recipe's (an artifact trained by the recipe)
        saved = [f for f in (out / "reward_metrics.json", reward_path / "eval_results.json") if f.is_file()]
        rm = json.loads(saved[0].read_text()) if saved else {}
    else:
        rm = train_reward(reward_path, data, args, cfg=reward_cfg)
        (out / "reward_metrics.json").write_text(json.dumps(rm, indent=2))
    t1 = time.time()
    print(f"[2/2] PPO: hard KL (δ={args.kl_target}), linear length penalty, uwo aggregation, "
          f"{args.iterations} iterations of {args.batch_size} prompts")
    trainer, history, before, after, resumed = run_ppo(out / "ppo", data, reward_path, args, cfg=ppo_cfg)
    t2 = time.time()
    plot(history, before, after, args.kl_target, out / "demo.png")
    kl_after = [h.get("kl/after_update", float("nan")) for h in history]
    summary = {
        "reward_model": {k: rm.get(f"eval_{k}") for k in ("accuracy_ensemble", "accuracy_member_0", "ece",
                                                           "length_pearson", "ensemble_disagreement")},
        **{f"{split}_{when}": {k: res[split][f"{k}_mean"] for k, _ in MEASURES}
           for when, res in (("before", before), ("after", after)) for split in ("heldout", "transfer")},
        "kl_target": args.kl_target, "max_train_kl_after_update": max(kl_after),
        "minutes": {"reward": (t1 - t0) / 60, "ppo": (t2 - t1) / 60, "total": (t2 - t0) / 60},
        # after − before per measure, ± its standard error over prompts (paired: the same prompts, before and after)
        "change": {split: {**{k: paired_change(before[split], after[split], k) for k in CHANGE_KEYS},
                           "distinct2": distinct_change(before[split]["samples"], after[split]["samples"])}
                   for split in ("heldout", "transfer")},
        "eval": {"prompts": args.eval_prompts, "samples_per_prompt": args.eval_samples},
        "options": {k: v for k, v in vars(args).items() if k not in ("output_dir", "data_dir", "resume")},
        "resumed_from": resumed and Path(resumed).name,  # then "minutes" count only what this run did
        "examples_after": after["heldout"]["samples"]["texts"][:: args.eval_samples][:5],
        "transfer_examples_after": after["transfer"]["samples"]["texts"][:: args.eval_samples][:5],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from .monitor.report import write_report

    report = write_report(out / "ppo")
    print("\n=== rlhf_ext demo: before → after PPO, on held-out and on transfer prompts ===")
    rm_row = {k: "n/a" if v is None else f"{v:.3f}" for k, v in summary["reward_model"].items()}
    print(f"reward model: held-out pairwise accuracy {rm_row['accuracy_ensemble']}, "
          f"reward-length Pearson {rm_row['length_pearson']}")
    print(results_table(summary))
    print(change_lines(summary))
    print(f"KL(π‖π_ref) held-out   {after['heldout']['kl_mean']:.3f} nats/seq  (δ = {args.kl_target}); "
          f"max over training iterations {max(kl_after):.3f}")
    print_benchmark_reference()
    print(f"time: {summary['minutes']['total']:.1f} min   plot: {out / 'demo.png'}   summary: {out / 'summary.json'}")
    from .monitor.queue import ReviewQueue

    pending = ReviewQueue(out / "ppo").pending_count()  # named only where the monitor queued something
    print(f"run report: {report}   " + (f"{pending} flagged pair(s) to review: rlhf-ext review {out / 'ppo'}"
                                        if pending else "no sample flagged for review"))
    return summary


# what the demo reports, before and after, on held-out and transfer prompts: (key, label)
MEASURES = (("gold", "gold (length-robust)"), ("sentiment", "per-sentence sentiment"), ("vader", "raw VADER compound"),
            ("length", "mean length (tokens)"), ("eos", "EOS rate"), ("distinct2", "distinct-2"),
            ("rep4", "repeated-4-gram share"), ("kl", "KL(π‖π_ref), nats/seq"))


CHANGE_KEYS = ("gold", "sentiment", "vader", "length", "eos", "rep4")


def change_lines(summary: dict) -> str:
    """after − before ± standard error over prompts, for the measures that are scored per sample."""
    lines = [f"{'change (after − before)':24s}{'held-out':>22s}{'transfer':>24s}   (± SE over prompts)"]
    for key, label in MEASURES:
        if key in summary["change"]["heldout"]:
            cells = [summary["change"][split][key] for split in ("heldout", "transfer")]
            lines.append(f"{label:24s}" + "".join(f"{m:>+14.3f} ± {se:.3f}  " for m, se in cells))
    return "\n".join(lines)


def _by_prompt(samples: dict, key: str) -> dict[str, list]:
    """`evaluate_policy` samples' `key` column grouped by prompt (a prompt's samples are not independent)."""
    groups: dict[str, list] = {}
    for p, v in zip(samples["prompts"], samples[key]):
        groups.setdefault(str(p), []).append(v)
    return groups


def paired_change(before: dict, after: dict, key: str) -> tuple[float, float]:
    """Mean change of judge `key` from `before` to `after` (`evaluate_policy` samples on the same prompts) and its
    standard error over prompts: per prompt, the mean over its samples after minus before; the prompts are the
    independent units (samples of one prompt are correlated)."""
    import statistics

    def per_prompt(samples):
        return {p: sum(v) / len(v) for p, v in _by_prompt(samples, key).items()}

    b, a = per_prompt(before["samples"]), per_prompt(after["samples"])
    diffs = [a[p] - b[p] for p in b if p in a]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return sum(diffs) / len(diffs), se


def distinct_change(before: dict, after: dict, n: int = 2, draws: int = 400, seed: int = 0) -> tuple[float, float]:
    """Change of distinct-n (a corpus measure: no per-sample score to average) from `before` to `after`, and its
    standard error by a paired bootstrap over prompts: each draw resamples the prompts with replacement and recomputes
    distinct-n of both runs' answers to the same draw (every sample of a drawn prompt)."""
    import random
    import statistics

    from .sentiment import distinct_n

    b, a = _by_prompt(before, "texts"), _by_prompt(after, "texts")
    keys = [p for p in b if p in a]

    def change(ks):
        return distinct_n([t for k in ks for t in a[k]], n) - distinct_n([t for k in ks for t in b[k]], n)

    rng = random.Random(seed)
    boot = [change(rng.choices(keys, k=len(keys))) for _ in range(draws)]
    return change(keys), statistics.stdev(boot) if len(keys) > 1 else float("nan")


def results_table(summary: dict) -> str:
    """Before → after on the held-out prompts and on the transfer prompts, one row per measure."""
    lines = [f"{'':24s}{'held-out prompts':>22s}{'transfer prompts':>24s}",
             f"{'':24s}{'before':>10s}{'after':>12s}{'before':>12s}{'after':>12s}"]
    for key, label in MEASURES:
        cells = [summary[f"{split}_{when}"][key] for split in ("heldout", "transfer") for when in ("before", "after")]
        lines.append(f"{label:24s}" + "".join(f"{v:>+10.3f}  " if key in ("gold", "sentiment", "vader")
                                               else f"{v:>10.2f}  " for v in cells))
    return "\n".join(lines)


def print_benchmark_reference(path: Path = BENCHMARK):
    """Plain PPO beside the mitigated configuration, from the reward-hacking benchmark's committed results."""
    if not path.is_file():
        print("(plain-PPO reference: run `python benchmarks/overoptimization.py` for the benchmark's numbers)")
        return
    bench = json.loads(path.read_text())
    rows, iterations = bench["summary"], bench.get("settings", {}).get("iterations", "?")
    print(f"reward-hacking benchmark ({path.name}; same task, held-out gold, mean over seeds):")
    for name, label in (("plain", "plain PPO (K=1, fixed β, no shaping)"), ("all", "recommended configuration")):
        r = rows.get(name)
        if r:
            print(f"  {label:38s} gold {r['best_gold'] - r['gain']:+.3f} at start, best {r['best_gold']:+.3f} (KL "
                  f"{r['kl_at_best']:.1f}), final {r['final_gold']:+.3f}; final length {r['final_length']:.1f}, EOS rate "
                  f"{r['final_eos']:.2f}  [{r['seeds']} seed{'s' * (r['seeds'] != 1)}, {iterations} iterations]")


if __name__ == "__main__":
    main()
