"""The report from finished runs: per variant, mean ± std over seeds of the best held-out gold, its KL, the final
length, the peak-to-end drop, transfer, the monitor's first alarm and the human loop's cost (`summarize`; the oracle
— PPO on the gold — is no upper bound at this budget, so no "fraction of the oracle's gain" is reported; `gao_fit`
draws the curves); written as strict JSON with the command, versions and machine line (`report`), markdown tables
(`markdown_table`, `loop_table`) and a three-panel plot (`plot`)."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from pathlib import Path

from rlhf_ext.integrity import write_text_atomic

from .variants import HEADLINE, VARIANTS, settings


def machine_line() -> str:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?") \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({cpu}), torch threads "
            f"{torch.get_num_threads()}, {'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")


def versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "trl", "peft", "accelerate", "datasets",
                                       "vaderSentiment", "rlhf_ext")}


def gao_fit(points):
    """Least-squares fit of gold − gold₀ = d(α − β log d) (Gao et al. 2022, RL form) over d = √KL > 0."""
    import numpy as np

    base = points[0]["gold"]
    d = np.array([p["sqrt_kl"] for p in points[1:] if p["sqrt_kl"] > 1e-3])
    y = np.array([p["gold"] - base for p in points[1:] if p["sqrt_kl"] > 1e-3])
    if len(d) < 2:
        return None
    A = np.stack([d, -d * np.log(d)], 1)
    (alpha, beta), *_ = np.linalg.lstsq(A, y, rcond=None)
    return float(alpha), float(beta)


def strict_json(obj) -> str:
    """JSON that strict parsers (browsers, jq) accept: NaN/inf (a column with no value, e.g. the first length alarm of
    a run that raised none) become null."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=1, allow_nan=False)


