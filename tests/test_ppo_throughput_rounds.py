"""benchmarks/ppo_throughput.py --rounds: each ratio pairs ours with TRL 1.12's run of the same round and precision."""

from __future__ import annotations

import pytest

from .conftest import benchmark_module


def _row(kind, name, precision, rnd, tok, rss, layers=0):
    return {"kind": kind, "name": name, "precision": precision, "round": rnd, "tok_per_s": tok, "peak_rss_mib": rss,
            "iter_s": 256 / tok, "generate_s": 1.0, "layers": layers, "tree": "this" if kind == "ours" else ""}


def test_ratios_pair_runs_of_the_same_round_and_precision(capsys):
    bench = benchmark_module("ppo_throughput")
    # the machine doubles its speed between rounds and bf16 is faster: a ratio across rounds or precisions is wrong
    rows = []
    for rnd, speed in enumerate((1.0, 2.0, 1.5)):
        for precision, p in (("fp32", 1.0), ("bf16", 3.0)):
            rows.append(_row("ours", "ours (all layers)", precision, rnd, 30.0 * speed * p, 2000.0 + rnd))
            rows.append(_row("ours", "ours (top 8 layers)", precision, rnd, 45.0 * speed * p, 1500.0, layers=8))
            rows.append(_row("baseline", "trl 1.12 PPO", precision, rnd, 10.0 * speed * p + rnd, 5000.0))
    spread = {(s["name"], s["precision"]): s for s in bench.ratio_spread(rows)}
    assert set(spread) == {(n, p) for n in ("ours (all layers)", "ours (top 8 layers)") for p in ("fp32", "bf16")}
    for (name, precision), s in spread.items():
        base = 30.0 if name == "ours (all layers)" else 45.0
        p = 1.0 if precision == "fp32" else 3.0
        expected = [base * sp * p / (10.0 * sp * p + rnd) for rnd, sp in enumerate((1.0, 2.0, 1.5))]
        assert s["tok_ratios"] == pytest.approx(expected)
        assert s["met"] == sum(r >= 3.0 for r in expected)
        rss = [(2000.0 + rnd if base == 30.0 else 1500.0) / 5000.0 for rnd in range(3)]
        assert s["rss_ratios"] == pytest.approx(rss)
    out = capsys.readouterr().out
    assert "over 3 rounds, ours (all layers) / trl 1.12 PPO (fp32)" in out
    # every per-round line names its round and pairs within it: 2 configurations × 2 precisions × 3 rounds
    bench.print_ratios(rows)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("ratios")]
    assert len(lines) == 12
    first = next(x for x in lines if "[round 1] ours (all layers)" in x and "(fp32)" in x)
    assert f"tok/s {30.0 * 2 / (20.0 + 1):.2f}x" in first


def test_one_round_keeps_the_single_invocation_output(capsys):
    bench = benchmark_module("ppo_throughput")
    rows = [_row("ours", "ours (all layers)", "fp32", None, 30.0, 2000.0),
            _row("baseline", "trl 1.12 PPO", "fp32", None, 10.0, 5000.0)]
    bench.print_ratios(rows)
    out = capsys.readouterr().out
    assert "[round" not in out and "tok/s 3.00x" in out and "tok/s ≥ 3.0x: met" in out
    assert bench.parser().parse_args([]).rounds == 1
