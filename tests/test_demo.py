"""`make demo`'s report: per-sentence sentiment and repetition judges, and the before → after table on held-out and
transfer prompts side by side."""

from __future__ import annotations

import json

import pytest

from rlhf_ext.demo import MEASURES, results_table
from rlhf_ext.sentiment import repetition_judge, sentiment_judge


def test_sentiment_judge_averages_vader_over_sentences():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    texts = ["I love this movie. The ending was awful!", "Great.", [{"role": "assistant", "content": "Bad day? No."}]]
    expected = [(vader.polarity_scores("I love this movie.")["compound"]
                 + vader.polarity_scores("The ending was awful!")["compound"]) / 2,
                vader.polarity_scores("Great.")["compound"],
                (vader.polarity_scores("Bad day?")["compound"] + vader.polarity_scores("No.")["compound"]) / 2]
    assert sentiment_judge()(completions=texts) == pytest.approx(expected)


def test_repetition_judge_is_the_share_of_repeated_ngrams():
    # "so happy so happy so happy": three 4-grams, two of them distinct → 1/3 repeated; "a b c d a b c d": 1 of 5
    got = repetition_judge(4)(completions=["so happy so happy so happy", "one two three four five", "a b c d a b c d"])
    assert got == pytest.approx([1 / 3, 0.0, 1 / 5])


def test_results_table_puts_transfer_beside_heldout():
    summary = {f"{split}_{when}": {k: float(10 * i + j) for i, (k, _) in enumerate(MEASURES)}
               for j, (split, when) in enumerate([("heldout", "before"), ("heldout", "after"),
                                                  ("transfer", "before"), ("transfer", "after")])}
    lines = results_table(summary).splitlines()
    assert "held-out prompts" in lines[0] and "transfer prompts" in lines[0]
    for i, (key, label) in enumerate(MEASURES):
        row = lines[2 + i]
        assert row.startswith(label)
        assert [float(x) for x in row[len(label):].split()] == [10 * i + j for j in range(4)]


def test_paired_change_averages_per_prompt_and_takes_the_standard_error_over_prompts():
    from rlhf_ext.demo import change_lines, paired_change

    # prompt a: 2 samples before (0, 1) → 0.5, after (1, 1) → 1.0: +0.5; b: before (0.2, 0.2), after (0.0, 0.4): 0.0;
    # c: before (1, 1), after (0, 0): −1.0 (sample order differs between the two runs)
    before = {"samples": {"prompts": ["a", "a", "b", "b", "c", "c"], "sentiment": [0, 1, 0.2, 0.2, 1, 1]}}
    after = {"samples": {"prompts": ["b", "a", "c", "a", "b", "c"], "sentiment": [0.0, 1, 0, 1, 0.4, 0]}}
    mean, se = paired_change(before, after, "sentiment")
    diffs = [0.5, 0.0, -1.0]
    m = sum(diffs) / 3
    assert mean == pytest.approx(m)
    assert se == pytest.approx((sum((d - m) ** 2 for d in diffs) / 2) ** 0.5 / 3 ** 0.5)
    summary = {"change": {s: {k: (0.125, 0.05) for k in ("gold", "sentiment", "vader", "length", "eos", "rep4")}
                          for s in ("heldout", "transfer")}}
    row = [line for line in change_lines(summary).splitlines() if line.startswith("per-sentence sentiment")][0]
    assert row.count("+0.125 ± 0.050") == 2


