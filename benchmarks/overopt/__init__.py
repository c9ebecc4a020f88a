"""The reward-hacking benchmark behind `benchmarks/overoptimization.py`, split by job: `variants` (the settings, the
proxy reward-model recipes and the mitigations compared), `tasks` (the real and the tiny `--quick` task, and the
training of the proxy reward models), `evaluation` (held-out and transfer measurements of a policy), `runners` (one
variant × seed on our PPOTrainer or TRL's RLOO/GRPO, checkpointed and resumable), `queue` (the lock-file work queue
that worker processes share) and `report` (summary, strict JSON, plot and markdown table)."""

import os

# Set before any submodule imports transformers/datasets/trl: they read these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
