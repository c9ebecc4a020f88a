"""benchmarks/overoptimization.py --quick: the whole pipeline (reward models, PPO variants, TRL's RLOO, evaluation,
report, plot) on a tiny model in seconds, so the benchmark cannot rot."""

from __future__ import annotations

import json

import pytest
import math
from pathlib import Path

from .conftest import benchmark_module

ROOT = Path(__file__).resolve().parents[1]


def _bench(module: str = "overoptimization"):
    return benchmark_module(module)


def test_quick_mode_writes_a_complete_finite_report(tmp_path):
    bench = _bench()
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
    for k in ("final_sentiment", "final_vader"):
        assert math.isfinite(data["summary"]["plain"][k]), k

    # `make demo` prints plain PPO beside the recommended configuration from this very JSON
    import contextlib
    import io

    from rlhf_ext.demo import print_benchmark_reference

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_benchmark_reference(out)
        print_benchmark_reference(tmp_path / "missing.json")
    printed = buf.getvalue()
    plain, rec = data["summary"]["plain"], data["summary"]["all"]
    assert f"final {plain['final_gold']:+.3f}" in printed and f"final {rec['final_gold']:+.3f}" in printed
    assert "[1 seed, 3 iterations]" in printed
    assert "run `python benchmarks/overoptimization.py`" in printed  # no JSON: says how to make one


def test_quick_mode_with_wide_prompts_evaluates_transfer_at_twice_the_budget(tmp_path):
    bench = _bench()
    out = tmp_path / "wide.json"
    bench.main(["--quick", "--prompts", "wide", "--runs", "plain:0", "--workdir", str(tmp_path / "w"), "--out", str(out)])
    data = json.loads(out.read_text())
    st = data["settings"]
    assert st["prompts"] == "wide" and st["transfer_tokens"] == 2 * st["max_tokens"]
    (run,) = data["runs"]
    assert run["done"] and run["settings"] == st
    # the tiny random model never ends: held-out answers stop at the training budget, transfer ones run past it
    assert run["points"][0]["length"] <= st["max_tokens"] < run["points"][0]["transfer"]["length"] <= st["transfer_tokens"]
    # the one proxy this run reads (plain PPO on k1, evaluated on k1), not all ten of --quick's
    assert sorted(p.name for p in (tmp_path / "w" / "rms").iterdir()) == ["k1"]
    assert bench.proxies_for(["noisy_plain:0", "all_probe:0", "oracle:1"]) == {"gn_k1", "probe", "k1"}


def test_committed_results_are_strict_json():
    """Browsers and jq reject NaN: the committed results parse with a strict parser (no NaN/Infinity constants)."""
    import json
    from pathlib import Path

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    for path in sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "results").glob("*.json")):
        json.loads(path.read_text(), parse_constant=refuse)


def test_quick_human_loop_reviews_through_the_server_retrains_and_resumes(tmp_path):
    """The loop variant end to end: the monitor queues pairs, the simulated reviewer decides them through the review
    server's API, the proxy is retrained on them, PPO resumes from the round's checkpoint to the full budget."""
    bench = _bench()
    out = tmp_path / "loop.json"
    bench.main(["--quick", "--runs", "plain_loop:0", "--workdir", str(tmp_path / "w"), "--out", str(out)])
    (run,) = json.loads(out.read_text())["runs"]
    assert run["done"] and [p["iteration"] for p in run["points"]] == [0, 1, 2, 3]
    table = out.with_suffix(".md").read_text().split("The human loop:")[1]
    assert "| plain_loop | 1 |" in table and "| 8 (" in table  # the loop's table: labels and rounds beside the axes
    loop = run["loop"]
    assert loop["labels"] == 8 and [r["labels"] for r in loop["rounds"]] == [4, 4]
    assert [r["iteration"] for r in loop["rounds"]] == [1, 2]
    review = tmp_path / "w" / "runs" / "plain_loop__s0" / "review"
    decisions = [json.loads(x) for x in (review / "decisions.jsonl").read_text().splitlines()]
    assert len(decisions) == 8 and all(d["reviewer"].startswith("simulated (error 0.1") for d in decisions)
    prefs = (review / "preferences.jsonl").read_text().splitlines()
    assert len(prefs) == 8  # every decision a preference pair (no skips, no "both bad")
    starts = [str(tmp_path / "w" / "rms" / "k1"), str(review.parent / "rm_round1")]  # each round fine-tunes the last
    for r, start in zip(loop["rounds"], starts):
        args = json.loads((review.parent / r["rm"] / "training_args.json").read_text())
        assert args["extra_preferences"] == [str(review / "preferences.jsonl")]
        assert args["init_reward_model"] == start and args["extra_preferences_weight"] == 16


