"""Shared helpers for the benchmark scripts (timing, memory, the baseline's prompt set)."""

from __future__ import annotations

import os
import resource
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_flush_denormal(True)  # random tiny models produce denormals, which slow CPU matmuls badly

TITLES = ["Inception", "The Matrix", "Casablanca", "Jaws", "Alien", "Up", "Heat", "Vertigo",
          "Amelie", "Parasite", "Rocky", "Psycho", "Titanic", "Gravity", "Arrival", "Coco"]
TEMPLATES = ["Write a short review of the movie {t}.", "Summarize the plot of {t} in two sentences.",
             "Would you recommend {t} to a friend? Explain briefly.", "Describe the main character of {t} in one sentence."]


def baseline_prompts(n: int = 64) -> list[str]:
    """The 64 prompts of shared/baselines/trl112_ppo.py (same order)."""
    return [TEMPLATES[(i // len(TITLES)) % len(TEMPLATES)].format(t=TITLES[i % len(TITLES)]) for i in range(n)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def unique_params(*modules) -> int:
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            key = (p.data_ptr(), p.numel())
            if key not in seen:
                seen.add(key)
                total += p.numel()
    return total


def median(xs):
    return statistics.median(xs) if xs else float("nan")
