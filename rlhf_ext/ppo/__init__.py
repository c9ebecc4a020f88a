"""PPO on one shared base: `PPOConfig` + `PPOTrainer` (the iteration) and `policy.py` (the model passes)."""

from .config import PPOConfig
from .trainer import PPOTrainer

__all__ = ["PPOConfig", "PPOTrainer"]