@pytest.mark.parametrize("flag", ["--eval-samples", "--eval-prompts", "--iterations", "--batch-size"])
def test_demo_refuses_counts_below_one_before_any_work(flag, capsys, tmp_path):
    from rlhf_ext.demo import main

    with pytest.raises(SystemExit) as e:
        main([flag, "0", "--output-dir", str(tmp_path / "demo")])
    assert e.value.code == 2 and f"{flag} must be ≥ 1" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("flag, value, says", [
    ("--kl-target", "-1", "--kl-target must be a finite number > 0"),
    ("--kl-target", "nan", "--kl-target must be a finite number > 0"),
    ("--learning-rate", "-1", "--learning-rate must be a finite number > 0"),
    ("--reward-lr", "0", "--reward-lr must be a finite number > 0"),
    ("--reward-epochs", "0", "--reward-epochs must be a finite number > 0"),
    ("--ensemble-size", "0", "--ensemble-size must be ≥ 1"),
    ("--ensemble-size", "1", "--ensemble-size must be ≥ 2"),
    ("--beta", "-0.5", "--beta must be a finite number ≥ 0"),
    ("--length-alpha", "-1", "--length-alpha must be a finite number ≥ 0"),
    ("--eos-penalty", "inf", "--eos-penalty must be a finite number ≥ 0"),
    ("--novelty-alpha", "-1", "--novelty-alpha must be a finite number ≥ 0"),
    ("--length-decorrelation", "-0.2", "--length-decorrelation must be a finite number ≥ 0"),
    ("--lora-layers", "-1", "--lora-layers must be ≥ 0"),
    ("--seed", "-1", "--seed must be in [0, 2**32 - 1]"),
])
def test_demo_refuses_a_stage_2_value_before_stage_1_trains(flag, value, says, capsys, tmp_path):
    """--kl-target -1, --learning-rate -1 and --ensemble-size 0 failed with a traceback only after the reward
    ensemble had trained (minutes on the real model)."""
    from rlhf_ext.demo import main

    with pytest.raises(SystemExit) as e:
        main([flag, value, "--output-dir", str(tmp_path / "demo")])
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_demo_refuses_more_lora_layers_than_the_model_has_before_stage_1(capsys, tmp_path, tiny_path, monkeypatch):
    """PPOTrainer refuses lora_top_layers above the model's depth, but only after the reward ensemble trained."""
    from rlhf_ext import demo

    monkeypatch.setattr(demo, "MODEL", tiny_path)
    monkeypatch.setattr(demo, "train_reward", lambda *a, **k: (_ for _ in ()).throw(AssertionError("stage 1 ran")))
    with pytest.raises(SystemExit) as e:
        demo.main(["--lora-layers", "3", "--output-dir", str(tmp_path / "demo")])
    assert e.value.code == 2 and "--lora-layers 3: the model has 2 layers" in capsys.readouterr().err


def test_demo_checks_both_configs_before_stage_1(capsys, tmp_path, monkeypatch):
    """A rule of PPOConfig that the demo's own checks do not repeat still stops the demo before the reward ensemble
    trains: both stages' configs are built first."""
    from rlhf_ext import demo
    from rlhf_ext.ppo.config import PPOConfig

    def stage_1(*a, **k):
        raise AssertionError("stage 1 started")

    def new_rule(self):
        raise ValueError("a PPOConfig rule the demo does not repeat")

    monkeypatch.setattr(demo, "train_reward", stage_1)
    monkeypatch.setattr(PPOConfig, "_check_ranges", new_rule)
    with pytest.raises(SystemExit) as e:
        demo.main(["--output-dir", str(tmp_path / "demo")])
    assert e.value.code == 2 and "a PPOConfig rule the demo does not repeat" in capsys.readouterr().err


