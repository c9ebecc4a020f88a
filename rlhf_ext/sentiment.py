"""The embedded task's judges: VADER sentiment, and a gold score that a length-hacking policy cannot fool.

Raw VADER `compound` grows with the number of positive words, so a policy that stops ending its answers and runs to
the length limit *raises* it while the text degrades (seen in a plain-PPO probe: EOS rate 0.84 → 0, length → cap,
compound 0.04 → 0.52). The gold used for evaluation is therefore

    gold = mean over sentences of VADER compound       (sentiment density: more sentences do not add up)
           − 1 · [the answer never ended]               (truncated at the length limit, no EOS)
           − repeated-4-gram fraction of its words      (loops: "so happy so happy so happy …")

in [−3, 1]; an empty answer scores −1. Every term is what a reader of a one-sentence answer would object to: the
sentiment per sentence, an answer cut off mid-sentence, and repetition. Raw compound is still reported beside it.
"""

from __future__ import annotations

import re

from .plugins.shaping import ngrams, repeated_ngram_fraction

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as e:
        raise ImportError("The sentiment judges need VADER: pip install vaderSentiment") from e
    return SentimentIntensityAnalyzer()


def completion_text(c) -> str:
    return c[-1]["content"] if isinstance(c, list) else c


def vader_judge():
    """Raw VADER compound of the response text (the classic, length-sensitive sentiment score)."""
    analyzer = _analyzer()

    def gold_vader(prompts=None, completions=None, **kwargs):
        return [analyzer.polarity_scores(completion_text(c))["compound"] for c in completions]

    return gold_vader


def sentence_sentiment(text: str, analyzer) -> float:
    sentences = [s for s in _SENTENCE_END.split(text.strip()) if s.strip()]
    return sum(analyzer.polarity_scores(s)["compound"] for s in sentences) / len(sentences) if sentences else 0.0


def gold_score(text: str, ended: bool, analyzer) -> float:
    words = text.split()
    if not words:
        return -1.0
    return sentence_sentiment(text, analyzer) - (0.0 if ended else 1.0) - repeated_ngram_fraction(words, 4)


def gold_judge(eos_token_id: int | None):
    """The length-robust gold (module docstring). An answer ended when its token ids end with EOS."""
    analyzer = _analyzer()

    def gold(prompts=None, completions=None, completion_ids=None, **kwargs):
        ended = [bool(ids) and eos_token_id is not None and ids[-1] == eos_token_id for ids in completion_ids]
        return [gold_score(completion_text(c), e, analyzer) for c, e in zip(completions, ended)]

    return gold


def sentiment_judge():
    """The gold's sentiment term alone: mean VADER compound per sentence (no EOS or repetition term)."""
    analyzer = _analyzer()

    def sentiment(prompts=None, completions=None, **kwargs):
        return [sentence_sentiment(completion_text(c), analyzer) for c in completions]

    return sentiment


def repetition_judge(n: int = 4):
    """1 − unique/total word n-grams of a response (0 fresh, → 1 loops), the gold's repetition term."""

    def repetition(prompts=None, completions=None, **kwargs):
        return [repeated_ngram_fraction(completion_text(c).split(), n) for c in completions]

    return repetition


def distinct_n(texts, n: int = 2) -> float:
    """Unique word n-grams / all word n-grams over a set of responses (1 = all different, → 0 = one phrase)."""
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0
