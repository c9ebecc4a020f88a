"""rlhf_ext: PPO-based RLHF on the current Hugging Face stack, safe against reward hacking."""

__version__ = "0.1.0"

from . import ensemble, kl, shaping  # noqa: F401  (registers the built-in plugins)
from .ensemble import RewardPipeline
from .kl import KLControllerCallback, build_controller
from .models import load_model, load_tokenizer, resolve_model_path
from .registry import available, build, get, register
from .reward_config import RewardEnsembleConfig
from .reward_model import RewardEnsemble, load_reward_model
from .reward_trainer import RewardEnsembleTrainer

__all__ = [
    "RewardEnsembleConfig", "RewardEnsembleTrainer", "RewardEnsemble", "load_reward_model", "RewardPipeline",
    "KLControllerCallback", "build_controller", "load_model", "load_tokenizer", "resolve_model_path",
    "register", "get", "build", "available",
]


def __getattr__(name):  # the PPO trainer pulls in more of transformers: import it lazily
    if name in ("PPOConfig", "PPOTrainer"):
        from . import ppo_config, ppo_trainer

        return {"PPOConfig": ppo_config.PPOConfig, "PPOTrainer": ppo_trainer.PPOTrainer}[name]
    raise AttributeError(name)
