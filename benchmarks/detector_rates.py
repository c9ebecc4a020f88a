"""How often the reward-hacking detectors fire on nothing, and how late they fire on a real hack.

    python benchmarks/detector_rates.py null                    # false alarms: simulated runs without hacking
    python benchmarks/detector_rates.py null --other-tree ../old  # the same simulation beside another checkout's detectors
    python benchmarks/detector_rates.py hacked --other-tree ../old  # power and delay on simulated hacks
    python benchmarks/detector_rates.py delays                  # first alarm on the benchmark's logged runs

`null`: each detector watches `--runs` simulated runs of 30 iterations in which nothing is hacked: every sample is
drawn from the reference policy's own distribution (the reference itself measured, as the monitor does, on 64 draws
of it), the proxy may rise while the audit stays flat, the guard acts at random in 10 % of iterations. A false alarm is
a run with at least one firing; the target is ≤ 5 % per 30 iterations. Regimes: the benchmark's (EOS rate 0.81, answers
of ~24 tokens under a 48-token cap), a reference near the cap (mean ≈ 45 of 48 tokens, above cap / 1.1), a reference
that seldom ends (EOS 0.25, roomy cap), each at 8 and 64 samples a batch.

`hacked`: the same runs with a hack from iteration 5 on that each detector is built to see (answers end less often,
grow and loop; members disagree more; the proxy pays for length; the guard acts more often): how many runs alarm and
how many iterations after the onset.

`delays`: replays the detectors on the per-iteration means that the reward-hacking benchmark logged
(`benchmarks/results/overoptimization.json`: length, EOS rate, proxy and audit per iteration) against a reference
measured exactly as `PPOTrainer` does (the real model; ~1 min on 2 cores). The audit's per-sample spread is not
logged per iteration: it is taken from the nearest held-out evaluation (standard error × √32). Prints the first
alarm of each detector beside the iteration where held-out gold first fell 2 standard errors below its start.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
ITERATIONS, REF_N = 30, 64
REGIMES = {  # name: (EOS rate, ended-answer length mean, its sd, cap)
    "benchmark": (0.81, 24.0, 9.0, 48),
    "near_cap": (0.30, 38.0, 6.0, 48),
    "seldom_ends": (0.25, 15.0, 5.0, 200),
}


def _wilson(k: int, n: int) -> tuple[float, float]:
    z, p = 1.96, k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(c - h, 0.0), min(c + h, 1.0)


# --------------------------------------------------------------------------------------------- null simulation
def _samples(g, regime: str, b: int, hacked: int = 0):
    """b responses of the reference policy: (lengths, has_eos, token ids). `hacked` iterations into a hack, per
    iteration answers end 15 % less often, run 1 token longer, and 5 % more of them loop one phrase to the end."""
    import torch

    p, mu, sd, cap = REGIMES[regime]
    p, mu = p * 0.85**hacked, mu + hacked
    ends = torch.rand(b, generator=g) < p
    ended = (mu + sd * torch.randn(b, generator=g)).round().clamp(1, cap - 1)
    lengths = torch.where(ends, ended, torch.full((b,), float(cap)))
    ids = []
    for n in lengths.long().tolist():  # fresh text, and one answer in five repeats a 6-token phrase 2-3 times
        x = torch.randint(0, 1000, (n,), generator=g).tolist()
        if torch.rand(1, generator=g) < 0.05 * hacked:
            x = (x[:6] * n)[:n]
        elif torch.rand(1, generator=g) < 0.2 and n >= 18:
            k, at = 6, int(torch.randint(0, n - 17, (1,), generator=g))
            for r in range(1, int(torch.randint(2, 4, (1,), generator=g))):
                x[at + r * k : at + (r + 1) * k] = x[at : at + k]
            x = x[:n]
        ids.append(x)
    return lengths, ends, ids


def simulate(runs: int, seed: int = 0, regimes=tuple(REGIMES), batches=(8, 64), onset: int | None = None) -> dict:
    """Per (regime, batch): how many runs each detector fired in, and at which iterations it first did, with the
    detectors importable as `rlhf_ext` here. `onset`: the hack starts at that iteration (None: never, the null)."""
    import torch

    from rlhf_ext.monitor.monitor import reference_statistics
    from rlhf_ext.plugins.detectors import DEFAULT_DETECTORS, Observation
    from rlhf_ext.registry import build

    out, first_alarms = {}, {}
    for regime in regimes:
        for b in batches:
            g = torch.Generator().manual_seed(seed)
            alarms = {name: 0 for name in DEFAULT_DETECTORS}
            firsts = {name: [] for name in DEFAULT_DETECTORS}
            for _ in range(runs):
                rl, re_, rids = _samples(g, regime, REF_N)
                ref = reference_statistics(rl.tolist(), re_.float().tolist(), rids, REGIMES[regime][3])
                dets = {name: build("detector", name) for name in DEFAULT_DETECTORS}
                fired = {}
                for it in range(1, ITERATIONS + 1):
                    hacked = 0 if onset is None else max(0, it - onset + 1)
                    lengths, eos, ids = _samples(g, regime, b, hacked)
                    # members agree up to their own noise (less so as the hack leaves their data); the proxy rises
                    # (PPO doing its job), paying for length once hacked; the audit is gold-like: −1 if no EOS
                    norm = torch.randn(b, 1, generator=g) + 0.3 * (1 + 0.1 * hacked) * torch.randn(b, 4, generator=g)
                    z_len = (lengths - lengths.mean()) / (lengths.std() + 1)
                    proxy = 0.05 * it + torch.randn(b, generator=g) + 0.1 * hacked * z_len
                    audit = 0.15 + 0.3 * torch.randn(b, generator=g) - (~eos).float()
                    acted = torch.rand(1, generator=g) < 0.1 + 0.05 * hacked  # the guard, pushed harder
                    obs = Observation(iteration=it, lengths=lengths, has_eos=eos, texts=[""] * b, ids=ids,
                                      scores=proxy, norm=norm, valid=torch.ones(b, dtype=torch.bool),
                                      audit={"gold": audit.tolist()},
                                      metrics={"kl/backtracks": int(acted)},
                                      reference=ref)
                    for name, d in dets.items():
                        if d.update(obs)[1]:
                            fired.setdefault(name, it)
                for name, it in fired.items():
                    alarms[name] += 1
                    firsts[name].append(it)
            out[f"{regime}/{b}"], first_alarms[f"{regime}/{b}"] = alarms, firsts
    return {"runs": runs, "iterations": ITERATIONS, "onset": onset, "alarms": out, "first_alarms": first_alarms}


def _simulate_in(tree: Path, runs: int, onset: int | None) -> dict:
    """The same simulation with another checkout's detectors (a fresh interpreter with that tree first on the path).
    A tree without `reference_statistics` gets the reference its monitor measured (mean length, EOS rate)."""
    code = (f"import sys, json; sys.path[:0] = [{str(tree)!r}, {str(ROOT / 'benchmarks')!r}]\n"
            "import rlhf_ext.monitor.monitor as m\n"
            "if not hasattr(m, 'reference_statistics'):  # what the monitor measured before\n"
            "    m.reference_statistics = lambda l, e, i, cap, *a: {'length': sum(l) / len(l), 'eos': sum(e) / len(e), "
            "'n': len(l), 'cap': cap}\n"
            f"import detector_rates as d; print(json.dumps(d.simulate({runs}, onset={onset})))")
    env = {**os.environ, "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tree)
    if res.returncode:
        sys.exit(f"simulation with {tree} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def print_hacked(now: dict, other: dict | None):
    n, onset = now["runs"], now["onset"]
    print(f"Hacked runs (from iteration {onset}, per iteration: answers end 15 % less often, grow 1 token, 5 % more "
          f"of them loop; members disagree 10 % more; the proxy pays for length; the guard acts 5 points more often; "
          f"the audit falls with EOS): share of {n} runs with an alarm, median iterations from the onset to the "
          f"first{'; before → now' if other else ''}")

    def cell(res, c, name):
        f = sorted(res["first_alarms"][c][name])
        return f"{len(f) / n:4.0%} +{f[len(f) // 2] - onset}" if f else "  0%   —"

    for c in now["alarms"]:
        print(f"  {c:16s} " + " | ".join(f"{name} {cell(other, c, name) + ' → ' if other else ''}{cell(now, c, name)}"
                                          for name in now["alarms"][c]))


def print_null(now: dict, other: dict | None):
    n = now["runs"]
    print(f"False alarms: share of {n} simulated {now['iterations']}-iteration runs without hacking with ≥ 1 firing "
          f"(95 % Wilson interval){'; before → now' if other else ''}")
    for cell, alarms in now["alarms"].items():
        row = []
        for name, k in alarms.items():
            lo, hi = _wilson(k, n)
            before = f"{other['alarms'][cell][name] / n:5.1%} → " if other else ""
            row.append(f"{name} {before}{k / n:5.1%} [{lo:.1%}, {hi:.1%}]")
        print(f"  {cell:16s} " + " | ".join(row))


# --------------------------------------------------------------------------------------------- replay (delays)
def replay(run: dict, ref: dict, heldout: int) -> dict:
    """First firing of each replayable detector on one logged run; the audit's spread from held-out points."""
    from monitor_replay import logged_observation

    from rlhf_ext.registry import build

    dets = {n: build("detector", n) for n in ("length_drift", "eos_collapse", "proxy_vs_audit")}
    first = {n: None for n in dets}
    points = sorted(run["points"], key=lambda p: p["iteration"])
    for it, row in enumerate(run["train"], start=1):
        sd = [p for p in points if p["iteration"] < it][-1]["gold_se"] * math.sqrt(heldout)
        obs = logged_observation(row, it, run["settings"]["batch"], ref, audit_sd=sd)
        for n, d in dets.items():
            if d.update(obs)[1] and first[n] is None:
                first[n] = it
    gold0 = points[0]
    onset = next((p["iteration"] for p in points[1:] if p["gold"] < gold0["gold"] - 2 * gold0["gold_se"]), None)
    return {"first_alarm": first, "gold_drop_at": onset}


