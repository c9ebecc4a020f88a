"""Replay the monitor's length and EOS detectors on finished reward-hacking benchmark runs.

Each benchmark run logs its per-iteration mean response length and EOS rate, and the reference its monitor used
(`monitor/run.json`). This script feeds the logged series through `length_drift` and `eos_collapse` twice: as the
run's monitor judged it (its logged reference; `--as-run-warmup`, 1 before drift warmup existed), and as the monitor
judges it now (the reference measured exactly as `PPOTrainer` does at the start of a run, on
`monitor_reference_prompts` seeded-random training prompts, and the detectors' default settings). Prints which
iterations would alarm; a replay of the "as run" column that disagrees with the logged alarms would show the replay
is not faithful.

    python benchmarks/monitor_replay.py --prompts wide --runs plain:0,all:0
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


@functools.lru_cache(maxsize=None)  # runs of one seed share it: measured once (model load + n prompts)
def reference(prompts: str, seed: int, n: int) -> dict:
    import torch

    import overoptimization as bench
    from rlhf_ext import PPOConfig, PPOTrainer
    from rlhf_ext.sentiment import gold_judge

    model, tok, train, _, _, lora = bench.real_task(prompts)
    st = bench.settings(False, prompts)
    cfg = PPOConfig("/tmp/monitor_replay", per_device_train_batch_size=st["batch"], max_completion_length=st["max_tokens"],
                    seed=seed, use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no",
                    disable_tqdm=True, lora_top_layers=st["lora_layers"], max_prompt_length=512,
                    monitor_reference_prompts=n)
    tr = PPOTrainer(model, reward_funcs=[gold_judge(tok.eos_token_id)], args=cfg, train_dataset=train,
                    processing_class=tok, peft_config=lora())
    tr.monitor._measure_reference()
    return tr.monitor.reference


def logged_observation(row: dict, iteration: int, batch: int, reference: dict, audit_sd: float = 0.0):
    """One iteration as the detectors saw it, rebuilt from the benchmark's logged means: `batch` samples whose mean
    length, EOS rate, proxy score and gold audit are the logged ones (the audit spread ±audit_sd, as a sample standard
    deviation). The batch size matters: the detectors judge a mean against its noise."""
    import torch

    from rlhf_ext.plugins.detectors import Observation

    a = audit_sd * ((batch - 1) / batch) ** 0.5
    k = round(row["response/eos_rate"] * batch)
    return Observation(iteration=iteration, lengths=torch.full((batch,), row["response/length_mean"]),
                       has_eos=torch.arange(batch) < k, texts=[""] * batch, ids=[[0]] * batch,
                       scores=torch.full((batch,), row["objective/scores"]), norm=torch.zeros(batch, 1),
                       valid=torch.ones(batch, dtype=torch.bool),
                       audit={"gold": [row["audit/gold"] + a * (-1) ** i for i in range(batch)]}, metrics={},
                       reference=reference)


def replay(record: dict, ref: dict, **detector_kw) -> dict:
    from rlhf_ext.registry import build

    dets = {name: build("detector", name, **detector_kw) for name in ("length_drift", "eos_collapse")}
    fired = {name: [] for name in dets}
    for it, row in enumerate(record["train"], start=1):
        obs = logged_observation(row, it, record["settings"]["batch"], ref)
        for name, d in dets.items():
            if d.update(obs)[1]:
                fired[name].append(it)
    return fired


def _fmt(fired: dict) -> str:
    return "  ".join(f"{d}: {v[:5] if v else '—'}{' …' if len(v) > 5 else ''}" for d, v in fired.items())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", default="templates", choices=["templates", "wide"])
    ap.add_argument("--workdir", default=None, help="default: outputs/overopt (outputs/overopt_wide with --prompts wide)")
    ap.add_argument("--runs", required=True, help="comma-separated variant:seed keys")
    ap.add_argument("--reference-prompts", type=int, default=64, help="monitor_reference_prompts for 'now'")
    ap.add_argument("--as-run-warmup", type=int, default=1)
    args = ap.parse_args(argv)
    workdir = Path(args.workdir or ROOT / "outputs" / ("overopt_wide" if args.prompts == "wide" else "overopt"))
    for key in args.runs.split(","):
        name, _, seed = key.partition(":")
        if not (workdir / "runs" / f"{name}__s{seed}.json").is_file():
            ap.error(f"--runs {key}: no run {workdir / 'runs' / f'{name}__s{seed}.json'} (keys are variant:seed of runs "
                     f"benchmarks/overoptimization.py finished there)")
        record = json.loads((workdir / "runs" / f"{name}__s{seed}.json").read_text())
        logged = json.loads((workdir / "runs" / f"{name}__s{seed}" / "monitor" / "run.json").read_text())["reference"]
        logged_alarms = {d: sorted({a["iteration"] for a in record.get("alarms", []) if a["detector"] == d})
                         for d in ("length_drift", "eos_collapse")}
        now = reference(args.prompts, int(seed), args.reference_prompts)
        print(f"{key}\n  logged   ref {logged['n']:3d} prompts: length {logged['length']:5.1f} EOS {logged['eos']:.2f} | "
              f"{_fmt(logged_alarms)}\n  as run (replayed)                          | "
              f"{_fmt(replay(record, logged, warmup=args.as_run_warmup))}\n"
              f"  now      ref {now['n']:3d} prompts: length {now['length']:5.1f} EOS {now['eos']:.2f} | "
              f"{_fmt(replay(record, now))}", flush=True)


if __name__ == "__main__":
    main()
