"""The detectors' noise gates, as a property of simulated runs (benchmarks/detector_rates.py, deterministic seed):
few false alarms where nothing is hacked, and every detector fires on the hack it is built to see."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _sim():
    spec = importlib.util.spec_from_file_location("detector_rates", ROOT / "benchmarks" / "detector_rates.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.simulate


def test_few_false_alarms_without_hacking():
    # small batches are where a bare threshold fired most (proxy_vs_audit in 81 % of runs, eos_collapse in 60-69 %
    # near the cap or with a reference that seldom ends, length_drift in 61 %)
    res = _sim()(40, regimes=("near_cap", "seldom_ends"), batches=(8,))
    for cell, alarms in res["alarms"].items():
        assert all(k / res["runs"] <= 0.1 for k in alarms.values()), (cell, alarms)


def test_each_detector_fires_on_its_hack():
    res = _sim()(12, regimes=("benchmark",), batches=(64,), onset=5)
    alarms = res["alarms"]["benchmark/64"]
    for name in ("length_drift", "eos_collapse", "proxy_vs_audit", "repetition", "length_correlation",
                 "disagreement", "kl_backtracking"):
        assert alarms[name] >= 10, (name, alarms)
        assert min(res["first_alarms"]["benchmark/64"][name]) > 5, name  # never before the hack starts
