from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from ..cpu_linear import check_backend

# transformers' TrainingArguments that change nothing in PPOTrainer, with their defaults: set otherwise, a warning
# (a user who sets one would believe it ran). Those it cannot honour and a user relies on are refused instead.
_NO_EFFECT = {"dataloader_num_workers": 0, "dataloader_persistent_workers": False, "dataloader_prefetch_factor": None,
              "eval_accumulation_steps": None, "prediction_loss_only": False, "batch_eval_metrics": False,
              "save_on_each_node": False}


@dataclass
class PPOConfig(TrainingArguments):
    r"""
    Configuration for [`PPOTrainer`] (PPO with a hard KL constraint, reward shaping and reward ensembles).

    One *iteration* = `per_device_train_batch_size` prompts → rollout → `num_ppo_epochs` × `num_mini_batches`
    optimizer steps. `max_steps` counts iterations.

    > Defaults that differ from TRL's online trainers (GRPO/RLOO) and TRL 1.12's PPO:
    > - `learning_rate`: `1e-4` (LoRA adapters; TRL PPO's 3e-6 was for full fine-tuning).
    > - `kl_controller`: `"hard"` with `kl_target=4.0` nats/sequence; TRL only had a fixed/adaptive penalty.
    > - `stop_on_eos`: `True` (TRL 1.12 PPO generated to the full length unless `stop_token` was set).
    > - `bf16`: `None` → on only on a GPU that computes in bf16 (Ampere and later); when on, *every* pass (sampling,
    >   reference, θ_old, training, KL) runs under one bf16 autocast, in one process and under DDP. `fp16=True` (GPUs
    >   before Ampere: T4, V100) does the same in fp16, with a loss scaler on every optimizer step.
    > - `gradient_checkpointing`: `False`. `gradient_accumulation_steps` > 1 is refused (raise `num_mini_batches`).
    > - Default LoRA (no `peft_config`): r=16 on PEFT's own target modules for the architecture (q/v projections for
    >   Llama-family models, `c_attn` for GPT-2, `query_key_value` for GPT-NeoX, …; rlhf_ext/architectures.py).
    > - `logging_steps`: `1`; `save_strategy`: `"steps"` with `save_steps=50`; `report_to`: `"none"`.
    >
    > TrainingArguments are honoured as transformers' Trainer reads them — logging / eval / save strategy and steps
    > (per iteration; `"epoch"` = a pass over the prompts), `save_total_limit`, `eval_on_start`, `optim`,
    > `weight_decay` (matrices only), the scheduler and warmup (in iterations: the schedule steps once per
    > iteration, as TRL 1.12's), `metric_for_best_model`, `fp16` — or refused with the fix:
    > `gradient_accumulation_steps` > 1, `torch_compile`, `neftune_noise_alpha`, `auto_find_batch_size`,
    > `save_strategy="best"`, `load_best_model_at_end`, `use_liger_kernel`.
    """

    # rollout
    max_prompt_length: int = field(default=256, metadata={"help": "Prompts longer than this (tokens) are handled by `prompt_overflow`."})
    prompt_overflow: str = field(default="error", metadata={"help": "'error' (stop, naming the rows), 'drop' (skip them, with a warning) or 'truncate' (a conversation loses its earliest turns, its system message kept; what still does not fit, and a text prompt, keeps its last tokens)."})
    chat_template_kwargs: dict[str, Any] | str | None = field(default=None, metadata={"help": "Extra arguments for the tokenizer's `apply_chat_template` on conversational prompts, as GRPO / RLOO take them — e.g. {'enable_thinking': False} for Qwen3."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle the prompts every epoch (seeded by `data_seed`, else `seed`); False: in dataset order, as GRPO / RLOO's field. A streamed dataset is read in its own order (shuffle it with `IterableDataset.shuffle`)."})
    max_completion_length: int = field(default=48, metadata={"help": "Maximum generated tokens per response."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (also applied to the log-probs PPO trains on)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling. Below 1 the sampling distribution differs from π; keep 1 for exact PPO."})
    stop_on_eos: bool = field(default=True, metadata={"help": "Stop each response at the tokenizer's EOS."})
    # PPO
    num_ppo_epochs: int = field(default=4, metadata={"help": "Optimisation epochs over each rollout batch."})
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches per epoch."})
    clip_range: float = field(default=0.2, metadata={"help": "PPO ratio clip ε."})
    clip_range_value: float = field(default=0.2, metadata={"help": "Value clip ε_v."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value-loss coefficient."})
    ent_coef: float = field(default=0.0, metadata={"help": "Entropy bonus coefficient."})
    gamma: float = field(default=1.0, metadata={"help": "Discount γ."})
    lam: float = field(default=0.95, metadata={"help": "GAE λ."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Normalise advantages over the batch (masked)."})
    lora_top_layers: int = field(default=0, metadata={"help": "LoRA on the last N decoder layers only (0 = every layer). With the frozen-prefix cache, passes and backward then run through those N layers only."})
    cache_frozen_layers: bool = field(default=True, metadata={"help": "When LoRA sits on the top layers only (`layers_to_transform`), run the layers below once per rollout and share them across the reference, policy, critic and KL passes (exact; checked at start-up, off where the architecture does not allow it)."})
    share_prompt_prefix: bool = field(default=True, metadata={"help": "Run the prompt tokens every sequence of a batch begins with (a chat template's system prompt, an instruction template) once per pass instead of once per sequence, in every pass after sampling: reference, θ_old, training, critic, KL, and the scoring of reward members hosted on the policy's base (rlhf_ext/shared_prefix.py). The same distribution up to float rounding; checked at start-up, off where the model computes another one, under gradient checkpointing, with the frozen-prefix cache, and for batches longer than a sliding window; used where it pays (≥ 8 common tokens, ≥ 64 token rows saved)."})
    critic: str = field(default="shared", metadata={"help": "'shared' (value head on the policy trunk: one forward) or 'separate' (own LoRA adapter + head on the same base)."})
    value_head_init: str = field(default="normal", metadata={"help": "How the new value head starts: 'normal' (weights N(0, 1/(H+1))) or 'zeros' (V ≡ 0: the advantage starts as the plain return, and the critic only helps as it learns; a random head starts as noise, val/explained_variance well below 0)."})
    disable_dropout: bool = field(default=True, metadata={"help": "Run every PPO pass without dropout (TRL's default for its trainers). Ratios, values and the KL guard are then exact; with False, training passes keep the model's dropout and the KL guard still measures in eval mode."})
    # KL
    kl_controller: str = field(default="hard", metadata={"help": "KL controller plugin: fixed, adaptive, lagrangian, hard (or a registered name)."})
    kl_estimator: str = field(default="k1", metadata={"help": "Per-token KL estimator for the logged objective/kl and the KL controller: k1, k2, k3. The reward penalty −β·KL always uses k1, the only one whose reward-form gradient is ∇KL."})
    init_kl_coef: float = field(default=0.05, metadata={"help": "Initial β."})
    kl_target: float | None = field(default=4.0, metadata={"help": "δ: target / hard bound on KL(π‖π_ref), nats per sequence (summed over response tokens, mean over the batch)."})
    log_kl_after_update: bool = field(default=False, metadata={"help": "Also measure the exact post-update KL when the controller does not enforce (one extra no-grad forward)."})
    kl_controller_kwargs: dict[str, Any] | str | None = field(default=None, metadata={"help": "Extra controller arguments, e.g. {'lr': 0.02} or {'horizon': 10000}."})
    # rewards
    aggregation: str = field(default="mean", metadata={"help": "Ensemble aggregation plugin: mean, min, uwo, median, weighted."})
    aggregation_kwargs: dict[str, Any] | str | None = field(default=None, metadata={"help": "e.g. {'lam': 1.0} for uwo, {'weights': [...]} for weighted."})
    shapers: list[Any] | str | None = field(default=None, metadata={"help": "Reward shapers, e.g. [{'name': 'linear', 'alpha': 0.02, 'free_tokens': 24}, 'missing_eos']."})
    nonfinite_rewards: str = field(default="drop", metadata={"help": "'drop' samples whose reward is NaN/inf, or None from every reward function (a function's None beside others' scores is 'not applicable', as in TRL: the others score the sample), counted in rewards/dropped_nonfinite, warned once; a batch dropped whole trains on nothing, an error after 16 samples dropped in a row; or 'error'."})
    callable_normalization: str = field(default="auto", metadata={"help": "Python reward functions and reward models of unknown scale (a sequence classifier, ExternalRewardModel without mean/std): 'auto' (running mean/std when mixed with other members, raw when alone), 'running' or 'none'."})
    audit_model_paths: list[str] | None = field(default=None, metadata={"help": "Audit judges, as `audit_funcs` takes them in Python: reward models (rlhf_ext artifacts, sequence-classification model ids or folders — one trained on other data, a larger one) scored on every rollout beside the proxy, logged as `audit/<folder name>` and watched by the proxy_vs_audit detector; never trained on."})
    reward_model_path: str | None = field(default=None, metadata={"help": "Reward model for the recipes: an rlhf_ext artifact (members on the shared base) or a sequence-classification model id / folder (as TRL's reward_funcs strings)."})
    # monitoring
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start a new run in an output_dir that holds an earlier one (checkpoint-N folders, a monitor log), removing them; without it that is refused (the runs would mix), unless resuming."})
    monitor: bool = field(default=True, metadata={"help": "Run the reward-hacking monitor after every iteration (monitor/* metrics, OUTPUT_DIR/monitor/, review queue)."})
    monitor_detectors: list[Any] | str | None = field(default=None, metadata={"help": "Detectors: names or {'name', 'threshold', 'action': log|queue|halt} dicts; None = every built-in with its default threshold and action (`rlhf-ext plugins`)."})
    monitor_max_queue: int = field(default=2, metadata={"help": "Pairs sent to the review queue per firing of a 'queue' detector."})
    monitor_cooldown: int = field(default=5, metadata={"help": "Iterations between two queue actions of the same detector."})
    monitor_reference_prompts: int = field(default=64, metadata={"help": "Training prompts (drawn at random, seeded) on which the reference policy's length and EOS rate are measured once at the start: what length/EOS drift is judged against. One batch is too few when prompts differ in kind (short-answer and open questions mixed)."})
    log_completions: bool = field(default=False, metadata={"help": "Print a table of prompts, completions, rewards, audit judges and the columns reward functions pass to log_extra() every logging step (main process; as TRL's online trainers do)."})
    model_init_kwargs: dict[str, Any] | str | None = field(default=None, metadata={"help": "Extra from_pretrained kwargs when `model` is a string."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub. Off by default."})
    cpu_keep_freed_memory: bool = field(default=True, metadata={"help": "On CPU with glibc: keep freed memory in the process's heap for the next pass instead of handing it back to the kernel and page-faulting it in again (rlhf_ext/cpu_memory.py; the fp32 benchmark's update ran about a fifth faster). Peak RSS does not rise, but RSS stays at its high-water mark until the process ends. A setting of the process, not of the trainer: once a trainer set it, it stays for the rest of the process (later trainers with False, your own code); set False on every trainer of a sweep or notebook that must hand memory back. MALLOC_* or GLIBC_TUNABLES malloc settings in the environment win. No effect on GPU."})
    cpu_matmul_backend: str = field(default="auto", metadata={"help": "On CPU with fp32 weights: who computes the frozen base's matmuls (every pass, sampling included; LoRA's and the value head's stay torch's). 'auto': oneDNN where a one-time calibration on this machine measured it at least 1.1× faster than torch's default (MKL, which runs its AVX-512 kernels on Intel CPUs only: on an AMD EPYC Zen 5 the benchmark's fp32 PPO iteration took 6.0 s instead of 9.3), else torch's; 'onednn'; 'torch'. The same fp32 products to rounding, and every pass uses the same one, so the KL at θ₀ stays exactly 0 (rlhf_ext/cpu_linear.py). Decoding on CPU (fp32 or bf16 weights): 'auto' computes from copies of the frozen weights packed once per rollout by oneDNN where this CPU measured that faster and the rollout's steps repay the packing, within 1/8 of the memory (a container's limit where lower; rlhf_ext/ppo/cpu_matmul.py; the benchmark's bf16 iteration 8 % shorter), and for Llama, Mistral, Qwen2 and Qwen3 runs each step after the prefill as one packed product per group of linears that read one input, LoRA adapters folded in, without the model's module stack (rlhf_ext/ppo/cpu_decode.py: the same function to rounding); 'onednn' always, 'torch' never. No effect on GPU or with 4-bit weights."})
    cpu_fast_sampling: bool = field(default=True, metadata={"help": "On CPU: generate() runs transformers' decoding loop with each token drawn by inverting the CDF (float64) instead of torch.multinomial, the same distribution (rlhf_ext/ppo/sampling.py; the benchmark's 32-token rollout took 0.17-0.20 s less in bf16 and 0.19-0.20 s less in fp32, the loops alternated), and, with fp32 weights where this CPU measures it faster, each decoding step's few-row matmuls computed as (W·xᵀ)ᵀ (rlhf_ext/ppo/cpu_matmul.py: the same product to fp32 rounding; where `cpu_matmul_backend` sends the frozen base through oneDNN, decoding uses that instead). False: transformers' own loop (the draws of runs made before it, seed for seed). No effect on GPU."})
    # TRL 1.12 PPOConfig names, accepted so a migrated script runs (README: "Coming from TRL 1.12"); each maps to ours
    kl_coef: float | None = field(default=None, metadata={"help": "TRL 1.12 name for `init_kl_coef` (its penalty was fixed: add kl_controller='fixed' to keep that)."})
    cliprange: float | None = field(default=None, metadata={"help": "TRL 1.12 name for `clip_range`."})
    cliprange_value: float | None = field(default=None, metadata={"help": "TRL 1.12 name for `clip_range_value`."})
    response_length: int | None = field(default=None, metadata={"help": "TRL 1.12 name for `max_completion_length`."})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "TRL 1.12: subtract this from the score of responses without EOS = our `missing_eos` shaper with that penalty."})
    total_episodes: int | None = field(default=None, metadata={"help": "TRL 1.12: prompts to train on in total; sets `max_steps` = ⌈total_episodes / (per_device_train_batch_size × processes)⌉ (rounded up, as TRL 1.12: at least that many prompts)."})
    stop_token: str | None = field(default=None, metadata={"help": "TRL 1.12: 'eos' stops responses at EOS = `stop_on_eos=True` (our default)."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "TRL's field: processes for a script's own `dataset.map` (TRL 1.12's example script tokenizes with it). PPOTrainer tokenizes its prompts itself, once, in this process."})

    # overridden TrainingArguments defaults
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (LoRA)."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N iterations."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N iterations."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; None = on only on a GPU that computes in bf16 (Ampere and later; a T4 or V100 only emulates it: fp16=True there)."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "trackio, tensorboard, wandb, …"})

    def __post_init__(self):
        import json
        import math

        from ..precision import is_bf16_gpu

        self._apply_trl112_names()
        if self.bf16 is None:
            self.bf16 = is_bf16_gpu() and not self.fp16
        for name in ("kl_controller_kwargs", "aggregation_kwargs", "model_init_kwargs", "shapers", "monitor_detectors",
                     "chat_template_kwargs"):
            v = getattr(self, name)
            if isinstance(v, str):
                setattr(self, name, json.loads(v))
        if isinstance(self.audit_model_paths, (str, os.PathLike)):  # one path, as a YAML string
            self.audit_model_paths = [self.audit_model_paths]
        if self.audit_model_paths is not None and not all(isinstance(p, (str, os.PathLike)) and str(p)
                                                          for p in self.audit_model_paths):
            raise ValueError(f"audit_model_paths takes reward-model paths or Hub ids (a list of strings), got "
                             f"{self.audit_model_paths!r}. Audit functions go to PPOTrainer(audit_funcs=[...]).")
        if self.kl_target is not None and not (self.kl_target > 0 and math.isfinite(self.kl_target)):
            raise ValueError(f"kl_target (δ) must be a finite number > 0 nats, got {self.kl_target}. It bounds "
                             f"KL(π‖π_ref); use e.g. 4.0 (no bound: kl_controller='fixed' or 'adaptive').")
        if self.kl_controller != "fixed" and self.kl_target is None:
            raise ValueError(f"kl_controller={self.kl_controller!r} needs kl_target (δ > 0).")
        if self.critic not in ("shared", "separate"):
            raise ValueError(f"critic must be 'shared' or 'separate', got {self.critic!r}.")
        if self.value_head_init not in ("normal", "zeros"):
            raise ValueError(f"value_head_init must be 'normal' or 'zeros', got {self.value_head_init!r}.")
        if self.prompt_overflow not in ("error", "drop", "truncate"):
            raise ValueError(f"prompt_overflow must be 'error', 'drop' or 'truncate', got {self.prompt_overflow!r}.")
        if self.callable_normalization not in ("auto", "running", "none"):
            raise ValueError(f"callable_normalization must be 'auto', 'running' or 'none', got {self.callable_normalization!r}.")
        if self.nonfinite_rewards not in ("drop", "error"):
            raise ValueError(f"nonfinite_rewards must be 'drop' or 'error', got {self.nonfinite_rewards!r}.")
        check_backend(self.cpu_matmul_backend)
        self._check_ranges()
        self._check_trainer_arguments()
        if self.per_device_train_batch_size % self.num_mini_batches:
            raise ValueError(f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be divisible by num_mini_batches ({self.num_mini_batches}).")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):  # NaN passed `<= 0`; inf samples uniformly
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}.")
        if self.monitor_reference_prompts < 1:
            raise ValueError(f"monitor_reference_prompts must be >= 1, got {self.monitor_reference_prompts}; "
                             f"it is how many prompts the reference policy's length and EOS rate are measured on.")
        for name in ("monitor_max_queue", "monitor_cooldown"):  # a negative queue size sliced to nearly every sample
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)} (monitor_max_queue=0 queues nothing).")
        if self.kl_controller == "fixed" and self.kl_target not in (None, type(self).__dataclass_fields__["kl_target"].default):
            import warnings

            warnings.warn(f"kl_target={self.kl_target} has no effect with kl_controller='fixed' (β stays init_kl_coef="
                          f"{self.init_kl_coef}; nothing bounds or targets the KL). For KL ≤ δ use kl_controller='hard'; "
                          f"for a β that follows the target, 'adaptive' or 'lagrangian'.", UserWarning, stacklevel=3)
        super().__post_init__()
        self._check_best_metric()

    def _check_best_metric(self):
        """After TrainingArguments' own checks, which fill in metric_for_best_model="loss" for the plateau and greedy
        schedules: PPO's evaluation has no loss (its metrics: `PPOTrainer.evaluate`)."""
        if self.metric_for_best_model in ("loss", "eval_loss"):
            raise ValueError(
                f"metric_for_best_model={self.metric_for_best_model!r} (transformers' default for "
                f"lr_scheduler_type='reduce_lr_on_plateau' and 'greedy'): PPOTrainer's evaluation has no loss. Set "
                f"metric_for_best_model to one of its eval metrics — 'kl', 'length', 'eos' or an audit judge's name "
                f"— and greater_is_better to match.")

    def _apply_trl112_names(self):
        """Map TRL 1.12 PPOConfig names onto ours (a FutureWarning names the new one); conflicting values are refused."""
        import warnings

        for old, new in (("kl_coef", "init_kl_coef"), ("cliprange", "clip_range"),
                         ("cliprange_value", "clip_range_value"), ("response_length", "max_completion_length")):
            value = getattr(self, old)
            if value is None:
                continue
            default = type(self).__dataclass_fields__[new].default
            if getattr(self, new) not in (default, value):
                raise ValueError(f"Both `{old}` (TRL 1.12's name) and `{new}` are set, to different values; keep `{new}`.")
            setattr(self, new, value)
            warnings.warn(f"`{old}` is TRL 1.12's name; rlhf_ext calls it `{new}`.", FutureWarning, stacklevel=3)
        if self.stop_token not in (None, "eos"):
            raise ValueError(f"stop_token={self.stop_token!r}: rlhf_ext stops responses at the tokenizer's EOS and at "
                             f"every id of the model's generation_config.eos_token_id (stop_on_eos=True); to stop at "
                             f"another token, add its id there.")
        if self.missing_eos_penalty is not None:
            shapers = self.shapers if isinstance(self.shapers, list) else ([] if self.shapers is None else None)
            if shapers is None:
                raise ValueError("Set `missing_eos_penalty` or a `shapers` JSON string, not both (use a list).")
            self.shapers = [*shapers, {"name": "missing_eos", "penalty": float(self.missing_eos_penalty)}]
        self._warn_trl112_meanings()
        if self.total_episodes is not None:
            if self.max_steps and self.max_steps > 0:
                raise ValueError("Set `total_episodes` (TRL 1.12) or `max_steps` (iterations), not both.")
            if self.total_episodes < 1:
                raise ValueError(f"total_episodes={self.total_episodes}: it is the number of prompts to train on, "
                                 f"≥ 1 (or leave it unset and give max_steps / num_train_epochs).")
            # WORLD_SIZE: set by accelerate/torchrun; TrainingArguments' world_size is not ready before its post_init
            per_iteration = self.per_device_train_batch_size * max(1, int(os.environ.get("WORLD_SIZE", 1)))
            # rounded up, as TRL 1.12 (num_total_batches = ceil(total_episodes / batch_size)): never fewer prompts
            self.max_steps = -(-self.total_episodes // max(1, per_iteration))
        if not (self.max_steps and self.max_steps > 0) and not self.num_train_epochs > 0:  # NaN too
            raise ValueError(f"num_train_epochs={self.num_train_epochs} with max_steps unset trains no iteration: set "
                             f"num_train_epochs > 0 (passes over the prompts; fractions allowed) or max_steps ≥ 1 (PPO "
                             f"iterations). To measure the policy without training it, call trainer.evaluate().")

    def _warn_trl112_meanings(self):
        """A config written for TRL 1.12 (it uses TRL 1.12's names) runs here, but these settings mean something
        else: one warning listing the ones that apply, each with the setting that keeps TRL 1.12's behaviour."""
        import warnings

        if all(getattr(self, k) is None for k in TRL112_NAMES):
            return
        # (batch sizes need no note: with gradient_accumulation_steps=1, per_device_train_batch_size and
        # num_mini_batches mean what TRL 1.12's did — a rollout of that many prompts per process, split into that
        # many minibatches —; gradient_accumulation_steps > 1 is refused, naming TRL 1.12's rollout size)
        notes = []
        if self.kl_estimator != "k1":
            notes.append(f"kl_estimator={self.kl_estimator!r} sets the logged KL and what the controller sees; the "
                         f"reward penalty −β·KL is always k1 here (TRL 1.12 put {self.kl_estimator} in the reward)")
        defaults = type(self).__dataclass_fields__
        if self.temperature == defaults["temperature"].default:
            notes.append("temperature defaults to 1.0 here (TRL 1.12: 0.7): set temperature=0.7 to sample as before")
        if self.response_length is None and self.max_completion_length == defaults["max_completion_length"].default:
            notes.append(f"max_completion_length (TRL 1.12's response_length) defaults to "
                         f"{self.max_completion_length} here (TRL 1.12: 53)")
        if self.stop_token is None and self.stop_on_eos:
            notes.append("responses stop at EOS (TRL 1.12 generated to the full length unless stop_token='eos'): "
                         "stop_on_eos=False samples as before")
        if notes:
            warnings.warn("This config uses TRL 1.12 PPO names; what differs from TRL 1.12: " + "; ".join(notes) +
                          ". (README: \"Coming from TRL 1.12's PPO\".)", UserWarning, stacklevel=4)

    def _check_trainer_arguments(self):
        """transformers' TrainingArguments that PPOTrainer cannot honour are refused, not ignored: a user who asks
        for them would otherwise believe they ran. The ones it honours are listed in the README ("Python API")."""
        if self.torch_compile or self.torch_compile_backend or self.torch_compile_mode:
            raise ValueError("torch_compile is not supported by PPOTrainer: sampling, the reference, θ_old and the "
                             "training pass run through one eager model, and must compute one function (the KL is "
                             "exactly 0 at θ₀). Remove torch_compile / torch_compile_backend / torch_compile_mode.")
        if self.neftune_noise_alpha is not None:
            raise ValueError(f"neftune_noise_alpha={self.neftune_noise_alpha}: NEFTune adds noise to the embeddings "
                             f"of training passes (an SFT technique); in PPO the ratios would compare a noisy training "
                             f"pass with noiseless sampling. Remove neftune_noise_alpha.")
        if self.label_smoothing_factor:
            raise ValueError(f"label_smoothing_factor={self.label_smoothing_factor}: it smooths the labels of a "
                             f"classification or language-modelling loss; PPO's loss has no labels. Remove it (an "
                             f"entropy bonus is ent_coef).")
        if self.auto_find_batch_size:
            raise ValueError("auto_find_batch_size is not supported by PPOTrainer (an out-of-memory retry would "
                             "redo a rollout with another batch). `rlhf-ext plan` gives the largest batch that fits "
                             "before the run; set per_device_train_batch_size / num_mini_batches from it.")
        if self.save_strategy == "best" or self.load_best_model_at_end:
            raise ValueError("save_strategy='best' / load_best_model_at_end: PPOTrainer has no evaluation loss to "
                             "pick a best checkpoint by (higher reward is what reward hacking looks like). Use "
                             "save_strategy='steps' or 'epoch', with save_total_limit to keep the newest N.")
        if self.use_liger_kernel:
            raise ValueError("use_liger_kernel=True: PPOTrainer computes its log-probs from the full logits in its own "
                             "passes (sampling, θ_old, the reference and the training pass must compute one "
                             "function), so Liger's fused kernels would not be used. Remove use_liger_kernel.")
        import warnings

        if self.save_only_model:
            warnings.warn("save_only_model=True: PPO checkpoints still hold the optimizer, scheduler, KL controller "
                          "and RNG state (small with LoRA), so that a run resumes exactly; save_model() writes the "
                          "policy alone. Drop save_only_model to silence this.", UserWarning, stacklevel=3)
        inert = [f"{k}={getattr(self, k)!r}" for k, default in _NO_EFFECT.items() if getattr(self, k) != default]
        if inert:
            warnings.warn(f"{', '.join(inert)}: no effect in PPOTrainer, which has no DataLoader (each iteration draws "
                          f"its prompts itself, a whole global batch, the remainder of a pass left for the next "
                          f"shuffle), no prediction loop (evaluate() samples the policy) and saves on the main "
                          f"process only. Remove them to silence this.", UserWarning, stacklevel=3)

    def _check_ranges(self):
        """Numbers that would train silently wrong (or crash deep inside) are refused here, with the fix."""
        import math

        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(msg)

        need(self.max_completion_length >= 1, f"max_completion_length must be ≥ 1 token, got {self.max_completion_length}.")
        need(self.max_prompt_length >= 1, f"max_prompt_length must be ≥ 1 token, got {self.max_prompt_length}.")
        need(self.num_ppo_epochs >= 1, f"num_ppo_epochs must be ≥ 1, got {self.num_ppo_epochs}: with 0 nothing trains.")
        need(self.num_mini_batches >= 1, f"num_mini_batches must be ≥ 1, got {self.num_mini_batches}.")
        need(self.per_device_train_batch_size >= 1,
             f"per_device_train_batch_size (prompts per iteration per process) must be ≥ 1, got "
             f"{self.per_device_train_batch_size}.")
        need(math.isfinite(self.learning_rate) and self.learning_rate >= 0,
             f"learning_rate must be a finite number ≥ 0, got {self.learning_rate}.")
        need(self.clip_range > 0, f"clip_range (PPO's ε) must be > 0, got {self.clip_range}; 0.2 is usual.")
        need(self.clip_range_value > 0, f"clip_range_value must be > 0, got {self.clip_range_value}; 0.2 is usual.")
        for name in ("gamma", "lam"):
            v = getattr(self, name)
            need(0.0 <= v <= 1.0, f"{name} must be in [0, 1], got {v} (γ = 1, λ = 0.95 are the usual PPO-for-LMs values).")
        for name in ("vf_coef", "ent_coef", "init_kl_coef"):
            v = getattr(self, name)
            need(math.isfinite(v) and v >= 0, f"{name} must be a finite number ≥ 0, got {v}.")
        need(self.top_p > 0 and self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}.")
        need(self.gradient_accumulation_steps == 1,
             f"gradient_accumulation_steps={self.gradient_accumulation_steps}: PPOTrainer takes one optimizer step per "
             f"minibatch and does not accumulate; per_device_train_batch_size is the prompts of one rollout per "
             f"process. For the rollout TRL 1.12's PPO sampled (per_device_train_batch_size × "
             f"gradient_accumulation_steps), set per_device_train_batch_size="
             f"{self.per_device_train_batch_size * self.gradient_accumulation_steps} and keep num_mini_batches. For "
             f"smaller training forwards, raise num_mini_batches (more, smaller steps per epoch) or lower "
             f"per_device_train_batch_size.")


# GRPOConfig / RLOOConfig fields a script switching trainers carries over, and what PPOConfig calls or does instead.
# Refused by name, with the replacement, rather than by Python's bare "unexpected keyword argument".
_SAMPLES_PI = "nothing: generate() samples exactly π (logits processors off), so the log-probs PPO trains on are exact"
_NO_VLLM = "nothing: sampling runs through the policy's own generate() on the shared base (no vLLM)"
FROM_GRPO_RLOO = {
    "beta": "the KL settings: kl_controller='fixed' with init_kl_coef=β for a fixed penalty, or kl_target=δ for the "
            "hard bound KL ≤ δ (the default)",
    "epsilon": "clip_range (PPO's ε)",
    "epsilon_high": "clip_range (PPO clips symmetrically)",
    "num_iterations": "num_ppo_epochs (optimisation passes over each rollout batch)",
    "num_generations": "nothing: PPO samples one response per prompt and learns a critic instead of a group baseline; "
                       "per_device_train_batch_size is prompts per iteration",
    "num_generations_eval": "nothing (one response per prompt)",
    "reward_weights": "aggregation='weighted' with aggregation_kwargs={'weights': [...]}",
    "scale_rewards": "whiten_advantages (advantages normalised over the batch)",
    "normalize_advantages": "whiten_advantages",
    "loss_type": "nothing: the loss is PPO's clipped surrogate plus the value loss",
    "mask_truncated_completions": "the 'missing_eos' shaper (shapers=['missing_eos'])",
    "steps_per_generation": "num_mini_batches (optimizer steps per epoch over one rollout)",
    "generation_batch_size": "num_mini_batches",
    "repetition_penalty": "the 'repetition' shaper; " + _SAMPLES_PI,
    "top_k": _SAMPLES_PI,
    "min_p": _SAMPLES_PI,
    "generation_kwargs": _SAMPLES_PI,
    "use_vllm": _NO_VLLM,
    "entropy_coef": "ent_coef (the entropy bonus)",
    "delta": "clip_range (PPO clips symmetrically)",
    "multi_objective_aggregation": "aggregation ('mean', 'weighted', 'min', 'uwo', …) over the normalised members",
    "reward_clip_range": "clip the scores in the reward function (members are normalised before aggregation)",
    "importance_sampling_level": "nothing: PPO's ratios are per token",
    "cast_lm_head_to_fp32": "nothing: the log-probs are computed in fp32 from the LM head's output",
    "num_completions_to_print": "nothing: the monitor's report shows samples (monitor=True)",
    "cache_implementation": _NO_VLLM,
    "use_transformers_paged": _NO_VLLM,
    "use_adaptive_entropy": "ent_coef (a fixed entropy bonus; no adaptive schedule)",
    "entropy_target": "ent_coef (a fixed entropy bonus; no adaptive schedule)",
    "entropy_coef_min": "ent_coef (a fixed entropy bonus; no adaptive schedule)",
    "entropy_coef_max": "ent_coef (a fixed entropy bonus; no adaptive schedule)",
    "entropy_coef_delta": "ent_coef (a fixed entropy bonus; no adaptive schedule)",
    "top_entropy_quantile": "nothing: every response token trains (no entropy-quantile mask)",
    "sapo_temperature_pos": "clip_range: the loss is PPO's clipped surrogate (GRPO's loss_type variants are not offered)",
    "sapo_temperature_neg": "clip_range: the loss is PPO's clipped surrogate (GRPO's loss_type variants are not offered)",
    "vespo_k_pos": "clip_range: the loss is PPO's clipped surrogate (GRPO's loss_type variants are not offered)",
    "vespo_k_neg": "clip_range: the loss is PPO's clipped surrogate (GRPO's loss_type variants are not offered)",
    "vespo_lambda_pos": "clip_range: the loss is PPO's clipped surrogate (GRPO's loss_type variants are not offered)",
    "vespo_lambda_neg": "clip_range: the loss is PPO's clipped surrogate (GRPO's loss_type variants are not offered)",
    "off_policy_mask_threshold": "nothing: every rollout is sampled from the current policy (no stale generations)",
    "use_bias_correction_kl": "kl_estimator ('k1', 'k2', 'k3') for the logged KL; the hard bound uses the exact KL",
    "router_aux_loss_coef": "nothing: an MoE's router stays frozen in the base under LoRA",
    "max_tool_calling_iterations": "nothing: rollouts are single completions (no tool calls)",
    "log_completions_hub_repo": "log_completions=True (printed at each logging step) and the run report",
    "log_unique_prompts": "log_completions=True",
    "log_multimodal": "nothing: prompts are text",
    "pad_to_multiple_of": "nothing: each batch is padded to its longest row",
    "use_transformers_continuous_batching": _NO_VLLM,
    "transformers_continuous_batching_config": _NO_VLLM,
    "sync_ref_model": "nothing: the reference is the base with the adapters off",
    "ref_model_sync_steps": "nothing: the reference is the base with the adapters off",
    "ref_model_mixup_alpha": "nothing: the reference is the base with the adapters off",
}
# TRL 1.12 PPOConfig fields with no counterpart here (its renamed ones are accepted above, with a FutureWarning).
FROM_TRL112 = {
    "sft_model_path": "the model you pass to PPOTrainer (a recipe's model_name_or_path): point it at your SFT model "
                      "(an SFT LoRA adapter merged into its base and saved: merge_and_unload(), save_pretrained(dir)); "
                      "the reference is that model, with the policy's new adapter off",
    "local_rollout_forward_batch_size": "nothing: the rollout's passes run this process's batch at once; lower "
                                        "per_device_train_batch_size for memory",
    "num_sample_generations": "eval_dataset with eval_strategy: evaluate() samples the policy on held-out prompts",
    "stop_token_id": "add that id to the model's generation_config.eos_token_id: responses stop at any of them (stop_on_eos=True)",
    "whiten_rewards": "callable_normalization='running' to put the rewards on one scale (TRL 1.12 whitened the batch's "
                      "per-token rewards, their mean kept; the advantages, whitened there always, are here too: "
                      "whiten_advantages), or delete it (TRL 1.12's default, False)",
    "model_adapter_name": "nothing: a PeftModel's active adapter is the policy",
    "ref_adapter_name": "nothing: the reference is the base with every adapter off — an SFT LoRA adapter (TRL's DPO "
                        "loaded it twice, as model_adapter_name and ref_adapter_name): merge it into its base, save "
                        "that model and pass its folder; the reference is then your SFT model",
    "ds3_gather_for_generation": "nothing: DeepSpeed is not supported (data parallel runs through DDP)",
    # sizes TRL 1.12's PPOTrainer computed into its config at start-up; a config saved from a run carries them
    **dict.fromkeys(("world_size", "num_total_batches", "micro_batch_size", "local_batch_size", "batch_size",
                     "local_mini_batch_size", "mini_batch_size"),
                    "delete it: TRL computed it from the others; here per_device_train_batch_size is the prompts "
                    "of one rollout per process, num_mini_batches splits them, max_steps (or total_episodes) counts "
                    "the iterations"),
}

# The fields only a TRL 1.12 config sets: one of them set, `_warn_trl112_meanings` says what means something else here
TRL112_NAMES = ("kl_coef", "cliprange", "cliprange_value", "response_length", "total_episodes", "missing_eos_penalty",
                "stop_token")


def foreign_field_fixes(names) -> str | None:
    """For the GRPO / RLOO / TRL 1.12 PPO fields among `names`: what to use instead, one clause each; else None."""
    fixes = []
    for k in names:
        if k in FROM_GRPO_RLOO or k.startswith("vllm_"):
            fixes.append(f"`{k}` (GRPO / RLOO) → {FROM_GRPO_RLOO.get(k, _NO_VLLM)}")
        elif k in FROM_TRL112:
            fixes.append(f"`{k}` (TRL 1.12 PPO) → {FROM_TRL112[k]}")
    return "; ".join(fixes) or None


_dataclass_init = PPOConfig.__init__


@functools.wraps(_dataclass_init)
def _init_refusing_foreign_fields(self, *args, **kwargs):
    fixes = foreign_field_fixes(kwargs)
    if fixes:
        raise TypeError(f"PPOConfig got field(s) of another trainer's config that it does not have: {fixes}. "
                        f"(README: \"Coming from TRL 1.12's PPO\", \"Coming from GRPO / RLOO\".)")
    _dataclass_init(self, *args, **kwargs)


PPOConfig.__init__ = _init_refusing_foreign_fields
