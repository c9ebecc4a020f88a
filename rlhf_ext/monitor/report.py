"""`rlhf-ext report OUTPUT_DIR`: one self-contained HTML page (PNGs embedded, also written beside it) from what the
monitor recorded in OUTPUT_DIR/monitor/: proxy vs audit reward, KL vs δ with β and the guard's backtracks, length
and EOS rate, ensemble disagreement, the monitor's alarms on the same time axis, and the top-reward samples.
"""

from __future__ import annotations

import argparse
import base64
import functools
import html
import json
import math
import re
import sys
import unicodedata
from pathlib import Path

from ..integrity import CorruptFileError, read_json
from .queue import ReviewQueue, check_fields, read_jsonl

PANELS = ("rewards", "kl", "length", "disagreement")
NUMBER = (int, float)
# What the report reads of each line the monitor writes (monitor/monitor.py); anything else in a line is optional
METRIC = {"iteration": int}
ALARM = {"iteration": int, "detector": str, "value": NUMBER, "threshold": NUMBER, "action": str}
SAMPLE = {"iteration": int, "prompt": str, "text": str, "score": NUMBER, "length": int, "eos": bool}


@functools.cache
def _invisible() -> re.Pattern:
    """The review page's INVISIBLE (static/review.js): characters that print nothing (Unicode's Cf, and the Hangul
    fillers), where a policy can hide text the reward model reads; the ZWJ of emoji sequences is left alone. Python's
    `re` has no \\p{Cf}: the class is built once, when a report is written."""
    cf = "".join(re.escape(chr(c)) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf")
    return re.compile(f"(?:(?!\u200d)[{cf}\u115f\u1160\u3164\uffa0])+")


def _text(s: str) -> str:
    """`s` as escaped HTML, each run of invisible characters as a marker naming them (as the review page shows)."""
    out, pos = [], 0
    for m in _invisible().finditer(s):
        names = list(dict.fromkeys(f"U+{ord(c):04X}" for c in m[0]))
        out += [html.escape(s[pos:m.start()]),
                f'<span class=inv title="Characters that print nothing; the reward model reads them.">⟨{len(m[0])} '
                f'invisible: {" ".join(names[:3])}{" …" if len(names) > 3 else ""}⟩</span>']
        pos = m.end()
    return "".join(out) + html.escape(s[pos:])


def _sample(s: dict) -> str | None:
    problem = check_fields(s, SAMPLE)
    audit = s.get("audit", {})
    if not problem and not (isinstance(audit, dict) and all(isinstance(v, NUMBER) and not isinstance(v, bool)
                                                             for v in audit.values())):
        problem = f'has "audit": {json.dumps(audit)[:40]}, which should be an object of numbers'
    return problem


class EmptyRunError(ValueError):
    """The monitor's files are there but hold no iteration yet: nothing to plot."""


def load_run(output_dir) -> dict:
    mon = Path(output_dir) / "monitor"
    if not (mon / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{mon / 'metrics.jsonl'} does not exist: the report reads what the PPO trainer's "
                                f"monitor writes (PPOConfig(monitor=True), the default). Point to a PPO output_dir.")
    run = {}
    if (mon / "run.json").is_file():
        fix = "Repair it, or delete it for a report without the run's settings (a resumed run writes it again)."
        run = read_json(mon / "run.json", fix)
        if not isinstance(run, dict):
            raise CorruptFileError(mon / "run.json", "is not a JSON object", fix)
    metrics = _dedupe(read_jsonl(mon / "metrics.jsonl", lambda m: check_fields(m, METRIC)))
    if not metrics:
        raise EmptyRunError(f"{mon / 'metrics.jsonl'} holds no iteration yet: the run stopped (or is still) before "
                            f"its first PPO iteration ended. Write the report once an iteration has finished.")
    return {"run": run, "metrics": metrics,
            "alarms": _dedupe(read_jsonl(mon / "alarms.jsonl", lambda a: check_fields(a, ALARM)),
                              key=lambda a: (a["iteration"], a["detector"])),
            # one row per prompt: a collapsed policy's one answer to several prompts is several samples
            "samples": _dedupe(read_jsonl(mon / "samples.jsonl", _sample),
                               key=lambda s: (s["iteration"], s["prompt"], s["text"])),
            "queue": ReviewQueue(output_dir).records()}


def _series(metrics, key):
    pts = [(m["iteration"], m[key]) for m in metrics if isinstance(m.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(ax, xs, ys, **kw):
    """A series; dotted points on a short one, where a line of one point (a 1-iteration run, a value between NaNs)
    draws nothing."""
    return ax.plot(xs, ys, **({"marker": ".", "ms": 5} if len(xs) <= 50 else {}), **kw)


def _dedupe(rows: list[dict], key=lambda r: r.get("iteration")) -> list[dict]:
    """The last record per key, in order (logs written before resumed runs truncated them may repeat iterations)."""
    out = {}
    for r in rows:
        out[key(r)] = r
    return sorted(out.values(), key=lambda r: (r.get("iteration", 0)))


def _label(name: str) -> str:
    """A name from the run's files as a legend label, verbatim: matplotlib reads text between two `$` as mathtext,
    and `$\\foo$` in a detector or audit name made savefig raise (no report at all)."""
    return name.replace("$", r"\$")


def _alarm_marks(ax, alarms):
    """Each detector's first firing as a labelled vertical line; later firings as ticks along the top."""
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("Set1")
    for i, name in enumerate(sorted({a["detector"] for a in alarms})):
        its = sorted({a["iteration"] for a in alarms if a["detector"] == name})
        c = colors(i % 9)
        ax.axvline(its[0], color=c, ls="--", lw=1.2, alpha=0.8, label=_label(f"alarm: {name} (first at {its[0]})"))
        ax.plot(its, [1.0 - 0.03 * i] * len(its), "v", color=c, ms=4, transform=ax.get_xaxis_transform(),
                clip_on=False)


def make_plots(data, out: Path) -> dict[str, Path]:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("The run report draws its curves with matplotlib, which is not installed. Install it with "
                          "`pip install matplotlib` (or `pip install 'rlhf_ext[demo]'`).") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    m, alarms, run = data["metrics"], data["alarms"], data["run"]
    paths = {}

    def panel(name, draw):
        fig, ax = plt.subplots(figsize=(7.5, 3.6))
        draw(ax)
        _alarm_marks(ax, alarms)
        ax.set_xlabel("iteration")
        lo, hi = ax.get_xlim()
        if hi - lo < 2:  # one iteration: whole-number ticks need a range around it
            ax.set_xlim((lo + hi) / 2 - 1, (lo + hi) / 2 + 1)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name], dpi=100)
        plt.close(fig)

    def rewards(ax):
        _plot(ax, *_series(m, "objective/scores"), label="proxy (shaped, aggregated)")
        for k in sorted({k for r in m for k in r if k.startswith("audit/")}):
            _plot(ax, *_series(m, k), label=_label(k))
        ax.set_title("proxy reward vs audit (train rollouts); dashed: first alarm per detector")

    def kl(ax):
        _plot(ax, *_series(m, "objective/kl"), label="rollout KL (estimator)")
        if any("kl/after_update" in r for r in m):
            _plot(ax, *_series(m, "kl/after_update"), label="exact KL after update")
        if run.get("kl_target") and run.get("kl_controller") != "fixed":
            ax.axhline(run["kl_target"], color="k", ls="--", lw=1, label=f"δ = {run['kl_target']}")
        xs, bt = _series(m, "kl/backtracks")
        for x, b in zip(xs, bt):
            if b:
                ax.axvline(x, color="orange", alpha=0.3, lw=2)
        ax2 = ax.twinx()
        _plot(ax2, *_series(m, "objective/beta"), color="gray", ls=":", label="β")
        ax2.set_ylabel("β", color="gray")
        ax.set_ylabel("nats / sequence")
        ax.set_title("KL(π‖π_ref) vs δ; β dotted; orange: guard backtracked")

    def length(ax):
        _plot(ax, *_series(m, "response/length_mean"), label="mean length (tokens)")
        ref = (run.get("reference") or {}).get("length")
        if ref:
            ax.axhline(ref, color="k", ls="--", lw=1, label="reference policy")
        ax2 = ax.twinx()
        _plot(ax2, *_series(m, "response/eos_rate"), color="green", ls=":", label="EOS rate")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("EOS rate", color="green")
        ax.set_title("response length and EOS rate")

    def disagreement(ax):
        if any("rewards/ensemble_std" in r for r in m):
            _plot(ax, *_series(m, "rewards/ensemble_std"), label="ensemble std (normalised members)")
        for k in sorted({k for r in m for k in r if k.startswith("monitor/") and not k.endswith("_alarm")}):
            _plot(ax, *_series(m, k), lw=1, label=_label(k.split("/", 1)[1]))
        ax.set_title("ensemble disagreement and detector statistics")

    for name, fn in zip(PANELS, (rewards, kl, length, disagreement)):
        panel(name, fn)
    return paths


def write_report(output_dir, out_dir=None, top: int = 12) -> Path:
    data = load_run(output_dir)
    out = Path(out_dir or Path(output_dir) / "report")
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(data, out)
    run, m = data["run"], data["metrics"]
    last = m[-1] if m else {}
    esc = html.escape
    imgs = "".join(f'<figure><img alt="{n}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                   f"</figure>" for n, p in plots.items())
    alarm_rows = "".join(f"<tr><td>{a['iteration']}</td><td>{esc(a['detector'])}</td><td>{a['value']:.3g}</td>"
                         f"<td>{'>' if a.get('direction', 'above') == 'above' else '<'} {a['threshold']:.3g}</td>"
                         f"<td>{esc(a['action'])}</td></tr>" for a in data["alarms"])
    by_detector = {}
    for a in data["alarms"]:
        by_detector.setdefault(a["detector"], []).append(a)
    # one line per detector (a detector that keeps firing makes hundreds of rows); every firing below it, folded
    alarm_summary = "".join(
        f"<tr><td>{esc(name)}</td><td>{len(fired)}</td><td>{fired[0]['iteration']}</td><td>{fired[-1]['iteration']}</td>"
        f"<td>{esc(_fmt(_furthest(fired)))}</td></tr>" for name, fired in by_detector.items())
    samples = sorted(data["samples"], key=_top_first)[:top]
    sample_rows = "".join(
        f"<tr><td>{s['iteration']}</td><td>{s['score']:.3f}</td><td>"
        + esc(", ".join(f"{k} {v:.2f}" for k, v in s.get("audit", {}).items())) + f"</td><td>{s['length']}</td>"
        f"<td>{'yes' if s['eos'] else 'no'}</td><td class=p>{_text(s['prompt'][-200:])}</td><td class=t>{_text(s['text'])}</td></tr>"
        for s in samples)
    fixed = run.get("kl_controller") == "fixed"  # a fixed β bounds nothing: its δ is not a bound of this run
    summary = {"iterations": len(m), "kl_controller": run.get("kl_controller"),
               "δ": "none (a fixed β)" if fixed else run.get("kl_target"),
               "aggregation": run.get("aggregation"), "shapers": run.get("shapers"), "members": run.get("members"),
               "last proxy": last.get("objective/scores"), "last KL": last.get("objective/kl"),
               "last length": last.get("response/length_mean"), "alarms": len(data["alarms"]),
               "pairs queued for review": len(data["queue"])}
    summary_rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(_fmt(v))}</td></tr>" for k, v in summary.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>rlhf_ext run report</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;max-width:1500px}}figure{{display:inline-block;margin:4px}}
figure{{width:48%;min-width:600px}}img{{width:100%}}table{{border-collapse:collapse;margin:8px 0}}td,th{{border:1px solid #ccc;padding:4px 8px;
vertical-align:top;text-align:left;font-size:13px}}td.p{{color:#555;max-width:320px}}
td.p,td.t{{white-space:pre-wrap;overflow-wrap:anywhere}}td.t{{min-width:320px}}.inv{{background:#fff1e6;color:#a3471a}}</style></head><body>
<h1>rlhf_ext run report</h1><p>{esc(str(output_dir))}</p>
<table>{summary_rows}</table>{imgs}
<h2>Monitor alarms ({len(data['alarms'])})</h2><table><tr><th>detector</th><th>firings</th><th>first</th><th>last</th>
<th>furthest value</th></tr>{alarm_summary}</table>
<details><summary>every firing ({len(data['alarms'])})</summary><table><tr><th>iteration</th><th>detector</th>
<th>value</th><th>threshold</th><th>action</th></tr>{alarm_rows}</table></details>
<h2>Top-reward samples</h2><p>The highest proxy rewards of the run: reward hacking shows up here first.</p>
<table><tr><th>iteration</th><th>proxy</th><th>audit</th><th>tokens</th><th>ended</th><th>prompt</th><th>response</th></tr>
{sample_rows}</table>
<p>Review flagged pairs: <code>rlhf-ext review {esc(str(output_dir))}</code></p></body></html>"""
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


def _furthest(fired: list[dict]) -> float:
    """The value furthest past its threshold among a detector's firings (the largest, or the smallest for one that
    fires below its threshold)."""
    values = [a["value"] for a in fired if isinstance(a["value"], (int, float)) and math.isfinite(a["value"])]
    if not values:
        return float("nan")
    return min(values) if fired[0].get("direction", "above") == "below" else max(values)


def _top_first(sample: dict) -> tuple:
    """Sort key: the highest score first, NaN last. NaN compares false with everything, so sorting by the bare score
    is no order at all and the top sample can be cut from the table."""
    score = sample["score"]
    return (1, 0.0) if math.isnan(score) else (0, -score)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="rlhf-ext report", description=__doc__.split("\n\n")[0])
    ap.add_argument("output_dir", help="a PPO run's output_dir (holds monitor/)")
    ap.add_argument("--out", help="where to write (default OUTPUT_DIR/report)")
    args = ap.parse_args(argv)
    try:
        path = write_report(args.output_dir, args.out)
    except (FileNotFoundError, CorruptFileError, EmptyRunError) as e:  # each message names the file and the fix
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    print(f"report: {path}")
    return 0