def summarize(records) -> dict:
    """Per variant: mean ± std over seeds of the best held-out gold, its KL, final length, peak-to-end drop."""
    import statistics

    by_variant = {}
    for r in records:
        by_variant.setdefault(r["variant"], []).append(r)
    rows = {}
    for name, runs in by_variant.items():
        per_seed = []
        for r in runs:
            pts = r["points"]
            best = max(pts, key=lambda p: p["gold"])
            end = pts[-1]
            gain = best["gold"] - pts[0]["gold"]
            tr_pts = [p for p in pts if "transfer" in p]
            per_seed.append({
                "best_gold": best["gold"], "best_iteration": best["iteration"], "kl_at_best": best["kl"],
                "final_gold": end["gold"], "drop": best["gold"] - end["gold"], "final_length": end["length"],
                "final_eos": end["eos"], "final_kl": end["kl"], "final_vader": end["vader"],
                "final_sentiment": end["sentiment"],
                "gain": gain,
                "transfer_start": tr_pts[0]["transfer"]["gold"] if tr_pts else float("nan"),
                "transfer_end": tr_pts[-1]["transfer"]["gold"] if tr_pts else float("nan"),
                "transfer_sentiment_start": tr_pts[0]["transfer"].get("sentiment", float("nan")) if tr_pts else float("nan"),
                "transfer_sentiment_end": tr_pts[-1]["transfer"].get("sentiment", float("nan")) if tr_pts else float("nan"),
                "transfer_eos_end": tr_pts[-1]["transfer"]["eos"] if tr_pts else float("nan"),
                "minutes": r["train_seconds"] / 60,
                "length_alarm_at": min((a["iteration"] for a in r.get("alarms", []) if a["detector"] == "length_drift"),
                                       default=float("nan")),
                "alarms": float(len(r.get("alarms", []))),
                **_loop_fields(r)})
        agg = {}
        for k in {k: None for s in per_seed for k in s}:
            # skipped: a seed whose length alarm never fired (NaN), a run without the loop's fields
            vals = [s[k] for s in per_seed if k in s and not math.isnan(s[k])]
            agg[k] = statistics.mean(vals) if vals else float("nan")
            agg[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        agg["seeds"] = len(per_seed)
        rows[name] = agg
    return rows


def _loop_fields(r) -> dict:
    """The human loop's cost: labels, flipped decisions, rounds, review + retraining minutes per round (none for a
    run without the loop; a round's `paused_seconds`, written by hand when its processes were stopped, not counted)."""
    loop = r.get("loop")
    if not loop:
        return {}
    rounds = loop["rounds"]
    seconds = [x["seconds"] - x.get("paused_seconds", 0) for x in rounds]
    return {"labels": float(loop["labels"]), "flipped": float(loop["flipped"]), "rounds": float(len(rounds)),
            "first_round_at": float(rounds[0]["iteration"]) if rounds else float("nan"),
            "round_minutes": sum(seconds) / 60 / len(rounds) if rounds else float("nan")}


def loop_table(rows) -> str:
    """The human loop against the runs without it: the benchmark's axes, then what the loop cost."""
    order = [n for n in VARIANTS if n in rows and ("loop" in VARIANTS[n] or n in ("plain", "all"))]
    lines = ["| variant | seeds | final gold | best gold | final sentiment (no EOS term) | final length | final EOS | "
             "final KL | transfer gold end | transfer sentiment end | labels (flipped) | rounds (first at it) | "
             "review + retrain min / round | train min |", "|" + "---|" * 14]
    for n in order:
        r = rows[n]

        def pm(k, fmt):
            return format(r[k], fmt) + (f" ± {format(r[k + '_std'], fmt.lstrip('+'))}" if r["seeds"] > 1 else "")

        cost = "— | — | —"
        if "labels" in r:  # a loop run whose alarms never queued has no first round and no round time
            first = f"it {r['first_round_at']:.0f}" if math.isfinite(r["first_round_at"]) else "none"
            per = f"{r['round_minutes']:.1f}" if math.isfinite(r["round_minutes"]) else "—"
            cost = f"{r['labels']:.0f} ({r['flipped']:.1f}) | {r['rounds']:.1f} ({first}) | {per}"
        lines.append(f"| {n} | {r['seeds']} | {pm('final_gold', '+.3f')} | {pm('best_gold', '+.3f')} | "
                     f"{pm('final_sentiment', '+.3f')} | {pm('final_length', '.1f')} | {pm('final_eos', '.2f')} | "
                     f"{pm('final_kl', '.1f')} | {pm('transfer_end', '+.3f')} | {pm('transfer_sentiment_end', '+.3f')} | "
                     f"{cost} | {r['minutes']:.0f} |")
    return "\n".join(lines)


def markdown_table(rows) -> str:
    order = [n for n in VARIANTS if n in rows]
    lines = ["| variant | seeds | best held-out gold | KL at best | final gold | drop peak→end | final length | "
             "final EOS rate | final sentiment (no EOS term) | final raw VADER | "
             "transfer gold start → end | transfer sentiment start → end | first length alarm | train min |",
             "|" + "---|" * 14]

    def alarm(name, at):  # TRL's trainers have no monitor
        return "n/a" if VARIANTS[name]["trainer"] != "ppo" else "—" if math.isnan(at) else f"it {at:.0f}"

    def pm(r, k, fmt):
        s = format(r[k], fmt)
        return s + (f" ± {format(r[k + '_std'], fmt.lstrip('+'))}" if r["seeds"] > 1 else "")

    for n in order:
        r = rows[n]
        lines.append(f"| {n} | {r['seeds']} | {pm(r, 'best_gold', '+.3f')} | {pm(r, 'kl_at_best', '.1f')} | "
                     f"{pm(r, 'final_gold', '+.3f')} | {pm(r, 'drop', '.3f')} | {pm(r, 'final_length', '.1f')} | "
                     f"{r['final_eos']:.2f} | {pm(r, 'final_sentiment', '+.3f')} | {r['final_vader']:+.3f} | "
                     f"{r['transfer_start']:+.3f} → {r['transfer_end']:+.3f} | "
                     f"{r['transfer_sentiment_start']:+.3f} → {r['transfer_sentiment_end']:+.3f} | "
                     f"{alarm(n, r['length_alarm_at'])} | "
                     f"{r['minutes']:.0f} |")
    return "\n".join(lines)


def plot(records, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = {}
    for r in records:
        groups.setdefault(r["variant"], []).append(r)
    fig, ax = plt.subplots(1, 3, figsize=(19, 5.5))
    cmap = plt.get_cmap("tab20")
    for i, (name, runs) in enumerate(sorted(groups.items())):
        c = cmap(i % 20)
        lw = 2.5 if name in HEADLINE or name == "oracle" else 1.0
        for j, r in enumerate(runs):
            pts = r["points"]
            lab = name if j == 0 else None
            ax[0].plot([p["sqrt_kl"] for p in pts], [p["gold"] for p in pts], "o", color=c, ms=3, alpha=0.6)
            ax[1].plot([p["gold"] for p in pts], [p["proxy"] for p in pts], "-o", color=c, ms=3, lw=lw * 0.6, label=lab)
            ax[2].plot([p["iteration"] for p in pts], [p["length"] for p in pts], "-", color=c, lw=lw, label=lab)
        fit = gao_fit(runs[0]["points"])
        if fit:
            d = np.linspace(0.05, max(p["sqrt_kl"] for r in runs for p in r["points"]) + 1e-3, 100)
            ax[0].plot(d, runs[0]["points"][0]["gold"] + fit[0] * d - fit[1] * d * np.log(d), "-", color=c, lw=lw,
                       label=f"{name} (fit α={fit[0]:.2f}, β={fit[1]:.2f})")
    ax[0].set_xlabel("d = √KL(π‖π_ref), held-out, nats^½")
    ax[0].set_ylabel("gold (held-out)")
    ax[0].set_title("gold vs distance from the reference (fit: d(α − β log d))")
    ax[0].legend(fontsize=6, ncol=2)
    ax[1].set_xlabel("gold")
    ax[1].set_ylabel("proxy (plain RM, normalised)")
    ax[1].set_title("proxy vs gold")
    ax[2].set_xlabel("iteration")
    ax[2].set_ylabel("mean response length (tokens)")
    ax[2].set_title("length vs iterations")
    ax[2].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(args):
    workdir = Path(args.workdir)
    records = [json.loads(p.read_text()) for p in sorted((workdir / "runs").glob("*.json"))]
    records = [r for r in records if r["points"] and (r.get("done") or args.partial)]
    if args.runs:  # a report of some runs of a workdir (e.g. one scenario beside the benchmark's own runs)
        wanted = set(args.runs.split(","))
        records = [r for r in records if f"{r['variant']}:{r['seed']}" in wanted]
    for spec in args.compare or []:  # "results.json:plain,all": finished runs of another report, side by side
        path, _, names = spec.rpartition(":")
        records += [r for r in json.loads(Path(path).read_text())["runs"] if r["variant"] in names.split(",")]
    if not records:
        sys.exit(f"No finished runs in {workdir / 'runs'}; run `python benchmarks/overoptimization.py run` first.")
    rows = summarize(records)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join(["python", "benchmarks/overoptimization.py", *sys.argv[1:]]),
               "versions": versions(), "machine": machine_line(), "settings": settings(args.quick, args.prompts),
               "gold": "rlhf_ext.sentiment.gold_score: mean per-sentence VADER compound − 1·[no EOS] − "
                       "repeated-4-gram fraction", "summary": rows, "runs": records}
    write_text_atomic(out, strict_json(payload))  # a committed results file: never torn
    table = markdown_table(rows)
    if any(r.get("loop") for r in records):
        table += "\n\nThe human loop:\n\n" + loop_table(rows)
    out.with_suffix(".md").write_text(table + "\n")
    plot(records, out.with_suffix(".png"))
    print(table)
    print(f"\nwrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return payload
