"""Reward hacking, measured: held-out gold against the distance from the reference, for plain PPO and every
mitigation rlhf_ext offers, on the same budget (the Gao et al. 2022 / Coste et al. 2023 protocol at small scale).

    python benchmarks/overoptimization.py rms                   # train the proxy reward models (once, ~2.5 h)
    python benchmarks/overoptimization.py run --workers 2       # every variant × seed; resumable, checkpointed
    python benchmarks/overoptimization.py report                # JSON + plot + markdown table from finished runs
    python benchmarks/overoptimization.py --quick               # tiny model, ~1 minute: the smoke test (CI)

    # wider training prompts (templates + the open-ended family), same proxies; results in overoptimization_wide.*
    python benchmarks/overoptimization.py run --prompts wide --rm-dir outputs/overopt/rms --workers 2 \
        --runs plain:0,all:0,plain:1,all:1,plain:2,all:2
    python benchmarks/overoptimization.py report --prompts wide

Setting: SmolLM2-135M-Instruct policy (LoRA r=16 on q/v of the top 8 layers), the shipped sentiment task, proxy
reward models trained on its labels (which carry a planted length bias and 10 % label noise), the length-robust gold
of `rlhf_ext.sentiment` (per-sentence VADER − truncation − repetition), held-out prompts never trained on, and
40 open-ended "transfer" prompts written independently of the templates. Every run samples the same number of
responses (iterations × 8) of at most 48 tokens; evaluation uses the same seed for every variant (common random
numbers), which lowers — not removes — the evaluation noise between variants (standard error of one point 0.05–0.1).

Each run writes `<workdir>/runs/<variant>__s<seed>.json` after every evaluation and keeps a checkpoint beside it:
a killed run resumes where it stopped. `report` gathers every finished run into
`benchmarks/results/overoptimization.json` (every point, the command, versions and machine line), a plot and a
markdown table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

# The `overopt` package sits beside this file: a script run puts benchmarks/ on sys.path, but a caller that loads
# this file by path might not.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

# The package's __init__ sets the HF/TRL environment defaults, before anything here imports those libraries.
from overopt.evaluation import evaluate, prompt_rows  # noqa: E402
from overopt.queue import claim, release, rm_ready, run_queue  # noqa: E402
from overopt.report import (gao_fit, machine_line, markdown_table, plot, report, strict_json,  # noqa: E402
                            summarize, versions)
from overopt.runners import Run  # noqa: E402
from overopt.tasks import quick_task, real_task, rm_dir, train_quick_rms, train_rms  # noqa: E402
from overopt.variants import (BETA, DATA, DELTAS, HEADLINE, HEADLINE_DELTA, LINEAR, MODEL, RESULTS, RMS,  # noqa: E402
                              ROOT, SCHEDULE, VARIANTS, proxies_for, schedule, settings)

# What this module offered before the split into `overopt/`, for callers that import it (monitor_replay, tests).
__all__ = ["BETA", "DATA", "DELTAS", "HEADLINE", "HEADLINE_DELTA", "LINEAR", "MODEL", "RESULTS", "RMS", "ROOT",
           "SCHEDULE", "VARIANTS", "Run", "claim", "evaluate", "gao_fit", "machine_line", "main", "markdown_table",
           "plot", "prompt_rows", "proxies_for", "quick_task", "real_task", "release", "report", "rm_dir",
           "rm_ready", "run_queue", "schedule", "settings", "strict_json", "summarize", "train_quick_rms",
           "train_rms", "versions"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", nargs="?", default="all", choices=["rms", "run", "report", "all"])
    ap.add_argument("--prompts", default="templates", choices=["templates", "wide"],
                    help="training prompts: the one-sentence templates, or those plus the open-ended family "
                         "(then the transfer prompts are evaluated with twice the token budget)")
    ap.add_argument("--workdir", default=None, help="default: outputs/overopt (outputs/overopt_wide with --prompts wide)")
    ap.add_argument("--rm-dir", default=None, help="proxy reward models (default: <workdir>/rms); `--prompts wide` "
                                                   "can reuse the templates run's: --rm-dir outputs/overopt/rms")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/overoptimization[_wide].json")
    ap.add_argument("--rms", default="", help="`rms` stage: comma-separated proxies to train (default: all of them)")
    ap.add_argument("--runs", default="", help="comma-separated variant:seed keys (`run`: default the full schedule; "
                    "`report`: only these of the workdir's runs)")
    ap.add_argument("--workers", type=int, default=1, help="parallel worker processes sharing the run queue")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, 3 iterations: a smoke test")
    ap.add_argument("--partial", action="store_true", help="report unfinished runs too")
    ap.add_argument("--compare", action="append", metavar="RESULTS.json:VARIANT[,VARIANT…]",
                    help="`report`: add those variants' runs from an earlier report (e.g. the benchmark's plain and "
                         "all beside the human-loop runs)")
    ap.add_argument("--wait", action="store_true", help="keep polling until every scheduled run is done (runs wait "
                                                         "for their reward models to be trained)")
    args = ap.parse_args(argv)
    bad = [k for k in filter(None, args.runs.split(","))
           if k.count(":") != 1 or k.split(":")[0] not in VARIANTS or not k.split(":")[1].isdigit()]
    if bad:
        ap.error(f"--runs: {', '.join(bad)}; each key is variant:seed, variant one of {', '.join(VARIANTS)}")
    wide = args.prompts == "wide"
    args.workdir = args.workdir or str(ROOT / "outputs" / ("overopt_wide" if wide else "overopt"))
    args.out = args.out or str(RESULTS / f"overoptimization{'_wide' if wide else ''}.json")
    if args.quick:
        import tempfile

        from rlhf_ext.testing import save_tiny_model, tiny_tokenizer

        if args.workdir.startswith(str(ROOT / "outputs" / "overopt")):
            args.workdir = tempfile.mkdtemp(prefix="overopt_quick_")
        if args.out.startswith(str(RESULTS / "overoptimization")):
            args.out = str(Path(args.workdir) / "overoptimization.json")
        args.model_path = str(Path(args.workdir) / "tiny")
        if not (Path(args.model_path) / "config.json").is_file():
            save_tiny_model(args.model_path, tiny_tokenizer(), num_layers=2)
        # the proxies this invocation's runs read (every one for `report` and `rms`): seconds each
        train_quick_rms(Path(args.workdir), args.model_path,
                        proxies_for(schedule(args)) if args.stage in ("run", "all") else None)
        args.task = quick_task(args.model_path, args.prompts)
    else:
        args.task = lambda: real_task(args.prompts)
    if args.stage in ("rms",) and not args.quick:
        return train_rms(args)
    if args.stage in ("run", "all"):
        keys = schedule(args)
        if args.workers > 1:
            cmd = [sys.executable, __file__, "run", "--workdir", args.workdir, "--runs", ",".join(keys),
                   "--prompts", args.prompts] + (["--rm-dir", args.rm_dir] if args.rm_dir else []) + [
                   "--threads", str(args.threads or 1)] + (["--quick"] if args.quick else []) + \
                  (["--wait"] if args.wait else [])
            procs = [subprocess.Popen(cmd) for _ in range(args.workers)]
            if any(p.wait() for p in procs):
                sys.exit("a worker failed; rerun the same command to resume")
        else:
            run_queue(args, keys)
    if args.stage in ("report", "all"):
        return report(args)


if __name__ == "__main__":
    main()
