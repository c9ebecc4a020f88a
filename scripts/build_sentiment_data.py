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
import json
import math
import random
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS_DIR = Path(__file__).resolve().parent
# REPO_ROOT for `rlhf_ext` (model loading); SCRIPTS_DIR for `sentiment_data`, which Python only adds by itself when
# this file is run as a script, not when it is loaded by path (as the tests do).
for _path in (REPO_ROOT, SCRIPTS_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from sentiment_data.card import data_card  # noqa: E402
from sentiment_data.generation import generate, load_policy  # noqa: E402
from sentiment_data.meta import SYSTEM_NOTE, build_meta, command_line  # noqa: E402
from sentiment_data.outputs import (  # noqa: E402
    jsonl, prompt_jsonl, read_meta, write_atomic, write_meta, write_open_prompts)
from sentiment_data.pairs import label_pairs, stats  # noqa: E402
from sentiment_data.prompts import (  # noqa: E402
    OPEN_SUBJECTS, OPEN_TEMPLATES, SUBJECTS_NEGATIVE, SUBJECTS_NEUTRAL, TEMPLATES, build_open_prompts, build_prompts)

# the builder's pieces stay importable from this script (tests and older callers load it by path)
__all__ = [
    "TEMPLATES", "SUBJECTS_NEGATIVE", "SUBJECTS_NEUTRAL", "OPEN_TEMPLATES", "OPEN_SUBJECTS", "SYSTEM_NOTE",
    "build_prompts", "build_open_prompts", "load_policy", "generate", "label_pairs", "stats",
    "write_atomic", "jsonl", "write_open_prompts", "data_card", "main",
]


def build_parser() -> argparse.ArgumentParser:
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
    return ap


def write_card(out: Path, meta: dict):
    write_atomic(out / "README.md", data_card(meta))


def add_open_prompts(out: Path, args, argv):
    """--open-prompts-only: (re)write the open-ended prompt files and their entry in an existing `meta.json`."""
    meta = read_meta(out)
    meta["open"] = write_open_prompts(out, args)
    meta["open"]["command"] = command_line(argv)
    write_meta(out, meta)
    if not args.no_card:
        write_card(out, meta)
    print(json.dumps(meta["open"]["counts"]))


def seed_everything(seed: int, threads: int):
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sample_responses(tok, model, splits: dict, args) -> dict:
    """`args.samples_per_prompt` responses per prompt, keyed by split, under one progress bar."""
    from tqdm.auto import tqdm

    total = sum(len(p) for p in splits.values()) * args.samples_per_prompt
    results = {}
    with tqdm(total=total, desc="Sampling SmolLM2 responses", unit="resp") as bar:
        for k, (name, prompts) in enumerate(splits.items()):
            # seed offsets far apart, so no batch of one split reuses a seed of the other
            results[name] = generate(tok, model, prompts, args, seed_offset=k * 100_000, bar=bar)
    return results


def label_splits(splits: dict, samples: dict, vader, args):
    """(preference rows, statistics) per split; a split without samples has statistics None."""
    import numpy as np

    pairs, split_stats = {}, {}
    for k, (name, prompts) in enumerate(splits.items()):
        rng = np.random.default_rng([args.seed, k, 7])
        rows, records, skipped, p_gold = label_pairs(prompts, samples[name], vader, args, rng)
        pairs[name] = rows
        split_stats[name] = stats(records, rows, skipped, p_gold) if records else None
    return pairs, split_stats


def write_splits(out: Path, splits: dict, pairs: dict):
    for name, prompts in splits.items():
        write_atomic(out / f"prompts_{name}.jsonl", prompt_jsonl(prompts))
        write_atomic(out / f"preferences_{name}.jsonl", jsonl(pairs[name]))


def build_all(args, argv):
    """The full build: prompts, sampled and scored responses, labelled pairs, all files, `meta.json`, the card."""
    t0 = time.time()
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    seed_everything(args.seed, args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_prompts, test_prompts, train_subj, test_subj = build_prompts(
        args.seed, args.n_train_prompts, args.n_test_prompts, args.test_subject_frac
    )
    splits = {"train": train_prompts, "test": test_prompts}
    tok, model, source = load_policy(args.model)
    vader = SentimentIntensityAnalyzer()

    t_gen = time.time()
    samples = sample_responses(tok, model, splits, args)
    gen_seconds = time.time() - t_gen

    pairs, split_stats = label_splits(splits, samples, vader, args)
    write_splits(out, splits, pairs)
    open_meta = write_open_prompts(out, args)
    run = {
        "generation_seconds": round(gen_seconds, 1),
        "total_seconds": round(time.time() - t0, 1),
        "device": f"CPU, torch threads={args.threads}",
    }
    meta = build_meta(args, argv, model_source=source, prompts=splits, subjects={"train": train_subj, "test": test_subj},
                      pairs=pairs, stats=split_stats, open_meta=open_meta, run=run)
    write_meta(out, meta)
    if not args.no_card:
        write_card(out, meta)
    print(json.dumps({"counts": meta["counts"], "stats": split_stats, "run": meta["run"]}, indent=2))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    if (args.card_only or args.open_prompts_only) and not (out / "meta.json").is_file():
        option = "--card-only re-renders the card of" if args.card_only else "--open-prompts-only adds to"
        parser.error(f"{option} an existing build, but {out / 'meta.json'} is missing; run the full build first "
                     f"(without {'--card-only' if args.card_only else '--open-prompts-only'}), or pass its --out.")
    if args.card_only:
        write_card(out, read_meta(out))
        return
    if args.open_prompts_only:
        add_open_prompts(out, args, argv)
        return
    if args.pairs_per_prompt > math.comb(args.samples_per_prompt, 2):
        parser.error("--pairs-per-prompt exceeds the number of distinct pairs of --samples-per-prompt samples")
    build_all(args, argv)


if __name__ == "__main__":
    main()
