"""How a policy is measured: `prompt_rows` tokenises the held-out and transfer prompts, and `evaluate` samples one
response per prompt under a fixed seed (the same for every variant) and returns the means of gold, sentiment, raw
VADER, the plain proxy, KL from the reference, length, EOS rate and repetition, with the gold's standard error and a
few sample texts."""

from __future__ import annotations

import math


def prompt_rows(dataset, tok, n):
    from types import SimpleNamespace

    from rlhf_ext.data import tokenize_prompts

    # not a PPOConfig: building TrainingArguments mid-run resets accelerate's state under a live trainer
    cfg = SimpleNamespace(max_prompt_length=512, prompt_overflow="error", per_device_train_batch_size=1)
    return tokenize_prompts(dataset.select(range(min(n, len(dataset)))), tok, cfg, min_rows=1)


def evaluate(policy, tok, rows, gold, vader, proxy, max_tokens, seed=1234, batch=16) -> dict:
    """Sample one response per prompt (T=1, the same seed for every variant) and measure it."""
    import torch

    from rlhf_ext.plugins.shaping import repeated_ngram_fraction
    from rlhf_ext.sentiment import distinct_n

    rng = torch.get_rng_state()
    torch.manual_seed(seed)
    from rlhf_ext.sentiment import sentiment_judge

    sentiment = sentiment_judge()
    out = {k: [] for k in ("gold", "sentiment", "vader", "proxy", "kl", "length", "eos", "rep4", "texts")}
    try:
        for i in range(0, len(rows), batch):
            g = policy.generate(rows[i : i + batch], tok, max_tokens)
            h_low = policy.lower(g.ids, g.mask)
            ref = policy.logits(g.ids, g.mask, g.R, h_low, reference=True)
            out["kl"] += policy.sequence_kl(policy.logits(g.ids, g.mask, g.R, h_low), ref, g.resp_mask).tolist()
            kw = dict(prompts=g.prompts, completions=g.completions, completion_ids=g.completion_ids)
            out["gold"] += gold(**kw)
            out["vader"] += vader(**kw)
            out["sentiment"] += sentiment(**kw)
            out["proxy"] += proxy.score_texts(g.prompts, g.completions, normalize=True).mean(-1).tolist()
            out["length"] += g.lengths.tolist()
            out["eos"] += g.has_eos.float().tolist()
            out["rep4"] += [repeated_ngram_fraction(t.split(), 4) for t in g.texts]
            out["texts"] += g.texts
    finally:
        torch.set_rng_state(rng)
    n = len(out["gold"])
    res = {k: sum(v) / n for k, v in out.items() if k != "texts"}
    res["sqrt_kl"] = math.sqrt(max(res["kl"], 0.0))
    res["distinct2"] = distinct_n(out["texts"], 2)
    res["gold_se"] = (sum((x - res["gold"]) ** 2 for x in out["gold"]) / max(1, n - 1) / n) ** 0.5
    res["samples"] = out["texts"][:4]
    return res
