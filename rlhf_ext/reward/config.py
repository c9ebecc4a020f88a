from __future__ import annotations

from dataclasses import dataclass, field, fields

from trl import RewardConfig

from ..cpu_linear import check_backend


@dataclass
class RewardEnsembleConfig(RewardConfig):
    r"""
    Configuration for [`RewardEnsembleTrainer`]: TRL's [`~trl.RewardConfig`] plus ensembles, a length
    de-correlation penalty and normalisation statistics.

    Parameters (in addition to TRL's):
        ensemble_size (`int`, defaults to `1`): number of ensemble members K. K=1 is a plain reward model.
        ensemble_mode (`str`, defaults to `"heads"`): `"heads"` = K score heads on one trunk/adapter (cheap:
            one forward scores every member); `"adapters"` = K LoRA adapters, each with its own head, on one
            frozen base (more diverse; needs LoRA).
        bootstrap (`bool`, defaults to `True`): give each member Poisson(1) bootstrap weights over the training
            pairs so members see different data (only when K > 1).
        pooling (`str`, defaults to `"last"`): what the score heads read: `"last"` = the hidden state of the last
            attended token (TRL's choice), `"mean"` = the mean over attended tokens (properties spread over the
            words of a response, such as sentiment, reach the head directly instead of through one token),
            `"response"` = the mean over the tokens after the last assistant header of the chat template (the
            response alone; rows without the header: every attended token).
        heads_only (`bool`, defaults to `False`): train the score heads only, on the frozen base model (LoRA
            adapters, if any, stay at their zero start): a linear probe of the base model's features.
        length_decorrelation_coef (`float`, defaults to `0.0`): ODIN-style penalty λ·|corr(reward, length)| on
            each batch, against the length bias of human (or simulated) labellers.
        cache_frozen_layers (`bool`, defaults to `False`): with LoRA on the top layers only, cache the frozen
            lower layers' output per text, so epochs after the first run the top layers only.
        extra_preferences (`list[str]`, *optional*): more preference files (JSONL, TRL's format) added to the
            training set by the trainer, e.g. OUTPUT_DIR/review/preferences.jsonl; a missing or empty file is an error.
        extra_preferences_weight (`int`, defaults to `1`): each extra pair enters the training set this many times.
            A few dozen reviewed pairs among thousands of original ones barely move a reward model otherwise.
        init_reward_model (`str`, *optional*): a saved rlhf_ext reward model (same base, members and LoRA settings)
            whose adapters and heads training starts from — e.g. the reward model a PPO run used, fine-tuned on the
            pairs reviewed during that run instead of trained again from scratch.
        normalization_samples (`int`, defaults to `512`): pairs scored at the end of training to record each
            member's mean/std (BT rewards are shift-invariant; the PPO ensemble normalises with these).
        overwrite_output_dir (`bool`, defaults to `False`): start a new run in an `output_dir` that holds an earlier
            run's `checkpoint-N` folders, removing them first. Without it that is refused (the runs would mix, and a
            later `resume_from_checkpoint=True` would continue the earlier one), unless resuming. transformers 5's
            `TrainingArguments` no longer has this field; PPOConfig has the same one.

    > Defaults that differ from TRL's `RewardConfig`:
    > - `bf16`: `None` → on only where CUDA supports bf16 (TRL turns it on unconditionally, which on CPU
    >   silently trains in bf16 autocast).
    > - `activation_checkpointing` (`gradient_checkpointing`): off (our models are small LoRA trunks; turn it on for 7B).
    """

    ensemble_size: int = field(default=1, metadata={"help": "Number of ensemble members K (≥ 1)."})
    ensemble_mode: str = field(
        default="heads",
        metadata={"help": "'heads' (K score heads on one trunk) or 'adapters' (K LoRA adapters + heads on one base)."},
    )
    bootstrap: bool = field(
        default=True, metadata={"help": "Poisson(1) bootstrap weights per member over training pairs (K > 1)."}
    )
    pooling: str = field(
        default="last",
        metadata={"help": "What the score heads read: 'last' (last attended token, TRL's choice), 'mean' (mean "
                  "over attended tokens) or 'response' (mean over the tokens after the chat template's assistant "
                  "header: the response, without the prompt's)."},
    )
    heads_only: bool = field(
        default=False,
        metadata={"help": "Train the score heads only: the base model stays frozen, and so do the LoRA adapters, at "
                  "their initialisation (LoRA B = 0, so the trunk computes exactly the base model). The reward is then "
                  "a linear probe of the base model's features: it cannot fit the labels' noise through the trunk, "
                  "and on the shipped sentiment task it tracks the gold on new text far better than a LoRA-tuned "
                  "trunk (see the README's demo section). Use with ensemble_mode='heads', pooling='response' (or 'mean') and "
                  "weight_decay for the heads."},
    )
    length_decorrelation_coef: float = field(
        default=0.0, metadata={"help": "λ for the ODIN-style penalty λ·|corr(reward, response length)| per batch."}
    )
    lora_top_layers: int = field(default=0, metadata={"help": "LoRA on the last N decoder layers only (0 = every layer). With the frozen-prefix cache, passes and backward then run through those N layers only."})
    cache_frozen_layers: bool = field(
        default=False,
        metadata={"help": "With LoRA on the top layers only (`layers_to_transform`), compute the layers below once "
                  "per text and reuse them in later epochs and evaluation (exact; costs T·H floats of CPU memory "
                  "per cached text)."},
    )
    extra_preferences: list[str] | None = field(
        default=None,
        metadata={"help": "More preference files (JSONL in TRL's format) the trainer adds to the training set, e.g. the "
                  "pairs people picked on the review page: OUTPUT_DIR/review/preferences.jsonl. A missing or empty "
                  "file is an error."},
    )
    extra_preferences_weight: int = field(
        default=1,
        metadata={"help": "How many times each extra preference pair enters the training set (≥ 1): a few dozen "
                  "reviewed pairs among thousands barely move a reward model at weight 1."},
    )
    init_reward_model: str | None = field(
        default=None,
        metadata={"help": "A saved rlhf_ext reward model (folder) to start training from: its adapters and heads are "
                  "loaded first (same base, ensemble_size, ensemble_mode and LoRA settings). Use it to fine-tune the "
                  "reward model a PPO run used on the pairs reviewed during the run."},
    )
    cpu_keep_freed_memory: bool = field(
        default=True,
        metadata={"help": "On CPU with glibc: keep freed memory in the process's heap for the next step instead of "
                  "handing it back to the kernel and page-faulting it in again (rlhf_ext/cpu_memory.py; fp32 steps "
                  "of SmolLM2-135M took 0.92× the time, bf16 ones about the same: benchmarks/reward_step_time.py). "
                  "RSS stays at its high-water mark until the process ends. A setting of the process, not of the "
                  "trainer: once a trainer set it, it stays for the rest of the process (later trainers with False, "
                  "your own code); set False on every trainer of a sweep or notebook that must hand memory back. "
                  "MALLOC_* or GLIBC_TUNABLES malloc settings in the environment win. No effect on GPU."},
    )
    cpu_matmul_backend: str = field(
        default="auto",
        metadata={"help": "On CPU with fp32 weights: who computes the frozen trunk's matmuls (LoRA's and the heads' stay "
                  "torch's). 'auto': oneDNN where a one-time calibration on this machine measured it at least 1.1× "
                  "faster than torch's default (MKL, which chooses its kernels by CPU vendor: on an AMD EPYC Zen 5 a SmolLM2-135M step "
                  "took 2.5 s instead of 4.4), else torch's; "
                  "'onednn'; 'torch'. The same fp32 products to rounding (rlhf_ext/cpu_linear.py). No effect on GPU or "
                  "with bf16/4-bit weights."},
    )
    normalization_samples: int = field(
        default=512, metadata={"help": "Pairs scored after training to record per-member mean/std."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start a new run in an output_dir that holds an earlier run (checkpoint-N folders), removing "
                  "them; without it that is refused (the runs would mix), unless resuming."},
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision. None = on only on a GPU that computes in bf16 (Ampere and later; a T4 or V100 only emulates it: fp16=True there)."}
    )
    # transformers 5 renamed it `activation_checkpointing` (None = off); TRL's RewardConfig turns the old name on,
    # which would also print transformers' deprecation warning on every config a user builds without asking for it
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Older name of `activation_checkpointing`: trade compute for memory (turn "
                                        "it on for 7B models). Off by default."}
    )

    @classmethod
    def from_reward_config(cls, args: RewardConfig) -> RewardEnsembleConfig:
        """A `trl.RewardConfig`'s settings, every ensemble field at its default (one member: TRL's reward model)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(args) if f.init})

    @classmethod
    def adopt(cls, args: RewardConfig) -> RewardEnsembleConfig:
        """`args` itself, read as a RewardEnsembleConfig: a plain `trl.RewardConfig` gets every ensemble field at its
        default (one member: TRL's reward model) and this class, so that `trainer.args is args`, as in
        transformers — a setting changed on it later (a higher max_steps before `train()` again) reaches the trainer.
        A subclass of RewardConfig of your own is copied instead (`from_reward_config`): its class is kept."""
        if type(args) is not RewardConfig:
            return cls.from_reward_config(args)
        from dataclasses import MISSING

        theirs = {f.name for f in fields(args)}
        for f in fields(cls):
            if f.init and f.name not in theirs:
                setattr(args, f.name, f.default_factory() if f.default is MISSING else f.default)
        args.__class__ = cls  # the defaults above pass every check of __post_init__
        return args

    def __post_init__(self):
        import math

        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            raise ValueError(f"learning_rate must be a finite number ≥ 0, got {self.learning_rate}.")
        check_backend(self.cpu_matmul_backend)
        if self.bf16 is None:
            from ..precision import is_bf16_gpu

            self.bf16 = is_bf16_gpu() and not self.fp16
        if not isinstance(self.ensemble_size, int) or self.ensemble_size < 1:
            raise ValueError(f"ensemble_size must be an integer ≥ 1, got {self.ensemble_size!r}. Use 1 for a plain reward model.")
        if self.ensemble_mode not in ("heads", "adapters"):
            raise ValueError(f"Unknown ensemble_mode {self.ensemble_mode!r}; use 'heads' or 'adapters'.")
        if self.ensemble_mode == "adapters" and self.ensemble_size == 1:
            import warnings

            warnings.warn("ensemble_mode='adapters' with ensemble_size=1 trains one LoRA adapter and one head, exactly "
                          "as ensemble_mode='heads' does; set ensemble_size > 1 for an ensemble of adapters.",
                          stacklevel=3)
        from .ensemble import POOLING

        if self.pooling not in POOLING:
            raise ValueError(f"Unknown pooling {self.pooling!r}; use 'last' (last attended token), 'mean' (every "
                             f"attended token) or 'response' (the tokens after the chat template's assistant header).")
        if self.heads_only and self.ensemble_mode == "adapters" and self.ensemble_size > 1:
            raise ValueError("heads_only=True freezes the LoRA adapters at their (identical, zero) start, so "
                             "ensemble_mode='adapters' members would differ only by their heads: use "
                             "ensemble_mode='heads' (K heads on the frozen base).")
        if not isinstance(self.extra_preferences_weight, int) or self.extra_preferences_weight < 1:
            raise ValueError(f"extra_preferences_weight must be an integer ≥ 1, got {self.extra_preferences_weight!r}.")
        if self.init_reward_model is not None:
            from pathlib import Path

            if not (Path(self.init_reward_model) / "rlhf_ext_reward.json").is_file():
                raise FileNotFoundError(
                    f"init_reward_model: {self.init_reward_model} is not a saved rlhf_ext reward model (no "
                    f"rlhf_ext_reward.json there). Pass the output_dir of a RewardEnsembleTrainer / "
                    f"recipes/reward_modeling.py run, or leave init_reward_model unset to train from scratch.")
        if self.length_decorrelation_coef < 0:
            raise ValueError(f"length_decorrelation_coef must be ≥ 0, got {self.length_decorrelation_coef}.")
        if not isinstance(self.normalization_samples, int) or self.normalization_samples < 1:
            raise ValueError(f"normalization_samples must be an integer ≥ 1, got {self.normalization_samples!r}: the "
                             f"pairs scored after training for each member's mean/std (512 by default).")
        if self.normalization_samples < 32:
            import warnings

            warnings.warn(f"normalization_samples={self.normalization_samples}: each member's mean/std come from "
                          f"{2 * self.normalization_samples} scores, so normalised rewards are noisy (a std from 2 "
                          f"scores can blow them up to tens); use ≥ 32 (512 by default).", stacklevel=3)
        super().__post_init__()
