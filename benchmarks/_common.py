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


def step_timer(times: list):
    """A TrainerCallback appending each optimizer step's wall time (s) to `times` and printing it."""
    import time

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *args, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, *args, **kw):
            now = time.perf_counter()
            times.append(now - self.t)
            self.t = now
            print(f"ITER {len(times)}: {times[-1]:.2f}s", flush=True)

    return StepTimer()


def timed(fn, times: list):
    """Wrap `fn` so each call's wall time (s) is appended to `times`."""
    import time

    def wrapper(*args, **kw):
        t = time.perf_counter()
        out = fn(*args, **kw)
        times.append(time.perf_counter() - t)
        return out

    return wrapper


def alternated(set_flag, run, pairs: int) -> tuple[float, float]:
    """Median seconds of `run()` after `set_flag(True)` and after `set_flag(False)`, the two alternated `pairs` times
    after a warm-up of each (the machine's drift falls on both alike) → (median with True, median with False)."""
    import time

    seconds = {True: [], False: []}
    for i in range(2 * pairs + 2):
        set_flag(flag := i % 2 == 0)
        t = time.perf_counter()
        run()
        if i >= 2:
            seconds[flag].append(time.perf_counter() - t)
    return median(seconds[True]), median(seconds[False])


def summary(iter_times, gen_times, tokens_per_iter: int, *modules) -> dict:
    """The result row every benchmark worker writes: medians over iterations 2..N, peak RSS, resident params."""
    med = median(iter_times[1:])
    return {"iter_s": med, "first_iter_s": iter_times[0], "generate_s": median(gen_times[1:]),
            "tok_per_s": tokens_per_iter / med, "peak_rss_mib": peak_rss_mib(),
            "params_resident_m": unique_params(*modules) / 1e6}


def random_reward_artifact(out, model_name: str, tok, layers=None):
    """A reward artifact with a random head (LoRA q/v, optionally on `layers` only): what PPO scores with when only
    its cost matters."""
    import torch
    from peft import LoraConfig
    from torch import nn

    from rlhf_ext.adapters import wrap_with_peft
    from rlhf_ext.models import load_model
    from rlhf_ext.reward.artifact import save_reward_artifact
    from rlhf_ext.reward.ensemble import RewardEnsemble

    lora = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0,
            "layers_to_transform": layers, "layers_pattern": "layers" if layers else None}
    trunk = load_model(model_name, "trunk")
    torch.manual_seed(0)
    peft = wrap_with_peft(trunk, LoraConfig(**lora), "reward")
    heads = nn.ModuleDict({"reward": nn.Linear(trunk.config.hidden_size, 1)})
    spec = {"base_model": model_name, "mode": "heads", "ensemble_size": 1, "members": ["rm"], "adapters": ["reward"],
            "lora_config": lora}
    save_reward_artifact(out, RewardEnsemble(peft, tok, spec, heads), spec, tok)
    return str(out)
