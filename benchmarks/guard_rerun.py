"""The hard-KL guard before and after the bisecting search, on the reward-hacking benchmark's guarded variants.

    python benchmarks/overoptimization.py run --workers 2 --runs hard_5:0,all:0,hard_5:1,all:1,hard_5:2,all:2
    python benchmarks/guard_rerun.py            # compares outputs/overopt/runs/ with the results file's runs

"Before": the runs in `benchmarks/results/overoptimization.json` (the guard that halved the step, restored, then
halved the distance to π_ref). "After": the same variants and seeds rerun into `--workdir` with today's guard and the
same proxy reward models (their iteration-0 proxy score is printed beside the stored one: equal means the retrained
proxies are the same). Per run: final held-out gold, final held-out KL, and the rollout KL the guard left after each
iteration (`kl/after_update`, mean over iterations, as a share of δ).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def summary(run: dict) -> dict:
    delta = run["spec"]["kl_target"]
    after = [r["kl/after_update"] for r in run["train"] if r.get("kl/after_update") is not None]
    last = max(run["points"], key=lambda p: p["iteration"])
    first = min(run["points"], key=lambda p: p["iteration"])
    return {"gold": last["gold"], "heldout_kl": last["kl"], "budget_used": statistics.mean(after) / delta,
            "proxy_at_0": first["proxy"], "iterations": len(run["train"])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "overoptimization.json"))
    ap.add_argument("--workdir", default=str(ROOT / "outputs" / "overopt"))
    ap.add_argument("--variants", default="hard_5,all")
    ap.add_argument("--json", help="write the rows here as well")
    args = ap.parse_args(argv)
    before = {(r["variant"], r["seed"]): r for r in json.loads(Path(args.results).read_text())["runs"]}
    rows = []
    for variant in args.variants.split(","):
        for path in sorted((Path(args.workdir) / "runs").glob(f"{variant}__s*.json")):
            new = json.loads(path.read_text())
            if not new.get("done") or (variant, new["seed"]) not in before:
                continue
            b, a = summary(before[(variant, new["seed"])]), summary(new)
            rows.append({"variant": variant, "seed": new["seed"], "before": b, "after": a})
    if not rows:
        ap.error(f"no finished rerun of {args.variants} in {Path(args.workdir) / 'runs'} that {args.results} also "
                 f"holds: run `python benchmarks/overoptimization.py run --runs <variant:seed,…>` first")
    print("| run | proxy at it. 0 (stored / rerun) | final gold before → after | final held-out KL | rollout KL "
          "after the guard, mean share of δ |\n|---|---|---|---|---|")
    for r in rows:
        b, a = r["before"], r["after"]
        print(f"| {r['variant']}:{r['seed']} | {b['proxy_at_0']:+.4f} / {a['proxy_at_0']:+.4f} | {b['gold']:+.3f} → "
              f"{a['gold']:+.3f} | {b['heldout_kl']:.2f} → {a['heldout_kl']:.2f} | {b['budget_used']:.2f} → "
              f"{a['budget_used']:.2f} |")
    for variant in args.variants.split(","):
        mine = [r for r in rows if r["variant"] == variant]
        if len(mine) > 1:
            def ms(key, side):
                xs = [r[side][key] for r in mine]
                return f"{statistics.mean(xs):+.3f} ± {statistics.stdev(xs):.3f}"
            print(f"{variant} ({len(mine)} seeds): gold {ms('gold', 'before')} → {ms('gold', 'after')}; "
                  f"share of δ used {ms('budget_used', 'before')} → {ms('budget_used', 'after')}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, allow_nan=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