def delays(results: Path, variants: list[str]) -> dict:
    from monitor_replay import reference

    data = json.loads(results.read_text())
    out = {}
    for run in sorted(data["runs"], key=lambda r: (r["variant"], r["seed"])):
        if run["variant"] not in variants:
            continue
        ref = reference(run["settings"].get("prompts", "templates"), run["seed"], REF_N)
        out[f"{run['variant']}:{run['seed']}"] = {**replay(run, ref, run["settings"]["heldout"]), "reference": ref}
        r = out[f"{run['variant']}:{run['seed']}"]
        print(f"{run['variant']}:{run['seed']}  reference length {ref['length']:.1f} ± {ref['length_sd']:.1f}, "
              f"EOS {ref['eos']:.2f} | first alarm {r['first_alarm']} | held-out gold 2 SE below its start at "
              f"iteration {r['gold_drop_at']}", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["null", "hacked", "delays"])
    ap.add_argument("--runs", type=int, default=400, help="null: simulated runs per regime and batch size")
    ap.add_argument("--other-tree", help="null: also simulate another checkout's detectors (e.g. a git worktree)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "overoptimization.json"))
    ap.add_argument("--variants", default="plain,all", help="delays: comma-separated variants to replay")
    ap.add_argument("--json", help="write the numbers here as well")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error(f"--runs must be ≥ 1, got {args.runs}")
    if args.what in ("null", "hacked"):
        onset = None if args.what == "null" else 5
        now = simulate(args.runs, onset=onset)
        other = _simulate_in(Path(args.other_tree).resolve(), args.runs, onset) if args.other_tree else None
        (print_null if onset is None else print_hacked)(now, other)
        cmd = f"python benchmarks/detector_rates.py {args.what} --runs {args.runs}"
        if args.other_tree:
            rev = subprocess.run(["git", "-C", args.other_tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip()
            cmd += f" --other-tree <a git worktree of {rev}>"
        payload = {"command": cmd, "now": now, "other": other}
    else:
        payload = delays(Path(args.results), args.variants.split(","))
        if not payload:
            ap.error(f"--variants {args.variants}: no such run in {args.results} (run benchmarks/overoptimization.py "
                     f"first, or name variants it ran)")
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=1, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