def test_noisy_gold_pairs_are_relabelled_by_the_gold_with_the_stated_noise(tmp_path):
    """The noisy-proxy scenario's data, checked against the shipped pairs' own gold scores."""
    _bench()
    from overopt.tasks import noisy_gold_data

    out = noisy_gold_data(tmp_path / "ng", pairs=200, noise=0.25, seed=3)
    train = [json.loads(x) for x in (out / "preferences_train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (out / "preferences_test.jsonl").read_text().splitlines()]
    assert len(train) == 200 and sum(r["flipped"] for r in train) == 50
    for r in train + test:  # chosen has the higher gold exactly when the label was not flipped
        assert (r["gold_chosen"] > r["gold_rejected"]) != r["flipped"]
    assert not any(r["flipped"] for r in test) and len(test) > 300
    shipped = {(json.dumps(r["prompt"]), frozenset((json.dumps(r["chosen"]), json.dumps(r["rejected"]))))
               for r in map(json.loads, (ROOT / "data" / "sentiment" / "preferences_train.jsonl").read_text().splitlines())}
    assert all((json.dumps(r["prompt"]), frozenset((json.dumps(r["chosen"]), json.dumps(r["rejected"])))) in shipped
               for r in train)
    again = noisy_gold_data(tmp_path / "ng2", pairs=200, noise=0.25, seed=3)
    assert (again / "preferences_train.jsonl").read_text() == (out / "preferences_train.jsonl").read_text()


def test_pairs_relabelled_by_sentiment_keep_their_columns_and_the_stated_noise(tmp_path):
    """benchmarks/relabel_by_sentiment.py: chosen = the answer with the higher per-sentence sentiment (test split
    always, train split but for about `noise` of the pairs), and the paired columns travel with their answers."""
    from rlhf_ext.sentiment import completion_text, sentiment_judge

    _bench("relabel_by_sentiment").main([str(tmp_path / "gl"), "--noise", "0.25"])
    sentiment = sentiment_judge()
    assert (tmp_path / "gl" / "prompts_transfer.jsonl").is_file()  # a complete --data-dir for the demo
    for split in ("train", "test"):
        rows = [json.loads(x) for x in (tmp_path / "gl" / f"preferences_{split}.jsonl").read_text().splitlines()]
        right = [c > r for c, r in zip(sentiment(completions=[r["chosen"] for r in rows]),
                                       sentiment(completions=[r["rejected"] for r in rows]))]
        wrong = 1 - sum(right) / len(rows)
        assert (0.20 < wrong < 0.30) if split == "train" else wrong == 0, (split, wrong)
        assert all(r["len_chosen"] == len(completion_text(r["chosen"]).split()) for r in rows)


def test_quick_noisy_proxy_scenario_runs_with_its_own_proxy_axis(tmp_path):
    bench = _bench()
    out = tmp_path / "noisy.json"
    bench.main(["--quick", "--runs", "noisy_plain:0,noisy_ens_adapters_min:0", "--workdir", str(tmp_path / "w"),
                "--out", str(out)])
    runs = {r["variant"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"noisy_plain", "noisy_ens_adapters_min"} and all(r["done"] for r in runs.values())
    assert runs["noisy_ens_adapters_min"]["spec"]["rm"] == "gn_k4_adapters"
    assert all(r["spec"]["yardstick"] == "gn_k1" for r in runs.values())
    # the scenario's longer budget applies to full runs only; --quick keeps its 3 iterations
    assert bench.VARIANTS["noisy_plain"]["settings"]["iterations"] == 60
    assert [p["iteration"] for p in runs["noisy_plain"]["points"]] == [0, 1, 2, 3]


def test_quick_loop_with_a_pool_labels_the_pairs_its_order_ranks_first(tmp_path):
    """`plain_loop_margin`: a round waits for a pool of pending pairs (6 in --quick) and labels 4 of them — the ones
    where the proxy prefers the flagged response to the reference's by the widest margin, recomputed here from the
    scores the monitor recorded, round by round."""
    bench = _bench()
    out = tmp_path / "margin.json"
    bench.main(["--quick", "--runs", "plain_loop_margin:0", "--workdir", str(tmp_path / "w"), "--out", str(out)])
    (run,) = json.loads(out.read_text())["runs"]
    rounds = run["loop"]["rounds"]
    assert run["done"] and rounds and all(r["labels"] == 4 for r in rounds)
    review = tmp_path / "w" / "runs" / "plain_loop_margin__s0" / "review"
    queue = [json.loads(x) for x in (review / "queue.jsonl").read_text().splitlines()]
    decided = [json.loads(x)["id"] for x in (review / "decisions.jsonl").read_text().splitlines()]
    done = set()
    for k, r in enumerate(rounds):
        pool = [q for q in queue if q["iteration"] <= r["iteration"] and q["id"] not in done]
        assert len(pool) >= 6  # the pool, not just the 4 it labels
        widest = sorted(pool, key=lambda q: q["flagged"]["score"] - q["reference"]["score"], reverse=True)
        labelled = decided[4 * k : 4 * k + 4]
        assert set(labelled) == {q["id"] for q in widest[:4]}
        done |= set(labelled)


@pytest.mark.parametrize("killed", ["before the retrain", "mid-review"])
def test_a_loop_killed_in_a_round_finishes_that_round_on_resume(tmp_path, monkeypatch, killed):
    """Killed after some or all of a round's labels were given, before its reward model was retrained: the rerun
    finishes the review and retrains before PPO resumes, so the record counts every label once, each round spends
    its full share, and the run ends as an unbroken one."""
    bench = _bench()
    import overopt.loop
    import overopt.reviewer

    real_rm, real_call, calls, decides = overopt.loop.retrain_rm, overopt.reviewer._call, [], []

    def retrain(*a, **k):
        calls.append(a[2].name)
        if killed == "before the retrain" and len(calls) == 2:
            raise KeyboardInterrupt  # what a kill leaves: round 2's decisions on disk, no rm_round2, no record of it
        return real_rm(*a, **k)

    def call(url, body=None, token=""):
        if body is not None:
            decides.append(body["id"])
            if killed == "mid-review" and len(decides) == 6:  # round 2's second label: one of its four given
                raise KeyboardInterrupt
        return real_call(url, body, token)

    work, out = tmp_path / "w", tmp_path / "loop.json"
    argv = ["--quick", "--runs", "plain_loop:0", "--workdir", str(work), "--out", str(out)]
    monkeypatch.setattr(overopt.loop, "retrain_rm", retrain)
    monkeypatch.setattr(overopt.reviewer, "_call", call)
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    runs = work / "runs"
    given = 8 if killed == "before the retrain" else 5
    assert len((runs / "plain_loop__s0" / "review" / "decisions.jsonl").read_text().splitlines()) == given
    assert len(json.loads((runs / "plain_loop__s0.json").read_text())["loop"]["rounds"]) == 1
    bench.main(argv)  # the rerun (the patches still count, but no longer kill)
    (run,) = json.loads(out.read_text())["runs"]
    loop = run["loop"]
    assert run["done"] and loop["labels"] == 8 and [r["labels"] for r in loop["rounds"]] == [4, 4]
    assert [r["iteration"] for r in loop["rounds"]] == [1, 2] and loop["rounds"][1]["resumed"]
    # round 2 retrained once on resume (killed mid-review: its first retrain never started), no third round
    assert calls == ["rm_round1", "rm_round2", "rm_round2"][: 3 if killed == "before the retrain" else 2]
    assert len((runs / "plain_loop__s0" / "review" / "decisions.jsonl").read_text().splitlines()) == 8
    assert [p["iteration"] for p in run["points"]] == [0, 1, 2, 3]


@pytest.mark.parametrize("error", [0.0, 0.1, 0.25, 1 / 3, 1.0])
def test_exact_reviewer_flips_the_stated_share_and_a_resumed_one_continues(tmp_path, error):
    """flips="exact": after every n decisions, ⌊n·e⌋ or ⌈n·e⌉ of them flipped (counted here from the decisions
    themselves, against a reference answer the reviewer cannot see); a reviewer rebuilt after k decisions (a resumed
    run) flips the same ones as one that never stopped. The Bernoulli default can flip none of 32 at 10 %."""
    _bench()  # imports the benchmark's `overopt` package
    from overopt.reviewer import SimulatedReviewer

    rec = {"flagged": {"audit": {"gold": 1.0}}, "reference": {"audit": {"gold": 0.0}}}  # right answer: "flagged"
    for seed in range(4):
        whole = SimulatedReviewer(tmp_path, error, seed, flips="exact")
        wrong = [whole._decision(rec) != "flagged" for _ in range(64)]
        for n in range(1, 65):
            assert math.floor(n * error) <= sum(wrong[:n]) <= math.ceil(n * error), (seed, n)
        for k in (5, 16, 33):
            resumed = SimulatedReviewer(tmp_path, error, seed, flips="exact", decided=k)
            assert [resumed._decision(rec) != "flagged" for _ in range(64 - k)] == wrong[k:]
        bernoulli = SimulatedReviewer(tmp_path, error, seed)  # the default draws resume the same way
        wrong = [bernoulli._decision(rec) != "flagged" for _ in range(64)]
        for k in (5, 16, 33):
            resumed = SimulatedReviewer(tmp_path, error, seed, decided=k)
            assert [resumed._decision(rec) != "flagged" for _ in range(64 - k)] == wrong[k:]
    bernoulli = SimulatedReviewer(tmp_path, 0.1, 0)
    assert sum(bernoulli._decision(rec) != "flagged" for _ in range(32)) == 0  # why "exact" exists
    with pytest.raises(ValueError, match="flips must be one of"):
        SimulatedReviewer(tmp_path, 0.1, 0, flips="sometimes")


def test_quick_demo_configuration_runs_on_the_demo_reward_model(tmp_path):
    """`all_probe` is `all` with the demo's reward model (K=4 heads on the frozen base), `plain_probe` that reward model
    unmitigated: both run end to end, each on the proxy it names."""
    bench = _bench()
    out = tmp_path / "probe.json"
    bench.main(["--quick", "--runs", "all_probe:0,plain_probe:0", "--workdir", str(tmp_path / "w"), "--out", str(out)])
    runs = {r["variant"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"all_probe", "plain_probe"} and all(r["done"] for r in runs.values())
    assert runs["all_probe"]["spec"]["rm"] == runs["plain_probe"]["spec"]["rm"] == "probe"
    assert {k: v for k, v in runs["all_probe"]["spec"].items() if k != "rm"} == \
        {k: v for k, v in bench.VARIANTS["all"].items() if k != "rm"}
    spec = json.loads((tmp_path / "w" / "rms" / "probe" / "rlhf_ext_reward.json").read_text())
    assert spec["ensemble_size"] == 4
    # `report --runs`: one scenario's runs of a shared workdir, beside runs of another report
    only = tmp_path / "only.json"
    bench.main(["report", "--quick", "--workdir", str(tmp_path / "w"), "--runs", "all_probe:0", "--out", str(only),
                "--compare", f"{out}:plain_probe"])
    assert sorted(r["variant"] for r in json.loads(only.read_text())["runs"]) == ["all_probe", "plain_probe"]


def test_the_demo_proxy_is_trained_by_the_shipped_recipe_alone(tmp_path, monkeypatch):
    """The LoRA proxies pin their settings over the recipe YAML's; the demo's reward model must not (it is the shipped
    recipe as a user runs it: heads only, response pooling)."""
    _bench()
    from overopt import tasks

    cmds = []
    monkeypatch.setattr(tasks.subprocess, "run", lambda cmd, **kw: cmds.append(cmd))
    tasks._run_recipe(tmp_path, "probe", tmp_path / "probe")
    tasks._run_recipe(tmp_path, "k1", tmp_path / "k1")
    probe, k1 = cmds
    assert "--heads_only" not in probe and "--pooling" not in probe and "--lora_top_layers" not in probe
    assert probe[-2:] == ["--output_dir", str(tmp_path / "probe")]
    assert k1[k1.index("--heads_only") + 1] == "false"
    import yaml

    shipped = yaml.safe_load((ROOT / "recipes" / "configs" / "reward_smollm2_sentiment.yaml").read_text())
    assert shipped["heads_only"] is True and shipped["pooling"] == "response" and shipped["ensemble_size"] == 4
