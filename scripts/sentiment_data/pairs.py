"""Gold scores, preference pairs labelled by the simulated annotator, and their statistics."""

from __future__ import annotations

import itertools
import math


def score_samples(samples, vader):
    """Add `gold` (VADER compound) and `words` to every sample, in place; returns them as one flat list."""
    records = []
    for per_prompt in samples:
        for s in per_prompt:
            s["gold"] = vader.polarity_scores(s["text"])["compound"] if s["text"] else 0.0
            s["words"] = len(s["text"].split())
            records.append(s)
    return records


def _annotate(a, b, args, rng):
    """(chosen, rejected, p_gold) for one pair; p_gold is None when the gold scores tie.

    p_gold is the probability, under the annotator model, that the final label picks the gold-better response.
    """
    logit = (a["gold"] - b["gold"]) / args.tau + args.length_bias * (a["words"] - b["words"]) / 10.0
    p_a = 1.0 / (1.0 + math.exp(-logit))
    prefer_a = rng.random() < p_a
    p_gold = None
    if a["gold"] != b["gold"]:
        p_better = p_a if a["gold"] > b["gold"] else 1.0 - p_a
        p_gold = (1 - args.label_noise) * p_better + args.label_noise * (1 - p_better)
    if rng.random() < args.label_noise:
        prefer_a = not prefer_a
    chosen, rejected = (a, b) if prefer_a else (b, a)
    return chosen, rejected, p_gold


def _preference_row(prompt, chosen, rejected) -> dict:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen["text"]}],
        "rejected": [{"role": "assistant", "content": rejected["text"]}],
        "gold_chosen": round(chosen["gold"], 4),
        "gold_rejected": round(rejected["gold"], 4),
        "len_chosen": chosen["words"],
        "len_rejected": rejected["words"],
    }


def label_pairs(prompts, samples, vader, args, rng):
    """Score with VADER, form pairs, label with the simulated annotator.

    Returns (rows, per-sample records, skipped, p_gold): p_gold holds each non-tied pair's probability of a
    gold-agreeing label.
    """
    records = score_samples(samples, vader)
    all_pairs = list(itertools.combinations(range(args.samples_per_prompt), 2))
    rows, skipped, p_gold = [], 0, []
    for prompt, per_prompt in zip(prompts, samples):
        pair_idx = sorted(rng.choice(len(all_pairs), size=min(args.pairs_per_prompt, len(all_pairs)), replace=False))
        for p in pair_idx:
            a, b = (per_prompt[x] for x in all_pairs[p])
            if not a["text"] or not b["text"] or a["text"] == b["text"]:
                skipped += 1
                continue
            chosen, rejected, pair_p_gold = _annotate(a, b, args, rng)
            if pair_p_gold is not None:
                p_gold.append(pair_p_gold)
            rows.append(_preference_row(prompt, chosen, rejected))
    return rows, records, skipped, p_gold


def _sample_stats(records) -> dict:
    import numpy as np

    gold = np.array([r["gold"] for r in records], dtype=float)
    words = np.array([r["words"] for r in records], dtype=float)
    toks = np.array([r["tokens"] for r in records], dtype=float)
    corr = float(np.corrcoef(gold, words)[0, 1]) if gold.std() > 0 and words.std() > 0 else float("nan")
    return {
        "n_samples": len(records),
        "eos_rate": round(float(np.mean([r["eos"] for r in records])), 4),
        "empty_rate": round(float(np.mean([not r["text"] for r in records])), 4),
        "mean_tokens": round(float(toks.mean()), 2),
        "mean_words": round(float(words.mean()), 2),
        "gold_mean": round(float(gold.mean()), 4),
        "gold_std": round(float(gold.std()), 4),
        "gold_frac_positive": round(float((gold > 0.05).mean()), 4),
        "gold_frac_negative": round(float((gold < -0.05).mean()), 4),
        "pearson_gold_vs_words": round(corr, 4),
    }


def _pair_stats(rows, skipped, p_gold) -> dict:
    import numpy as np

    dg = np.array([r["gold_chosen"] - r["gold_rejected"] for r in rows], dtype=float)
    dl = np.array([r["len_chosen"] - r["len_rejected"] for r in rows], dtype=float)
    conflict = (dg != 0) & (dl != 0) & (np.sign(dg) != np.sign(dl))
    return {
        "n_pairs": len(rows),
        "n_pairs_skipped": skipped,
        # agreement over pairs where the criterion is not tied; ties counted separately
        "label_agrees_with_gold": round(float((dg[dg != 0] > 0).mean()), 4) if (dg != 0).any() else None,
        "n_gold_ties": int((dg == 0).sum()),
        "label_agrees_with_longer": round(float((dl[dl != 0] > 0).mean()), 4) if (dl != 0).any() else None,
        "n_length_ties": int((dl == 0).sum()),
        # pairs where the longer response has the lower gold: the planted bias and gold pull in opposite directions
        "n_conflict_pairs": int(conflict.sum()),
        "conflict_label_picks_longer": round(float((dl[conflict] > 0).mean()), 4) if conflict.any() else None,
        # the annotator model's own expected agreement with gold (a ceiling for reward-model gold accuracy)
        "annotator_expected_gold_agreement": round(float(np.mean(p_gold)), 4) if p_gold else None,
    }


def stats(records, rows, skipped, p_gold):
    """Statistics of the base-policy samples, then of the labelled pairs (the key order `meta.json` shows)."""
    return {**_sample_stats(records), **_pair_stats(rows, skipped, p_gold)}
