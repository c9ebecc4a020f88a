"""benchmarks/overoptimization.py --quick: the whole pipeline (reward models, PPO variants, TRL's RLOO, evaluation,
report, plot) on a tiny model in seconds, so the benchmark cannot rot."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_mode_writes_a_complete_finite_report(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import overoptimization as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "result.json"
    bench.main(["--quick", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    data = json.loads(out.read_text())
    assert {"command", "versions", "machine", "settings", "gold", "summary", "runs"} <= set(data)
    assert {r["variant"] for r in data["runs"]} == {"plain", "hard_5", "ens_heads_uwo", "all", "oracle", "trl_rloo"}
    for run in data["runs"]:
        assert run["done"] and [p["iteration"] for p in run["points"]] == [0, 1, 2, 3]
        for p in run["points"]:
            for k in ("gold", "sentiment", "vader", "proxy", "kl", "sqrt_kl", "length", "eos", "distinct2", "rep4"):
                assert math.isfinite(p[k]), (run["variant"], k)
            assert p["kl"] >= -1e-6 and 0 <= p["eos"] <= 1
        assert "transfer" in run["points"][0] and "transfer" in run["points"][-1]
    for row in data["summary"].values():
        for k in ("best_gold", "kl_at_best", "final_gold", "final_length", "drop", "minutes"):
            assert math.isfinite(row[k]), k
    assert out.with_suffix(".png").stat().st_size > 10000 and "| plain |" in out.with_suffix(".md").read_text()
