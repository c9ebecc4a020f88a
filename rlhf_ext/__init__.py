"""rlhf_ext: PPO-based RLHF on the current Hugging Face stack, safe against reward hacking.

Layers: `ppo/` (PPOConfig, PPOTrainer, the model passes), `reward/` (the ensemble trainer, artifact and reward
pipeline), `plugins/` (KL controllers and guard, estimators, aggregations, shapers), and shared helpers at the top
(`models`, `adapters`, `prefix_cache`, `rl_math`, `integrity`, `data`). Names are imported lazily, so
`import rlhf_ext` (and the CLI) starts without loading torch or transformers.
"""

import logging
import os

__version__ = "0.2.0"

# On AVX512-BF16 CPUs bitsandbytes logs at import that an optional Hub kernel for its CPU *inference* layout is
# missing. rlhf_ext never uses that layout (it has no backward; see models.keep_4bit_trainable): noise, silenced.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class _BitsandbytesKernelTrustFilter(logging.Filter):
    """Under HF_HUB_OFFLINE=1 the `kernels` package warns, at that same import, that it skips the publisher trust
    check of bitsandbytes' optional CPU kernel (`kernels-community/quantization-bitsandbytes`): the same unused
    kernel, nothing a user can act on. Only that repository's message is dropped; any other kernel's is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community/quantization-bitsandbytes" not in str(record.msg)


logging.getLogger("kernels._internals.hf_hub").addFilter(_BitsandbytesKernelTrustFilter())


class _DeepSpeedCpuFallbackFilter(logging.Filter):
    """With deepspeed installed (`make install` adds it for deepspeed_zero2.yaml), accelerate imports it whenever a
    trainer unwraps its model, and DeepSpeed then logs on every CPU run "Setting accelerator to CPU. If you have GPU or
    other accelerator, we were unable to detect it": a false alarm where DeepSpeed does not run. Dropped there; kept in
    a DeepSpeed run (accelerate launch with a DeepSpeed config sets ACCELERATE_USE_DEEPSPEED), where it can matter."""

    def filter(self, record: logging.LogRecord) -> bool:
        return ("Setting accelerator to CPU" not in str(record.msg)
                or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true"))


logging.getLogger("DeepSpeed").addFilter(_DeepSpeedCpuFallbackFilter())

_EXPORTS = {
    "PPOConfig": "ppo.config", "PPOTrainer": "ppo.trainer",
    "RewardEnsembleConfig": "reward.config", "RewardEnsembleTrainer": "reward.trainer",
    "RewardEnsemble": "reward.ensemble", "load_reward_model": "reward.artifact", "RewardPipeline": "reward.pipeline",
    "RewardPipelineStateCallback": "reward.pipeline", "ExternalRewardModel": "reward.pipeline",
    "KLControllerCallback": "plugins.kl_callback", "build_controller": "plugins.kl",
    "load_model": "models", "load_tokenizer": "models", "resolve_model_path": "models",
    "register": "registry", "get": "registry", "build": "registry", "available": "registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rlhf_ext' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
