"""`make demo`'s report: per-sentence sentiment and repetition judges, and the before → after table on held-out and
transfer prompts side by side."""

from __future__ import annotations

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