def test_distinct_change_is_the_corpus_difference_with_a_paired_bootstrap_error():
    from rlhf_ext.demo import change_lines, distinct_change
    from rlhf_ext.sentiment import distinct_n

    import random

    r = random.Random(1)
    vocab = [f"w{i}" for i in range(5000)]

    def run(k, q):  # each answer a stock phrase with probability q, else 8 random words (distinct-2 ≈ 1 − q)
        prompts = [f"p{i}" for i in range(k) for _ in range(2)]
        return {"prompts": prompts, "texts": ["have a nice day ahead" if r.random() < q
                                              else " ".join(r.choices(vocab, k=8)) for _ in prompts]}

    before, after = run(40, 0.1), run(40, 0.5)  # after: more stock phrases, fewer distinct bigrams
    mean, se = distinct_change(before, after)
    assert mean == pytest.approx(distinct_n(after["texts"]) - distinct_n(before["texts"]))
    assert mean < -3 * se < 0  # a real drop, told from the noise
    assert distinct_change(before, before) == (0.0, 0.0)  # the same answers: no change, no spread
    # four times the prompts (independent draws of the same process): the error shrinks about twofold
    _, se4 = distinct_change(run(160, 0.1), run(160, 0.5))
    assert 0.3 < se4 / se < 0.75
    lines = change_lines({"change": {s: {"distinct2": (mean, se)} for s in ("heldout", "transfer")}}).splitlines()
    row = [line for line in lines if line.startswith("distinct-2")]
    assert row and row[0].count(f"{mean:+.3f} ± {se:.3f}") == 2


def _tiny_demo_data(dest):
    """The shipped sentiment data, cut to a few rows per file (same files, same format)."""
    from rlhf_ext.data import SHIPPED

    dest.mkdir()
    for name, n in (("preferences_train", 32), ("preferences_test", 16), ("prompts_train", 16), ("prompts_test", 4),
                    ("prompts_transfer", 4)):
        lines = (SHIPPED / "sentiment" / f"{name}.jsonl").read_text().splitlines()[:n]
        (dest / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return dest


def test_demo_end_to_end_and_a_resumed_run_only_evaluates_again(tmp_path, tiny_path, monkeypatch, capsys):
    """`rlhf-ext demo` on a tiny model of the same family: reward ensemble → PPO → before/after report with transfer
    beside held-out and a standard error per change. `--resume` on the finished run trains nothing more (the history
    comes back from the checkpoint) and, with the same seeded draws, reports the same policy's numbers exactly."""
    from rlhf_ext import demo

    monkeypatch.setattr(demo, "MODEL", tiny_path)
    argv = ["--output-dir", str(tmp_path / "demo"), "--data-dir", str(_tiny_demo_data(tmp_path / "data")),
            "--iterations", "2", "--eval-prompts", "3", "--eval-samples", "2", "--batch-size", "4",
            "--lora-layers", "1", "--reward-epochs", "1", "--ensemble-size", "2", "--novelty-alpha", "0.5",
            "--eos-penalty", "0.5"]
    first = demo.main(argv)
    printed, bars = capsys.readouterr()
    assert "Evaluating the reference" in bars and "Evaluating the policy" in bars  # the long parts show progress
    assert "transfer" in printed and "± SE over prompts" in printed and "distinct-2" in printed
    assert first["resumed_from"] is None and first["options"]["novelty_alpha"] == 0.5  # the summary says how it ran
    shapers = json.loads((tmp_path / "demo" / "ppo" / "monitor" / "run.json").read_text())["shapers"]
    assert {"name": "missing_eos", "penalty": 0.5} in shapers  # the flag reaches the shaper PPO ran with
    for split in ("heldout", "transfer"):
        assert set(first["change"][split]) == {"gold", "sentiment", "vader", "length", "eos", "rep4", "distinct2"}
        assert all(len(v) == 2 for v in first["change"][split].values())
    assert (tmp_path / "demo" / "ppo" / "checkpoint-2").is_dir() and (tmp_path / "demo" / "ppo" / "policy").is_dir()

    again = demo.main(argv + ["--resume"])
    printed = capsys.readouterr().out
    assert "resuming PPO from" in printed and again["resumed_from"] == "checkpoint-2"
    for key in ("heldout_before", "heldout_after", "transfer_before", "transfer_after", "change",
                "max_train_kl_after_update", "reward_model"):
        assert again[key] == first[key], key

    demo.main(argv)  # without --resume: trains again, and says what it left unused
    assert "holds checkpoint-2 from an earlier run" in capsys.readouterr().out
