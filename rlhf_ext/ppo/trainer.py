"""PPO on one shared base: policy (LoRA), reference (adapters off), critic and reward members.

One iteration (`_iteration`), top to bottom:
  rollout: sample (policy.py) → rewards (members → normalise → aggregate → shape) → reference log-probs
  → old log-probs and values (θ_old) → per-token KL penalty + GAE → epochs × minibatches of clipped policy +
  value loss → KL guard (hard mode, plugins/kl.py) → learning-rate schedule (once per iteration) → β update →
  metrics.
The math is in `rl_math.py`, the model passes in `policy.py` (all in one precision context: `precision.py`), the
log-probs and their hand-written backward in `logprobs.py`, the rewards in `reward/pipeline.py`, the estimators,
controllers and the guard in `plugins/kl.py`; TRL 1.12 argument names in `trl112.py`.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from accelerate.utils.memory import clear_device_cache
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback
from transformers.optimization import GreedyLR
from trl.trainer.utils import entropy_from_logits

from .. import rl_math as rlm
from ..adapters import (GradientReachCheck, adapter_parameters, first_step_grad_params, set_trainable,
                        wrap_with_peft, zero_dropout)
from ..cpu_linear import route_frozen_linears
from ..cpu_memory import keep_freed_memory_for
from ..data import check_dataset_type, held_in_memory, model_pad_id, stop_token_ids, tokenize_prompts
from ..distributed import as_main_process_sees_it, close_process_group_at_exit, sum_over_processes
from ..hub import (card_metadata, default_repo_id, hub_reward_artifact, push_checkpoint, reach_repo_or_explain,
                   repo_id_for_push, with_card_metadata)
from ..integrity import (check_new_run, ensure_writable_dir, output_dir_lock, resume_folder,
                         supersede_later_checkpoints, write_text_atomic)
from ..models import (activation_checkpointing_on, assert_trainable_4bit_layout, changed_from_checkpoint,
                      changed_in_memory_hint, check_model_object, ensure_pad_token, is_quantized, keep_4bit_trainable,
                      load_model, load_tokenizer, non_reward_architecture,
                      position_limit, pretrained_kwargs, tokenizer_for, warn_unquantized_experts)
from ..plugins.contract import checked_beta, checked_output
from ..plugins.kl import build_controller
from ..precision import autocast_dtype, loss_scaler
from ..prefix_cache import frozen_prefix_split, restrict_to_top_layers
from ..progress import progress
from ..registry import build, numbered
from ..reward.artifact import SPEC_FILE, is_reward_artifact, load_reward_model, read_spec, same_base
from ..reward.ensemble import RewardEnsemble, _warn_once
from ..reward.pipeline import (MIN_DROPPED_IN_A_ROW, ExternalRewardModel, RewardPipeline, call_reward_function,
                               rendering_kwargs)
from .checkpoint import (CHECKPOINT_FILES, clear_earlier_run, earlier_run, gather_process_states,
                         newest_complete_checkpoint, place_schedule_at, read_checkpoint, rotate_checkpoints,
                         undo_iteration, undo_point, write_checkpoint)
from .config import PPOConfig
from .export import model_card, push_policy, save_policy
from ..interrupt import RESUME_HOW, StopAfterIteration, free_failed_step, note_not_saved, note_saved, raised_inside
from .logprobs import token_logprobs
from .policy import CRITIC, POLICY, PolicyAndValue, Rollout
from .sampling import forked_rng
from .schedule import TrainHistory
from .trl112 import from_trl112_arguments, processing_classes_for

_NO_EVAL_LOOP = (
    "PPOTrainer.{what}: PPO has no prediction loop over a labelled dataset (its eval_dataset holds prompts, which "
    "have no loss to compute). evaluate() samples the policy on the evaluation prompts and reports eval_kl, "
    "eval_length, eval_eos and each audit judge; evaluate_policy(dataset) also returns the sampled texts "
    "(['samples']['texts']); trainer.model is the trained policy (a PeftModel) for generate() or a pipeline.")
_NO_SUPERVISED_STEP = (
    "PPOTrainer.{what}: PPO's loss is not a function of a batch of inputs: each iteration samples responses, scores "
    "them and takes the clipped policy + value steps itself (PPOTrainer._iteration). Call train(); the last "
    "iteration's batch, responses and rewards are trainer.rollout, its losses in trainer.state.log_history.")
_NO_HP_SEARCH = (
    "PPOTrainer does not support hyperparameter_search (transformers' search re-creates the model with model_init "
    "for each trial; PPOTrainer takes a model, not a model_init). Build one PPOTrainer per setting, each with its "
    "own output_dir, and compare their evaluate() metrics.")

# schedules that step on an evaluation metric, after evaluate() (transformers' Trainer steps them there too)
_METRIC_SCHEDULERS = (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR)


class _ForwardMemo:
    """The last full-batch training forward, valid while the parameters are unchanged (same `version`); taken once.
    When a forward is kept: `PPOTrainer._reusable`."""

    def __init__(self):
        self.key, self.value = None, None

    def put(self, version: int, value):
        self.key, self.value = version, value

    def take(self, version: int):
        if self.key != version:
            return None
        value, self.key, self.value = self.value, None, None
        return value

    def clear(self):
        self.key, self.value = None, None


# ----------------------------------------------------------------------------------------------- trainer
def prompts_to_stream(dataset, args: PPOConfig) -> int | None:
    """A streamed prompt set (an `IterableDataset`, TRL's `dataset_streaming`) has no length and may not end: PPO
    reads the prompts `max_steps` iterations use and no more. As TRL's Trainer, it needs `max_steps` for one."""
    if hasattr(dataset, "__len__"):
        return None
    if not (args.max_steps and args.max_steps > 0):
        raise ValueError("train_dataset is streamed (an IterableDataset, `dataset_streaming: true`): it has no length, "
                         "so num_train_epochs cannot say how many iterations to run. Set `max_steps` (PPO iterations) "
                         "or `total_episodes`, as TRL's Trainer asks for a streamed dataset.")
    return args.max_steps * args.per_device_train_batch_size * args.world_size


STEP_METRICS = ("loss/policy", "loss/value", "policy/clipfrac", "policy/approx_kl", "val/clipfrac", "policy/entropy",
                "grad_norm")  # what each optimizer step records (`_step_means` averages them over the iteration)
EVAL_METRICS = ("kl", "length", "eos")  # what evaluate_policy / evaluate report besides the audit judges


class PPOTrainer(Trainer):
    """PPO for the current HF stack; call shape mirrors TRL's GRPO/RLOO trainers.

    Args:
        model: hub id, local folder, `.gguf`, the embedded default name, a causal LM, or a `PeftModel`.
        reward_funcs: one or a list of: reward-model artifact path / `RewardEnsemble` (members attached to the
            policy's base as adapters when it matches), a sequence-classification model or its Hub id / folder (as
            TRL's online trainers take it: what `trl.RewardTrainer` saves), an `ExternalRewardModel`, or a Python
            callable with TRL's `reward_funcs` signature.
        args: `PPOConfig`.  train_dataset: TRL prompt-only dataset.  processing_class: tokenizer.
        peft_config: LoRA config for the policy (and the separate critic); default LoRA r=16 on PEFT's target modules
            for the architecture (`architectures.py`) when `model` is not already a `PeftModel`.
        load_in_4bit: load `model` (a name) in 4-bit NF4 with double quantisation; `quantization_config`: a
            `BitsAndBytesConfig` of your own instead (as the recipes build it from TRL's `ModelConfig`).
        audit_funcs: judges with the `reward_funcs` signature (e.g. a gold reward), logged as `audit/<name>` beside
            the proxy reward to spot reward hacking; never used in the loss.
        eval_dataset: prompts (TRL prompt-only format) `evaluate()` samples the policy on — on `eval_strategy`'s
            cadence during train(), or when called; a dict of named sets is evaluated set by set.
        reward_processing_classes: GRPO's — one tokenizer (or None) per `reward_funcs` entry, for a
            sequence-classification reward model (which otherwise loads its own).
        reward_model: TRL 1.12's name (a sequence-classification reward model joins `reward_funcs`); `ref_model`,
            `value_model`, `data_collator` and `optimizers` exist only to say what replaced them (README: "Coming
            from TRL 1.12").
    """

    def __init__(self, model, reward_funcs=None, args: PPOConfig | None = None, train_dataset=None,
                 processing_class=None, peft_config=None, callbacks: list[TrainerCallback] | None = None,
                 load_in_4bit: bool = False, audit_funcs=None, *, quantization_config=None, reward_model=None,
                 eval_dataset=None, reward_processing_classes=None, ref_model=None, value_model=None,
                 data_collator=None, optimizers=(None, None)):
        from peft import PeftModel

        from ..architectures import final_hidden_size, resolve_lora_config

        reward_funcs = from_trl112_arguments(reward_funcs, reward_model, ref_model, value_model, data_collator, optimizers)
        given = len(reward_funcs) - (reward_model is not None)  # TRL 1.12's reward_model came last, with no tokenizer
        reward_tokenizers = processing_classes_for(reward_processing_classes, given) + [None] * (len(reward_funcs) - given)
        args = args or PPOConfig("ppo-output")
        if not isinstance(args, PPOConfig):
            raise TypeError(f"`args` must be a rlhf_ext.PPOConfig, got {type(args).__name__}: build a PPOConfig with "
                            f"the same settings (a GRPOConfig's or RLOOConfig's own fields are named in the README, "
                            f"\"Coming from GRPO / RLOO\").")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required (TRL prompt-only format: a 'prompt' column).")
        check_dataset_type(train_dataset)
        streamed_prompts = prompts_to_stream(train_dataset, args)  # refused before a model loads, if it must be
        if is_reward_artifact(args.output_dir):  # the policy's files and manifest would replace the reward model's
            raise ValueError(f"output_dir {args.output_dir} holds a reward model (its {SPEC_FILE}): PPO would write "
                             f"the policy over it and its manifest. Give PPO its own output_dir.")
        ensure_writable_dir(args.output_dir)
        torch.manual_seed(args.seed)

        # Policy = LoRA adapter on the frozen base; reference = the same base with adapters disabled
        self.model_name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
        given_object = not isinstance(model, str)
        if isinstance(model, str):
            init = pretrained_kwargs(args, quantization_config)
            if processing_class is None:  # the tokenizer of the weights' revision
                processing_class = tokenizer_for(model, init)
            model = load_model(model, "causal", load_in_4bit=load_in_4bit, **init)
        else:
            check_model_object(model, "PPOTrainer", load_in_4bit=load_in_4bit, quantization_config=quantization_config,
                               model_init_kwargs=args.model_init_kwargs)
        if processing_class is None:
            raise ValueError("Pass `processing_class` (the tokenizer) when `model` is an instantiated model.")
        self.tokenizer = ensure_pad_token(processing_class)
        keep_4bit_trainable(model)  # bitsandbytes' CPU inference layout has no backward
        if given_object:  # an SFT adapter merged in memory keeps its base's name, which the saved policy would record
            changed = changed_from_checkpoint(model, self.model_name)
            if changed:
                warnings.warn(changed_in_memory_hint(
                    "PPOTrainer", self.model_name, changed,
                    "The saved policy (its adapter_config.json's base_model_name_or_path, its model card) would name "
                    "that folder as the base it loads on, where it computes another policy."), UserWarning, stacklevel=2)
        if isinstance(model, PeftModel):
            if peft_config is not None:
                raise ValueError("`model` is already a PeftModel; drop `peft_config` or pass the base model.")
            if args.lora_top_layers:  # its adapter's layers are set already: the option would silently do nothing
                raise ValueError(f"lora_top_layers={args.lora_top_layers} places the LoRA adapter PPOTrainer creates, "
                                 f"but `model` is already a PeftModel with its own adapter. Pass the base model (with "
                                 f"peft_config, or none for the default LoRA), or make the PeftModel with "
                                 f"LoraConfig(layers_to_transform=[...]) and drop lora_top_layers.")
            self.policy_adapter = model.active_adapter  # the user's adapter is the policy
        else:
            if is_quantized(model):
                from peft import prepare_model_for_kbit_training

                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
            peft_config = resolve_lora_config(peft_config, model, r=16, lora_alpha=32, lora_dropout=0.0)
            peft_config.task_type = "CAUSAL_LM"
            restrict_to_top_layers(peft_config, model, args.lora_top_layers)
            model = wrap_with_peft(model, peft_config, POLICY)
            self.policy_adapter = POLICY
        place_on_training_device(model, args)
        warn_unquantized_experts(model)  # a 4-bit MoE's experts stay full precision (fp32 after kbit preparation)
        if args.gradient_checkpointing:  # enabled here: Trainer does it in its own train(), which PPO replaces
            if not args.activation_checkpointing_kwargs:
                args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs = {"use_reentrant": False}
            # as Trainer.train: `every_n_layers` and `offload` are activation_checkpointing_enable's own arguments; the
            # rest goes to torch.utils.checkpoint (which hands a keyword it does not know to the layer: ignored there)
            ckpt_kwargs = dict(args.activation_checkpointing_kwargs)
            every_n_layers, offload = ckpt_kwargs.pop("every_n_layers", 1), ckpt_kwargs.pop("offload", False)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs,
                                                  every_n_layers=every_n_layers, offload=offload)
            model.enable_input_require_grads()
        self.quantized = is_quantized(model)

        # Critic: value head on the policy trunk (shared, default) or its own adapter on the same base
        hidden = final_hidden_size(model)  # what the LM head reads (OPT-350m projects it: not hidden_size)
        if args.critic == "separate":
            torch.manual_seed(args.seed + 1)
            model.add_adapter(CRITIC, _critic_config(model, model.peft_config[self.policy_adapter]))
        if args.disable_dropout:  # after every adapter exists: LoRA's own dropout modules included
            zero_dropout(model)
        # fp32 as the passes feed it, whatever torch's default dtype (a user's bfloat16 one failed at the first pass)
        value_head = nn.Linear(hidden, 1, dtype=torch.float32)
        if args.value_head_init == "zeros":  # V ≡ 0 at first: no baseline rather than a random one
            nn.init.zeros_(value_head.weight)
        else:
            nn.init.normal_(value_head.weight, std=1 / math.sqrt(hidden + 1))
        nn.init.zeros_(value_head.bias)
        value_head.to(next(model.parameters()).device)
        self.trained_adapters = [self.policy_adapter] + ([CRITIC] if args.critic == "separate" else [])
        # One precision for every pass: what accelerate will run the training forward in (bf16 flag or launcher)
        autocast = autocast_dtype(args.mixed_precision)
        self.policy = PolicyAndValue(model, value_head, args.critic, args.temperature,
                                     exact_training=args.disable_dropout, autocast=autocast,
                                     pad_id=model_pad_id(self.tokenizer, model), cpu_sampling=args.cpu_fast_sampling,
                                     cpu_matmul_backend=args.cpu_matmul_backend)
        self.compute_dtype = self.policy.compute_dtype  # the dtype its matmuls run in (precision.compute_dtype)

        # Rewards: members → normalise → aggregate → shape
        if args.reward_model_path:
            reward_funcs, reward_tokenizers = [args.reward_model_path, *reward_funcs], [None, *reward_tokenizers]
        if not reward_funcs:
            raise ValueError("Pass at least one reward: `reward_funcs=` a reward-model path, model or callable.")
        members = [self._reward_member(r, model, args, t) for r, t in zip(reward_funcs, reward_tokenizers)]
        n_members = sum(len(getattr(m, "names", None) or [0]) for m in members)
        if n_members < 2 and args.aggregation in ("min", "uwo", "median"):
            raise ValueError(f"aggregation={args.aggregation!r} combines several reward members, but there is only "
                             f"{n_members}: it would silently be the plain reward. Use aggregation='mean', or give "
                             f"more members (a reward artifact trained with ensemble_size ≥ 2, or several reward_funcs).")
        self.rewards = RewardPipeline(members, args.aggregation, args.aggregation_kwargs, args.shapers,
                                      args.nonfinite_rewards, eos_token_id=stop_token_ids(self.tokenizer, model),
                                      callable_normalization=args.callable_normalization)
        self.rewards.chat_template_kwargs = args.chat_template_kwargs  # the prompts' rendering, for reward models too
        self.rewards.model_precision = self.policy.precision  # reward models on the shared base compute in its dtype
        self.kl_ctl = build_controller(args.kl_controller, args.init_kl_coef, args.kl_target,
                                       **(args.kl_controller_kwargs or {}))
        self.kl_estimator = build("kl_estimator", args.kl_estimator)
        # Audit judges (e.g. a gold reward) are logged next to the proxy to spot hacking; they never train.
        # Two of one name (two lambdas, two folders called `rm`) keep their own metrics: "rm", "rm#2".
        judges = [self._judge(j, i, model, args)
                  for i, j in enumerate([*(args.audit_model_paths or []), *(audit_funcs or [])])]
        self.audit_funcs = {name: judge for name, (_, judge) in numbered(judges, lambda nj: nj[0]).items()}

        # Trainable: exactly the policy (+ critic) adapter parameters, decided by PEFT, plus the value head
        self._set_trainable()
        # On CPU with fp32 weights, the frozen base's matmuls (and those of reward models loaded beside it) run through
        # the faster kernel this machine measured; installed before any pass, the start-up checks included, so that
        # every pass computes one function
        scorers = [m.model for m in members if isinstance(getattr(m, "model", None), nn.Module)]
        # (under autocast every pass takes F.linear in the autocast dtype: nothing to route, and the card says "torch")
        routed = route_frozen_linears([model, *scorers], args.cpu_matmul_backend, args.device) if autocast is None else 0
        policy_params = adapter_parameters(model, self.policy_adapter)
        self._guard_params = [p for p in policy_params.values() if p.requires_grad]
        # a separate critic's adapter gets its gradient through the value head alone: none while the head's weight
        # is 0 (value_head_init="zeros", the first step) or the value clip holds every token, so it is checked on the
        # steps whose value loss reaches the head (`_step`)
        critic = [CRITIC] if args.critic == "separate" and args.vf_coef > 0 else []
        self._reach_check = GradientReachCheck(first_step_grad_params(model, [self.policy_adapter]), "PPOTrainer",
                                               self.quantized, gated=first_step_grad_params(model, critic))

        # Frozen-prefix cache: layers below every trained adapter run once per rollout, not once per pass
        if args.cache_frozen_layers:
            with self.policy.precision():  # verified in the precision it will run in
                self.policy.split = frozen_prefix_split(model, self.trained_adapters, whole_model=True,
                                                        train_mode=not args.disable_dropout)
        # Shared prompt prefix: the tokens a batch's prompts all begin with run once per pass (shared_prefix.py)
        sharing = "off (share_prompt_prefix=False)"
        if args.share_prompt_prefix:
            if self.policy.split is not None:
                sharing = "off (the frozen-prefix cache runs the shared layers once already)"
            elif args.gradient_checkpointing or activation_checkpointing_on(model):
                sharing = "off (gradient checkpointing: transformers' checkpointed layers drop the key/value cache the " \
                          "shared tokens are held in)"
            else:
                why = self.policy.verify_shared_prefix()
                sharing = "on" if why is None else f"off ({why})"
                if why is not None:
                    warnings.warn(f"share_prompt_prefix is off: {why}. Training is unaffected, only slower; set "
                                  f"share_prompt_prefix=False to silence this.")
        for member in members:  # reward members on the policy's base score in its precision: exact there too
            if isinstance(member, RewardEnsemble) and member.model is model:
                member.share_prefix = self.policy.share_prefix
        self.prompts = tokenize_prompts(train_dataset, self.tokenizer, args, limit=streamed_prompts)
        self.streamed = streamed_prompts is not None
        if self.streamed and len(self.prompts) < streamed_prompts:  # a short stream: passed over again, as Trainer
            per_batch = args.per_device_train_batch_size * args.world_size
            tail = len(self.prompts) % per_batch
            unused = (f", and its last {tail} prompt(s) are never used (an iteration takes a whole batch; load the "
                      f"prompts as a Dataset, reshuffled every pass, to use them all)") if tail else ""
            warnings.warn(f"train_dataset streamed {len(self.prompts)} usable prompts, fewer than the {streamed_prompts} "
                          f"that max_steps={args.max_steps} iterations of {per_batch} use: it is read again from its "
                          f"start, in the same order{unused}.", stacklevel=2)
        self._check_reward_templates([*members, *self.audit_funcs.values()])
        # checked now, not at the first evaluation hours into the run; named sets (a dict) each
        held = {}
        for name, ds in (eval_dataset.items() if isinstance(eval_dataset, dict) else [(None, eval_dataset)]):
            if ds is not None:
                check_dataset_type(ds, "eval_dataset" + (f"[{name!r}]" if name else ""))
                held[name] = held_in_memory(ds)
                tokenize_prompts(held[name], self.tokenizer, args, min_rows=1,
                                 desc="Checking the evaluation prompts" + (f" ({name})" if name else ""))
        if held:
            eval_dataset = held if isinstance(eval_dataset, dict) else held[None]
        self._check_best_metric_names(args, held)
        self._check_token_ids(model)
        self._fit_positions(args)
        for shaper in self.rewards.shapers:
            idle = shaper.idle_within(args.max_completion_length)
            if idle:
                warnings.warn(f"The {shaper.name!r} shaper can never charge a response here: {idle}.", stacklevel=2)
        self.startup = self.policy.start_up_checks(self.tokenizer, [ids for _, ids in self.prompts[:2]], args.top_p,
                                                   self.compute_dtype, self._position_limit())
        self.startup["shared_prompt_prefix"] = sharing
        self.startup["cpu_matmul"] = f"oneDNN ({routed} frozen fp32 linears)" if routed else "torch"
        assert_trainable_4bit_layout(model, "PPOTrainer")  # after the check's generate(): 4-bit layers still train
        self._check_startup(args)
        self.kl_guard = self.kl_ctl.guard(self._guard_params, self._guard_params) if self.kl_ctl.enforce else None

        self.args = args
        self.monitor = None
        if args.monitor:  # reward-hacking detectors after every iteration (monitor/monitor.py)
            from ..monitor.monitor import RewardHackingMonitor, build_detectors

            self.monitor = RewardHackingMonitor(self, build_detectors(args.monitor_detectors), args.monitor_max_queue,
                                                args.monitor_cooldown)
            callbacks = [self.monitor, *(callbacks or [])]
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=self.tokenizer, callbacks=callbacks)
        close_process_group_at_exit()
        # on CPU, each pass would otherwise page-fault its activations in again (cpu_memory.py)
        self.cpu_memory = keep_freed_memory_for(args)
        if args.gradient_checkpointing:
            from ..reward.ensemble import replay_with_adapter_state

            # Recompute each checkpointed layer with the adapter state of its forward pass: the separate critic's
            # forward runs under its own adapter, its backward after the policy's is active again.
            replay_with_adapter_state(model, bool(args.activation_checkpointing_kwargs.get("use_reentrant", True)))
        self.train_policy = self._prepare_data_parallel()
        # fp16 autocast, fp16 weights or a 4-bit base computing in fp16: gradients pass through fp16 activations
        self.grad_scaler = loss_scaler(self.accelerator, self.compute_dtype)
        self._check_fp16_parameters()
        # under DDP a process whose whole share is dropped trains with a zero loss; the global batch decides
        self.rewards.batch_is_a_share = self.accelerator.num_processes > 1
        self.iteration, self.data_epoch, self.data_pos = 0, 0, 0
        self.version = 0  # +1 whenever the trained parameters change (optimizer step, guard): keys `_memo`
        self.rollout: Rollout | None = None  # the last rollout (monitors, tests)
        self.heldout: dict | None = None  # the last evaluate_policy summary (model card)
        self.heldout_iteration: int | None = None  # the iteration it evaluated
        self._metrics_history: list[dict] = []
        self._warned_kl_nonfinite = False
        self._params_moved = False  # an optimizer step taken in the iteration under way (`_save_after_failure`)
        self._dropped_in_a_row = 0  # global samples dropped since the last one kept (DDP's whole-batch rule)
        self._pending_metrics: dict[str, list[float]] = {}  # what reward functions log_metric() this iteration
        self._pending_extra: dict[str, list] = {}  # and log_extra(), per completion of this rollout
        self._memo = _ForwardMemo()
        self._card = {}  # model-card metadata given to create_model_card(), kept by save_model() / push_to_hub()
        self.eval_dataset = eval_dataset

    # -- setup helpers -----------------------------------------------------------------------------------------
    def _reward_member(self, r, model, args: PPOConfig, tokenizer=None):
        """`tokenizer`: the member's entry of `reward_processing_classes`, for a sequence-classification model."""
        from transformers import PreTrainedModel

        if isinstance(r, (str, os.PathLike)):
            r = hub_reward_artifact(r) or r  # a Hub repo the reward trainer pushed: its snapshot, hosted alike
            if Path(r).expanduser().exists():  # `~/rm`: as load_model and the recipes' checks take a path
                r = str(Path(r).expanduser())
            if not is_reward_artifact(r):
                return self._sequence_classifier(str(r), args, tokenizer)
            spec = read_spec(r)
            if spec["mode"] != "full" and same_base(spec, model, self.model_name):
                if bool(spec.get("load_in_4bit")) != is_quantized(model):  # the same weights, another function
                    trained, here = (("4-bit", "full-precision") if spec.get("load_in_4bit")
                                     else ("full-precision", "4-bit"))
                    # a pre-quantised policy checkpoint loads in 4-bit whatever load_in_4bit says: name the
                    # full-precision checkpoint the reward model trained on instead
                    fix = ("load_in_4bit=True" if spec.get("load_in_4bit") else
                           f"in full precision: from {spec.get('base_model') or 'the full-precision checkpoint'!r} "
                           f"without load_in_4bit (a pre-quantised checkpoint loads in 4-bit whatever it says)")
                    warnings.warn(f"Reward model {r} was trained on a {trained} copy of this base and is hosted on "
                                  f"the policy's {here} one: its members score through other rounding than they "
                                  f"trained with (and were normalised with), so its rewards shift somewhat. Load the "
                                  f"policy as the reward model trained ({fix}), or retrain the reward model on "
                                  f"the policy's base as loaded here.", UserWarning, stacklevel=3)
                return load_reward_model(r, base_model=model, tokenizer=None,
                                         adapter_prefix=_free_adapter_prefix(model, spec["adapters"]))
            why = ("it was trained in full mode (its own trunk, no adapters to attach)" if spec["mode"] == "full" else
                   f"it was trained on {spec.get('base_model')!r}, a different base from this policy's "
                   f"({self.model_name!r})")
            warnings.warn(f"Reward model {r}: {why}; loading it as a separate model (its own copy in memory).")
            return load_reward_model(r)
        if isinstance(r, PreTrainedModel):
            return ExternalRewardModel(r, tokenizer or self._reward_tokenizer(r))
        if isinstance(r, RewardEnsemble) or callable(r) or hasattr(r, "score_completions"):
            return r
        raise TypeError(f"Unsupported reward {type(r).__name__}: use a path, RewardEnsemble, model or callable.")

    def _sequence_classifier(self, name: str, args: PPOConfig, tokenizer=None):
        """What TRL's online trainers take as a reward string, where it is not an rlhf_ext artifact: a
        sequence-classification model — a Hub id or the folder `trl.RewardTrainer` saved — loaded with
        num_labels=1 and the policy's `model_init_kwargs`, on the policy's device, scored with its own tokenizer."""
        _refuse_multi_label(name, args.trust_remote_code)
        try:
            init = {k: v for k, v in (args.model_init_kwargs or {}).items() if k != "revision"}  # the policy repo's
            # scoring only (eval mode): an 8-bit reward model works as TRL's online trainers load it
            model = load_model(name, "seq_cls", num_labels=1, trust_remote_code=args.trust_remote_code,
                               allow_8bit=True, **init)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"Reward {name!r} is neither an rlhf_ext reward-model artifact (no {SPEC_FILE}) nor a "
                f"sequence-classification model transformers can load ({e}). Pass the output_dir of "
                f"RewardEnsembleTrainer / recipes/reward_modeling.py, the folder or Hub id of a sequence-classification "
                f"reward model (what trl.RewardTrainer saves), a model, or a callable.") from e
        saved_as = non_reward_architecture(getattr(model.config, "architectures", None))
        if saved_as:
            raise ValueError(
                f"Reward {name!r} was saved as a {saved_as}, not a reward model: loaded for scoring, its score head "
                f"would be random (PPO would chase noise). Train a reward model on it first (`rlhf-ext reward`, or "
                f"RewardEnsembleTrainer) and pass that output_dir, or a sequence-classification reward checkpoint.")
        if not is_quantized(model):  # a 4-bit model is placed where it was loaded
            model.to(self.policy.device)
        return ExternalRewardModel(model, tokenizer or self._reward_tokenizer(model), name=Path(name).name or name)

    def _judge(self, j, i: int, model, args: PPOConfig) -> tuple[str, object]:
        """(name, judge) of an `audit_funcs` entry: a function as it is; a reward-model path, model or artifact loaded
        as a reward member is (scored on its raw scale). Named by the function, the folder, or `name=`."""
        if callable(j) and not isinstance(j, nn.Module) and not hasattr(j, "score_completions"):
            return getattr(j, "__name__", f"audit_{i}"), j
        member = self._reward_member(j, model, args)
        names = getattr(member, "names", [])
        if isinstance(j, (str, os.PathLike)):
            return Path(j).name or f"audit_{i}", member
        return (names[0] if len(names) == 1 and names[0] != "external" else f"audit_{i}"), member

    def _check_reward_templates(self, scorers) -> None:
        """Conversational prompts reach a reward model with its own tokenizer as prompt + completion rendered by that
        tokenizer's chat template: one without a template is refused now, not at the first rollout."""
        if not self.prompts or not isinstance(self.prompts[0][0], list):
            return
        for m in scorers:
            if isinstance(m, ExternalRewardModel) and not getattr(m.tokenizer, "chat_template", None):
                raise ValueError(
                    f"Reward model {m.names[0]!r}: the prompts are conversational, and its tokenizer has no chat "
                    f"template to render prompt + completion with. Pass reward_processing_classes=[...] with the "
                    f"tokenizer it was trained with (one with a chat_template), or give text prompts.")

    def _reward_tokenizer(self, r):
        """A reward model's own tokenizer from where it was loaded; else (built in code, or offline) the policy's, as
        TRL 1.12 used it, when it fits the model's vocabulary (said: the same size is not the same vocabulary). A
        folder whose tokenizer cannot be loaded (saved without one) is an error: the policy's ids would be read as
        another vocabulary's, silently."""
        source = r.config._name_or_path
        try:
            return load_tokenizer(source)
        except (OSError, ValueError) as e:  # FileNotFoundError is an OSError
            if source and Path(source).is_dir():
                raise ValueError(f"Reward model {source!r}: its tokenizer could not be loaded ({e}). Pass "
                                 f"reward_processing_classes=[its tokenizer], in the order of reward_funcs.") from e
            if len(self.tokenizer) <= r.get_input_embeddings().weight.shape[0] + 1:  # +1: a [PAD] added unresized
                warnings.warn(f"Reward model {type(r).__name__} ({source or 'built in code'}) has no tokenizer of its "
                              f"own to load; it is scored with the policy's, whose vocabulary fits its embeddings. "
                              f"Pass reward_processing_classes=[its tokenizer] if it was trained with another.",
                              UserWarning, stacklevel=4)
                return self.tokenizer
            raise ValueError(f"Could not load the tokenizer of reward model {r.config._name_or_path!r} ({e}), and the "
                             f"policy's tokenizer does not fit its vocabulary. Pass "
                             f"rlhf_ext.ExternalRewardModel(model, its_tokenizer) instead.") from e

    def _set_trainable(self):
        set_trainable(self.policy.peft, self.trained_adapters)
        if self.quantized:  # keep LoRA math in fp32 on a 4-bit base
            for p in self.policy.peft.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        self.policy.value_head.requires_grad_(True)

    def _check_token_ids(self, model):
        """A prompt token outside the embedding (tokens added to the tokenizer without resizing) cannot be embedded;
        padding is never a problem (padded positions get an in-range id, `PolicyAndValue._inputs`)."""
        rows = model.get_input_embeddings().weight.shape[0]
        bad = next(((i, t) for i, (_, ids) in enumerate(self.prompts) for t in ids if t >= rows), None)
        if bad is not None:
            raise ValueError(
                f"Prompt {bad[0]} contains token id {bad[1]}, but the model's embedding has only {rows} rows: the "
                f"tokenizer has tokens the model does not (added with add_special_tokens/add_tokens?). Call "
                f"model.resize_token_embeddings(len(tokenizer)) before passing the model, or stop adding the token. "
                f"(A pad token added without resizing is fine: padding never reaches the embedding.)")

    def _position_limit(self) -> int | None:
        return position_limit(self.policy.peft.get_base_model())

    def _completion_room(self, rows, what: str) -> int | None:
        """How many tokens the model's positions leave after the longest prompt of `rows` (None: no limit known);
        refused, naming `what`, when a prompt fills them."""
        limit = self._position_limit()
        longest = max(len(ids) for _, ids in rows)
        if limit and longest >= limit:
            raise ValueError(f"{what} has {longest} tokens but the model has only {limit} positions. Lower "
                             f"`max_prompt_length` with prompt_overflow='truncate' (or 'drop').")
        return limit - longest if limit else None

    def _fit_positions(self, args):
        """Prompt + completion must fit the model's positions: clip the completion length, or refuse."""
        room = self._completion_room(self.prompts, "A prompt")
        # `args` is the PPOConfig the user holds (`trainer.args is args`, as in Trainer): a clip stays in it, so a
        # config reused for another trainer (a notebook, a sweep) carries the clip, and says so where it costs
        requested, clipped = getattr(args, "_clipped_completion_length", (None, None))
        if clipped is not None and args.max_completion_length == clipped and (room is None or room > clipped):
            warnings.warn(f"This PPOConfig's max_completion_length={clipped} is an earlier PPOTrainer's clip of "
                          f"{requested} to its model's positions; this model has room for "
                          f"{requested if room is None else min(requested, room)}. Set max_completion_length again "
                          f"(or build a new PPOConfig) to sample longer responses.")
        if room is None or args.max_completion_length <= room:
            return
        warnings.warn(f"max_completion_length={args.max_completion_length} + the longest prompt "
                      f"({self._position_limit() - room} tokens) exceeds the model's {self._position_limit()} "
                      f"positions: max_completion_length clipped to {room} (in this PPOConfig).")
        args._clipped_completion_length = (args.max_completion_length, room)
        args.max_completion_length = room

    def _check_startup(self, args):
        s = self.startup
        if not math.isfinite(s["init_vs_reference"]):
            raise ValueError(
                "The policy adapter's forward is not finite at initialisation (NaN/inf logits). With DoRA this happens "
                "on a weight with an all-zero row — e.g. a tied LM head whose padding embedding is zero — because DoRA "
                "divides by the row norms. Drop the LM head from target_modules, or use plain LoRA (use_dora=False).")
        starts_elsewhere = s["init_vs_reference"] > 1e-4
        if starts_elsewhere:
            msg = (f"The policy adapter does not start at the reference: max |logit(π_θ0) − logit(π_ref)| = "
                   f"{s['init_vs_reference']:.3g}. The reference is the base with adapters disabled, so either the "
                   f"adapter was already trained (merge it into the base and save that model, then pass its folder: "
                   f"merged = model.merge_and_unload(); merged.save_pretrained(dir); tokenizer.save_pretrained(dir); "
                   f"model=dir — a merged model passed in memory keeps its base's name, which the saved policy would "
                   f"then record as the base it loads on) or its initialisation is not the identity "
                   f"(init_lora_weights=False / 'gaussian' with a non-zero B, PiSSA/OLoRA/LoftQ rewriting the base; use "
                   f"init_lora_weights=True).")
            if self.kl_ctl.enforce:
                raise ValueError(msg + " The hard KL constraint needs π_θ0 = π_ref.")
            warnings.warn(msg + f" With kl_controller={self.kl_ctl.name!r} the KL penalty is measured from the base, "
                                f"and starts above 0.")
        if args.disable_dropout and not s["train_vs_eval"] <= 1e-5:
            raise ValueError(
                f"With dropout disabled, the model still computes different logits in training mode than in eval mode "
                f"(max |Δ| = {s['train_vs_eval']:.3g}): it has train-only behaviour rlhf_ext could not switch off (a "
                f"dropout it does not recognise, router noise in a mixture of experts, …). PPO's ratios and the KL "
                f"guard would be inexact. Switch it off in the model's config, or set disable_dropout=False (training "
                f"passes keep it; the KL guard still measures in eval mode).")
        # (a policy that starts elsewhere, warned above, differs from the reference by design: nothing to compare)
        if not starts_elsewhere and not s["training_vs_reference"] <= s["training_vs_reference_tolerance"]:
            raise ValueError(
                f"At initialisation the training pass and the reference disagree: KL(π_θ0‖π_ref) = "
                f"{s['training_vs_reference']:.3g} nats per sequence (allowed {s['training_vs_reference_tolerance']:g}) "
                f"in {s['compute_dtype']}. Both are the same full forward, so something runs differently in training: "
                f"a module with train-only behaviour, or a precision context applied to one pass only. PPO's KL "
                f"penalty and the hard-KL guard would be wrong from the first iteration.")
        tol = s.get("sampling_vs_training_tolerance")
        if tol is not None and (not s["sampling_vs_training"] <= tol or s.get("sampling_masked_tokens", 0)):
            raise ValueError(
                f"generate() samples from a different distribution than the one PPO trains: mean per-token "
                f"KL(sampling‖training) = {s['sampling_vs_training']:.3g} (max |Δ log p| "
                f"{s['sampling_vs_training_max_dlogp']:.3g}, {s['sampling_masked_tokens']} tokens masked), above the "
                f"{tol:g} that {s['compute_dtype']} rounding explains (KV-cache decoding vs a full forward; see "
                f"rlhf_ext/precision.py). Something processes the logits in generate() that the training forward does "
                f"not reproduce — a generation_config setting rlhf_ext does not know, or the architecture's own "
                f"sampling code. PPO's ratios would refer to the wrong distribution. Check model.generation_config; "
                f"if it is clean, please report the architecture ({type(self.policy.peft.get_base_model()).__name__}).")
        if args.top_p < 1.0:
            warnings.warn(f"top_p={args.top_p} < 1: responses are sampled from a truncated distribution, not π; PPO "
                          f"ratios, the KL penalty and the hard-KL bound refer to the untruncated π (the nucleus "
                          f"samplers of π and π_ref may differ by more), and the start-up check that sampling matches "
                          f"the training pass is skipped. Use top_p=1 for exact PPO.")
        if args.whiten_advantages and args.per_device_train_batch_size * args.max_completion_length == 1 \
                and args.world_size == 1:
            warnings.warn("whiten_advantages=True over a batch of one response token: the whitened advantage is "
                          "exactly 0, so the policy gets no gradient. Set whiten_advantages=False, or sample more "
                          "tokens per iteration (per_device_train_batch_size, max_completion_length).")

    def trainable_parameters(self):
        return [p for p in self.policy.peft.parameters() if p.requires_grad] + list(self.policy.value_head.parameters())

    def _check_fp16_parameters(self) -> None:
        """Under fp16 the trained parameters stay fp32 (autocast computes in fp16): a loss scaler cannot unscale
        fp16 gradients, and Adam's updates of a few 1e-5 vanish below fp16's resolution of a weight."""
        if self.grad_scaler is None:
            return
        half = [n for n, p in self.policy.peft.named_parameters() if p.requires_grad and p.dtype == torch.float16]
        if half:
            raise ValueError(
                f"Training in fp16 (fp16=True, fp16 weights or a 4-bit base computing in fp16) keeps the trained "
                f"parameters in fp32, but {len(half)} of them are fp16 ({half[0]}{', …' if len(half) > 1 else ''}). "
                f"Let PEFT keep the adapters in fp32 (its default, autocast_adapter_dtype=True, when the PeftModel is "
                f"made) or load the model in float32 with fp16=True.")

    def create_optimizer(self, model=None):
        """`optim` with its settings, and `weight_decay` as transformers' Trainer applies it: on matrices (LoRA
        factors, the value head's weight), never on biases. (It used to be left out: torch's AdamW then decayed every
        parameter by its own default, 0.01, whatever the config said.)"""
        if self.optimizer is None:
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args)
            params, decay = self.trainable_parameters(), self.args.weight_decay
            groups = [{"params": params, "weight_decay": 0.0}]  # one group when nothing decays: older checkpoints load
            if decay:
                groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": decay},
                          {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
            self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    # -- rollout -----------------------------------------------------------------------------------------------
    def _next_prompts(self):
        """This process's share of the next global batch (same order on every process, disjoint slices)."""
        B, world, rank = self.args.per_device_train_batch_size, self.accelerator.num_processes, self.accelerator.process_index
        if self.data_pos + B * world > len(self.prompts):
            self.data_epoch, self.data_pos = self.data_epoch + 1, 0
        seed = self.args.seed if self.args.data_seed is None else self.args.data_seed  # transformers' data order seed
        g = torch.Generator().manual_seed(seed + self.data_epoch)
        # a stream is read in its own order (shuffle it with IterableDataset.shuffle): a permutation of the prompts
        # read so far would reorder when a resumed run reads further (max_steps raised), repeating some, skipping others
        order = (torch.randperm(len(self.prompts), generator=g).tolist()
                 if self.args.shuffle_dataset and not self.streamed else list(range(len(self.prompts))))
        start = self.data_pos + rank * B
        batch = [self.prompts[i] for i in order[start : start + B]]
        self.data_pos += B * world
        return batch

    def _mean_over_processes(self, x: float) -> float:
        """Every process must take the same KL decisions, or their adapters drift apart."""
        if self.accelerator.num_processes == 1:
            return x
        return float(self.accelerator.reduce(torch.tensor(x, dtype=torch.float64, device=self.args.device),
                                            reduction="mean"))

    def _prepare_data_parallel(self):
        """The trainable part (policy and critic adapters, value head) through `accelerator.prepare`: DDP averages
        the gradients. The frozen base is identical on every process, so DDP is told to leave it alone (no
        broadcast of a multi-GB 4-bit base, no buckets for it)."""
        if self.accelerator.num_processes == 1:
            return self.policy
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.DEEPSPEED or self.is_fsdp_enabled:
            raise ValueError(
                "PPOTrainer runs data parallel through DDP (accelerate's multi_gpu / cpu_2proc configs); DeepSpeed and "
                "FSDP are not supported here: only LoRA adapters and a value head train, so ZeRO/FSDP sharding saves "
                "little (their optimizer states are a few hundred MB even at 7B), and the hard-KL guard edits the "
                "parameters in place between steps. Use recipes/accelerate_configs/multi_gpu.yaml. (The reward "
                "trainer, a standard Trainer, does run under recipes/accelerate_configs/deepspeed_zero2.yaml.)")
        frozen = [n for n, p in self.policy.named_parameters() if not p.requires_grad]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.policy, frozen)
        return self.accelerator.prepare_model(self.policy)

    def _global_sum(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.accelerator.num_processes == 1 else self.accelerator.reduce(x.clone(), reduction="sum")

    @torch.no_grad()
    def _rollout(self, batch) -> Rollout:
        """Sample, then score: rewards (members → aggregate → shape), audits, reference log-probs."""
        args = self.args
        ro = self.policy.generate(batch, self.tokenizer, args.max_completion_length, args.top_p, args.stop_on_eos)
        if self.quantized and self.iteration == 0:
            assert_trainable_4bit_layout(self.policy.peft, "PPOTrainer")
        scores, valid, ro.raw, ro.norm = self.rewards.score(ro.prompts, ro.completions, ro.completion_ids,
                                                            has_eos=ro.has_eos.cpu(), **self.reward_kwargs(ro))
        ro.scores, ro.valid = scores.to(ro.ids.device), valid.to(ro.ids.device)
        # samples kept over every process: none kept, the update is skipped on every rank (`_iteration`)
        ro.kept = self._sum_over_processes(float(valid.sum()))
        if self.rewards.batch_is_a_share:  # the whole-batch rule (pipeline.MIN_DROPPED_IN_A_ROW) on the global batch
            n = len(valid) * self.accelerator.num_processes
            kept = ro.kept
            self._dropped_in_a_row = 0 if kept else self._dropped_in_a_row + n
            if not kept and self._dropped_in_a_row >= MIN_DROPPED_IN_A_ROW:
                what, fix = self.rewards.last_nonfinite  # every process dropped its whole share: each knows which part
                raise ValueError(f"Every sample of the global batch ({len(valid)} per process) got a non-finite reward "
                                 f"({what}), {self._dropped_in_a_row} samples in a row: nothing is left to train on. "
                                 f"{fix} (it returns NaN/inf/None for everything).")
        ro.audit = self.judge_scores(ro, self.audit_funcs)  # monitoring only: never enters the loss
        ro.extra = self._take_extra(len(ro.prompts))  # after the judges: they may log_extra() too
        ro.h_low = self.policy.lower(ro.ids, ro.mask)  # shared by the reference, every epoch, critic and KL checks
        ref_logits = self.policy.logits(ro.ids, ro.mask, ro.R, ro.h_low, reference=True)
        ro.ref_logprobs = token_logprobs(ref_logits, ro.resp)
        if self.kl_guard is not None or args.log_kl_after_update:
            ro.ref_logits_full = ref_logits  # exact KL checks need the whole distribution (normalised where used)
        return ro

    def reward_kwargs(self, ro: Rollout, log: bool = True) -> dict:
        """What Python reward functions and judges get besides prompts, completions and completion ids, as TRL's
        GRPO / RLOO pass it: the prompts' other dataset columns (a list each), the `TrainerState`, `log_metric(name,
        value)`, a scalar averaged over the iteration and logged with its metrics, and `log_extra(column, values)`, one
        value per completion shown as a column of the `log_completions` table (`log=False`: neither offered)."""
        logs = {"log_metric": self._log_metric, "log_extra": self._log_extra} if log else {}
        return {**ro.columns, "trainer_state": self.state, **logs}

    def _log_metric(self, name: str, value: float) -> None:
        self._pending_metrics.setdefault(name, []).append(float(value))

    def _log_extra(self, column: str, values) -> None:
        self._pending_extra.setdefault(str(column), []).extend(values)

    def _take_extra(self, n: int) -> dict:
        """This rollout's log_extra() columns, each checked to hold one value per completion."""
        extra, self._pending_extra = self._pending_extra, {}
        for column, values in extra.items():
            if len(values) != n:
                raise ValueError(f"log_extra({column!r}, values) received {len(values)} values for a batch of {n} "
                                 f"completions: pass one value per completion, once per call of the reward function.")
        return extra

    def _print_completions(self, ro: Rollout) -> None:
        """TRL's completions table (log_completions): prompt, completion, reward, each judge, log_extra() columns."""
        from trl.trainer.utils import print_prompt_completions_sample

        from ..monitor.monitor import prompt_text

        print_prompt_completions_sample([prompt_text(p) for p in ro.prompts], ro.texts,
                                        {"reward": ro.scores.cpu().tolist(), **ro.audit}, None, self.iteration, 4,
                                        extra=ro.extra or None)

    def judge_scores(self, ro: Rollout, judges: dict, log: bool = True) -> dict:
        """{name: scores} of `judges` (audit functions) on a rollout: a function called as a reward function is (None:
        not graded, NaN), a reward model's raw score (the mean of an ensemble's members)."""
        out = {}
        for name, fn in judges.items():
            if hasattr(fn, "score_completions"):
                raw = fn.score_completions(ro.prompts, ro.completions, ro.completion_ids,
                                           **rendering_kwargs(self.args.chat_template_kwargs, ro.columns))
                out[name] = raw.float().mean(-1).tolist()
            else:
                vals = call_reward_function(fn, prompts=ro.prompts, completions=ro.completions,
                                            completion_ids=ro.completion_ids, **self.reward_kwargs(ro, log))
                out[name] = [float("nan") if v is None else float(v) for v in vals]
        return out

    def _advantages(self, ro: Rollout, old_logp, old_values):
        """Per-token reward −β·k1_t, plus the sequence score at the last response token; then GAE. Returns the
        configured estimator's per-token KL (what is logged and what the controller sees) beside them: as a reward
        only k1 has the gradient of the KL (plugins/kl.py)."""
        m = ro.loss_mask
        k1_t = (old_logp - ro.ref_logprobs) * m  # [B, R]
        # copies: an estimator editing its input in place would change θ_old's log-probs, which the ratio reads next
        kl_t = checked_output(self.kl_estimator(old_logp.clone(), ro.ref_logprobs.clone()), old_logp, "kl_estimator",
                              self.kl_estimator.name, "one KL estimate per token, like its inputs") * m  # [B, R]
        rewards = -self.kl_ctl.beta * k1_t
        last = (ro.resp_mask.sum(1) - 1).clamp(min=0).long()
        rewards[torch.arange(len(last)), last] += ro.scores * ro.valid.to(m)
        adv, returns = rlm.gae(rewards * m, old_values, m, self.args.gamma, self.args.lam)
        if self.args.whiten_advantages:
            adv = rlm.masked_whiten(adv, m, reduce_sum=self._global_sum)  # whole-batch statistics under DDP
        return kl_t, adv, returns

    # -- passes: one full-batch forward serves two steps where they need the same one --------------------------------
    def _reusable(self, between_epochs: bool = False) -> bool:
        """With one minibatch and no dropout, the θ_old pass of the rollout *is* epoch 1's training forward, and the
        pass that measures the KL after an epoch *is* the next epoch's: each is computed once (with gradients) and
        kept in the memo until the training step takes it. Between epochs not under DDP: a forward through DDP must
        be followed by its backward, and the guard may stop before that epoch runs."""
        one_forward = self.args.num_mini_batches == 1 and self.args.disable_dropout
        return one_forward and not (between_epochs and self.accelerator.num_processes > 1)

    def _full_forward(self, ro: Rollout, between_epochs: bool = False, keep: bool = True):
        """(logits, values, logp) of the whole batch at the current parameters, kept for the next training step when
        `_reusable`; otherwise in eval mode without gradients (with dropout on in training, θ_old is still the policy
        itself, not one dropout draw). `keep=False`: no training step follows (under DDP a forward with gradients must
        be followed by its backward)."""
        if keep and self._reusable(between_epochs):
            out = self.train_policy(ro.ids, ro.mask, ro.R, ro.h_low)
            self._memo.put(self.version, out)
            return out
        with torch.no_grad():
            return self.policy(ro.ids, ro.mask, ro.R, ro.h_low, training=False)

    def _train_forward(self, ro: Rollout, idx=None):
        """(logits, values, logp) with gradients for the rows `idx` (None = all), from the memo when it holds them."""
        if idx is None:
            hit = self._memo.take(self.version)
            if hit is not None:
                return hit
            return self.train_policy(ro.ids, ro.mask, ro.R, ro.h_low)
        return self.train_policy(ro.ids[idx], ro.mask[idx], ro.R, None if ro.h_low is None else ro.h_low[idx])

    def _measure(self, ro: Rollout, logits=None) -> float:
        """The batch KL the guard bounds (contract in plugins/kl.py:KLGuard), mean over processes. Without `logits`
        the policy's are computed a minibatch of rows at a time: [B/num_mini_batches, R, V] alive at once, never the
        whole batch's (the training forward's size, which is what the memory plan budgets)."""
        if logits is not None:
            kl = self.policy.sequence_kl(logits.detach(), ro.ref_logits_full, ro.resp_mask)
        else:
            B = ro.ids.shape[0]
            rows, parts = max(1, B // self.args.num_mini_batches), []
            for i in range(0, B, rows):
                sl = slice(i, i + rows)
                part = self.policy.logits(ro.ids[sl], ro.mask[sl], ro.R, None if ro.h_low is None else ro.h_low[sl])
                parts.append(self.policy.sequence_kl(part, ro.ref_logits_full[sl], ro.resp_mask[sl]))
                del part
            kl = torch.cat(parts)
        return self._mean_over_processes(float(kl.mean()))

    def _measure_after_epoch(self, ro: Rollout, last_epoch: bool) -> float:
        """KL after an epoch: from the next epoch's training forward when it can be reused, else measured alone."""
        if not last_epoch and self._reusable(between_epochs=True):
            return self._measure(ro, self._full_forward(ro, between_epochs=True)[0])
        return self._measure(ro)

    def _token_share(self, mask) -> float:
        """DDP averages per-process gradients; scaling each process's token-mean loss by its share of the tokens
        (× processes) makes that average the gradient of the token mean over every process's batch."""
        world = self.accelerator.num_processes
        if world == 1:
            return 1.0
        n = mask.sum().detach().double()
        return float(n * world / self._global_sum(n).clamp(min=1))

    @staticmethod
    def _entropy(logits, mask):
        """Masked mean entropy of the policy over the response tokens. logits [B, R, V], mask [B, R] → scalar.
        Worked through 16 rows of [B·R, V] at a time: its fp32 temporaries (log-softmax, p, p·log p) stay a few MiB
        instead of 3 × 128 rows × V (75 MiB for a 49k vocabulary), which on CPU set the peak RSS."""
        return rlm.masked_mean(entropy_from_logits(logits, chunk_size=16), mask)

    # -- one optimizer step, never letting NaN reach the adapters ---------------------------------------------------
    def _step(self, loss, stats) -> float | None:
        """Returns the gradient's norm before clipping (Trainer's `grad_norm`; None after an fp16 overflow). The
        learning-rate schedule is stepped once per iteration, not here (`_iteration`). Under fp16 the loss is scaled for the backward and the gradients
        unscaled before clipping; a step whose scaled gradients overflowed is skipped and the scale halved (torch's
        GradScaler, as Trainer and TRL 1.12's PPO under accelerate)."""
        scaler = self.grad_scaler
        self.accelerator.backward(loss if scaler is None else scaler.scale(loss))  # DDP: gradients arrive averaged
        if scaler is not None:
            scaler.unscale_(self.optimizer)  # the true gradients; an inf or NaN among the scaled ones is recorded
        params = self.trainable_parameters()
        clip = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))  # ≤ 0 / None: no clipping, as in Trainer
        loss_finite = bool(torch.isfinite(loss))
        if scaler is not None and self.accelerator.num_processes > 1:  # one decision on every rank: a rank's own
            # non-finite loss reaches the others only as NaN gradients, and their loss scales must not drift apart
            loss_finite = bool(self._global_sum(torch.tensor(float(not loss_finite), device=self.args.device)) == 0)
        if not (loss_finite and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)  # skipped: a non-finite loss or gradient
            if scaler is not None and loss_finite:  # fp16's range overflowed: retry at half the scale
                scaler.update()
                stats["optim/fp16_overflow_steps"] += 1
                return None
            if scaler is not None:  # the loss itself was non-finite: no reason to lower the scale
                scaler.update(scaler.get_scale())
            stats["optim/skipped_nonfinite_steps"] += 1
            return norm
        if not self._reach_check.done:  # a step whose whole gradient is 0 says nothing about the graph
            value_signal = True
            if self._reach_check.gated is not None:  # the separate critic's: did the value loss reach the head?
                head = self.policy.value_head.weight
                value_signal = head.grad is not None and bool(head.detach().any()) and bool(head.grad.any())
            self._reach_check(signal=norm > 0, gated_signal=value_signal)
        self._params_moved = True  # from here on this iteration cannot be undone (`_save_after_failure`)
        self.optimizer.step()
        if scaler is not None:
            scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1
        return norm

    def _step_schedule(self) -> None:
        """The learning-rate schedule advances once per iteration, as TRL 1.12's PPO stepped it, and is planned in
        iterations (`warmup_steps` counts iterations, like every other cadence): the guard may end an iteration's
        epochs early, and a schedule in optimizer steps would then not reach its end at max_steps. ReduceLROnPlateau
        and GreedyLR step on the evaluation metric instead (`_maybe_log_evaluate_save`), as in Trainer."""
        if not isinstance(self.lr_scheduler, _METRIC_SCHEDULERS):
            with warnings.catch_warnings():  # on schedule even when every step so far was skipped (fp16 overflow,
                # a non-finite loss): torch's "lr_scheduler.step() before optimizer.step()" warning is no news then
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                self.lr_scheduler.step()

    # -- one PPO iteration ------------------------------------------------------------------------------------
    def _iteration(self):
        args, stats, acc = self.args, Counter(), {}
        t0 = time.perf_counter()

        # 1. rollout: sample, score, reference (the previous rollout's tensors are released first)
        self.rollout = None
        ro = self.rollout = self._rollout(self._next_prompts())
        B, m = ro.ids.shape[0], ro.loss_mask
        stats["time/rollout_s"] = time.perf_counter() - t0  # sampling, scoring, reference
        if args.include_num_input_tokens_seen != "no":  # Trainer's count (logged with every log): each rollout once
            n = ro.mask.sum() if args.include_num_input_tokens_seen == "non_padding" else ro.ids.numel()
            self.state.num_input_tokens_seen += int(self._sum_over_processes(float(n)))

        # a batch whose every sample was dropped (on every process) has nothing to train on: no optimizer step, which
        # with a zero gradient would still move the adapters by Adam's momentum, and no forward/backward passes
        train = ro.kept > 0
        # 2. θ_old: log-probs and values (with one minibatch this forward is epoch 1's, kept in the memo)
        out = self._full_forward(ro, keep=train)
        old_values, old_logp = out[1].detach(), out[2].detach()
        if self.kl_guard is not None:
            stats["kl/before_update"] = self._measure(ro, out[0])
        del out  # the memo holds it until epoch 1 takes it; no longer than that

        # 3. rewards with the KL penalty → advantages
        kl_t, adv, returns = self._advantages(ro, old_logp, old_values)

        # 4. epochs × minibatches, each epoch guarded
        kl_before = stats.get("kl/before_update")  # KL at the parameters each epoch starts from (guard's search)
        row_tokens = m.sum(1).cpu()  # each row's kept tokens, read once: a step's count without a device sync
        for epoch in range(args.num_ppo_epochs if train else 0):
            before = self.kl_guard.snapshot() if self.kl_guard is not None else None
            minibatches = [None] if args.num_mini_batches == 1 else torch.randperm(B).split(B // args.num_mini_batches)
            for idx in minibatches:
                logits, values, logp = self._train_forward(ro, idx)
                sel = slice(None) if idx is None else idx
                mi = m[sel]
                pg_loss, clipfrac, approx_kl = rlm.policy_loss(logp, old_logp[sel], adv[sel], mi, args.clip_range)
                vf_loss, vf_clipfrac = rlm.value_loss(values, old_values[sel], returns[sel], mi, args.clip_range_value)
                # with ent_coef = 0 the entropy is only a statistic, measured after the backward has freed the
                # activations (measured before it, its temporaries set the CPU peak)
                entropy = self._entropy(logits, mi) if args.ent_coef else None
                loss = pg_loss + args.vf_coef * vf_loss  # PPO objective (CleanRL form): L_clip + c₁·L_V − c₂·H[π]
                if entropy is not None:
                    loss = loss - args.ent_coef * entropy
                grad_norm = self._step(loss * self._token_share(mi), stats)
                if entropy is None:
                    with torch.no_grad():
                        entropy = self._entropy(logits, mi)
                # token means weigh by their tokens: under DDP a step's loss is the token mean over every process's
                # rows (`_token_share`), and so is what is logged of it (`_step_means`)
                n_tok = float(row_tokens.sum() if idx is None else row_tokens[idx].sum())
                for k, val in zip(STEP_METRICS, (pg_loss, vf_loss, clipfrac, approx_kl, vf_clipfrac, entropy,
                                                 grad_norm)):
                    if val is not None:  # an fp16 step that overflowed has no gradient norm to report
                        v = float(val.detach()) if torch.is_tensor(val) else val
                        acc.setdefault(k, []).append((v, 1.0) if k == "grad_norm" else (v * n_tok, n_tok))
                del logits, values, logp, loss  # [B, R, V] each: free before the next forward
            if self.kl_guard is not None:  # 5. the guard: KL ≤ δ on this batch, or backtrack
                kl = self._measure_after_epoch(ro, last_epoch=epoch == args.num_ppo_epochs - 1)
                if not self.kl_guard.feasible(kl):
                    self._memo.clear()
                    self._params_moved = True  # the guard edits the adapters in place, even when every step was skipped
                    kl = self.kl_guard.enforce(before, kl, lambda: self._measure(ro), stats, kl_before=kl_before)
                    self.version += 1
                    stats["kl/after_update"] = kl
                    break
                stats["kl/after_update"] = kl_before = kl  # the next epoch starts from these parameters
        self._memo.clear()
        if not train and "kl/before_update" in stats:  # nothing trained: the parameters the guard measured
            stats["kl/after_update"] = stats["kl/before_update"]
        self._step_schedule()
        if self.kl_guard is None and args.log_kl_after_update:
            stats["kl/after_update"] = self._measure(ro)
        stats["time/update_s"] = time.perf_counter() - t0 - stats["time/rollout_s"]  # θ_old, epochs, guard

        # 6. the KL controller sees the rollout's sequence KL (estimator on sampled tokens, mean over sequences)
        # (a global mean over the sequences kept: under DDP the processes may have dropped different numbers of them)
        valid_rows = (m.sum(1) > 0).double()
        kl_sum, kept = self._global_sum(torch.stack([(kl_t.double().sum(1) * valid_rows).sum(), valid_rows.sum()]))
        kl_seq = float(kl_sum / kept.clamp(min=1))
        beta_used = self.kl_ctl.beta
        if kept == 0:
            kl_seq = float("nan")  # every sample dropped: none measured (a controller fed 0 would lower β)
        elif math.isfinite(kl_seq):  # a NaN would leave β (and an integral) NaN for the rest of the run
            self.kl_ctl.update(kl_seq, n_steps=B * self.accelerator.num_processes)
            checked_beta(self.kl_ctl)
        elif not self._warned_kl_nonfinite:
            self._warned_kl_nonfinite = True
            warnings.warn(f"Iteration {self.iteration + 1}: the KL estimate is {kl_seq} (kl_estimator "
                          f"{self.kl_estimator.name!r}), so the KL controller was not updated and β stays "
                          f"{self.kl_ctl.beta:g}; it is skipped the same way while it stays non-finite. This warning "
                          f"is shown once.", UserWarning, stacklevel=2)
        return self._iteration_metrics(ro, acc, stats, kl_seq, beta_used, old_values, returns, time.perf_counter() - t0)

    def _global_means(self, parts: dict) -> dict:
        """{name: (values, weights)} → {name: Σ values / Σ weights over every process}, in one reduction: global
        means, not rank 0's."""
        # the parts live on the accelerator (values, returns, masks) or on the CPU (scores, lengths): one device
        # before the stack (torch.stack refuses a mix, CPU scalars included)
        flat = torch.stack([torch.as_tensor(x, dtype=torch.float64).sum().to(self.args.device)
                            for pair in parts.values() for x in pair])
        flat = self._global_sum(flat).cpu()
        return {name: float(flat[2 * i] / flat[2 * i + 1]) if flat[2 * i + 1] > 0 else float("nan")
                for i, name in enumerate(parts)}

    def _step_means(self, acc: dict) -> dict:
        """{name: [(Σ value, weight) per optimizer step]} → {name: mean over the steps of each step's global mean}:
        a step's token means (losses, clip fractions, approx. KL, entropy) over the tokens of every process's rows —
        the loss that step's gradient is of — not the mean of the processes' own means; one reduction for them all.
        Every process takes the same steps (the guard's and fp16's decisions are global)."""
        names = sorted(acc)
        flat = torch.tensor([x for k in names for pair in acc[k] for x in pair], dtype=torch.float64)
        flat = self._global_sum(flat.to(self.args.device)).cpu()
        out, i = {}, 0
        for k in names:
            pairs = flat[i : i + 2 * len(acc[k])].view(-1, 2)
            i += 2 * len(acc[k])
            kept = pairs[pairs[:, 1] > 0]  # a step whose minibatch kept no token (every reward dropped) has no mean
            out[k] = float((kept[:, 0] / kept[:, 1]).mean()) if len(kept) else float("nan")
        return out

    def _logged_by_reward_functions(self) -> dict:
        """The mean of each value reward functions passed to log_metric() this iteration, over every process — the
        names gathered first, so a name logged on one rank only cannot leave the others waiting in the reduction."""
        pending, self._pending_metrics = self._pending_metrics, {}
        names = set(pending)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            names = set().union(*gather_object([sorted(pending)]))
        return self._global_means({n: (torch.tensor(pending.get(n, []), dtype=torch.float64),
                                       torch.ones(len(pending.get(n, [])))) for n in sorted(names)}) if names else {}

    def _iteration_metrics(self, ro, acc, stats, kl_seq, beta_used, old_values, returns, seconds) -> dict:
        """The iteration's metrics, as means over the whole batch (every process's share), not one rank's."""
        m, valid = ro.loss_mask, ro.valid.cpu()
        # no step taken (every sample dropped): the same keys, with no value
        metrics = self._step_means(acc) if acc else dict.fromkeys(STEP_METRICS, float("nan"))
        for k in ("kl/backtracks", "kl/restored", "kl/shrunk", "optim/skipped_nonfinite_steps"):
            stats.setdefault(k, 0)
        v, r, vf, ones = old_values.double() * m, returns.double() * m, valid.double(), torch.ones(len(valid))
        raw, K = ro.raw.double().cpu(), ro.norm.shape[1]
        parts = {"scores": (ro.scores.double().cpu() * vf, vf), "v": (v, m), "r": (r, m), "r2": (r ** 2, m),
                 "res": (r - v, m), "res2": ((r - v) ** 2, m), "length": (ro.lengths.double().cpu(), ones),
                 "eos": (ro.has_eos.double().cpu(), ones),
                 "tokens": (ro.resp_mask.double().sum().cpu(), torch.ones(1)),  # × processes: every response token
                 **{f"rewards/{name}_raw": _graded(torch.where(valid, raw[:, j], torch.nan).tolist())  # dropped, None: no score
                    for j, name in enumerate(self.rewards.member_names)},
                 **{f"audit/{name}": _graded(vals) for name, vals in ro.audit.items()}}
        if K > 1:  # over the samples every member scored
            norm = ro.norm.cpu().double()
            full = rlm.scored_by_every_member(valid, norm)
            std = norm[full].std(-1).sum() if full.any() else torch.zeros((), dtype=torch.float64)  # (std of none warns)
            parts["rewards/ensemble_std"] = (std, full.double())
        g = self._global_means(parts)
        dropped = int(self._global_sum(torch.tensor(float((~valid).sum()), device=self.args.device)))
        var_r, var_res = g["r2"] - g["r"] ** 2, g["res2"] - g["res"] ** 2  # E[x²] − E[x]² over the global batch
        metrics.update({
            "objective/kl": kl_seq, "objective/beta": beta_used, "objective/scores": g["scores"],
            "val/explained_variance": 1 - var_res / var_r if var_r > 0 else float("nan"),  # 1 − Var[R−V]/Var[R]
            "val/mean": g["v"], "response/length_mean": g["length"], "response/eos_rate": g["eos"],
            "rewards/dropped_nonfinite": dropped,
            "learning_rate": self._get_learning_rate(),  # Trainer's key: the rate the next iteration trains with
            "episode": (self.iteration + 1) * len(valid) * self.accelerator.num_processes,  # prompts so far (TRL 1.12)
            "time/iteration_s": seconds, "time/generate_s": ro.gen_seconds,
            "time/tokens_per_s": g["tokens"] * self.accelerator.num_processes / seconds,
            **{k: float(v) for k, v in stats.items()},
        })
        metrics.update({k: val for k, val in g.items() if k.startswith(("rewards/", "audit/"))})
        metrics.update(self._logged_by_reward_functions())
        if self.grad_scaler is not None:  # fp16: the scale the next step starts from, and the steps it skipped
            metrics["optim/loss_scale"] = float(self.grad_scaler.get_scale())
            metrics["optim/fp16_overflow_steps"] = float(stats["optim/fp16_overflow_steps"])
        if stats["optim/skipped_nonfinite_steps"]:
            warnings.warn(f"Iteration {self.iteration}: {stats['optim/skipped_nonfinite_steps']} optimizer step(s) "
                          f"skipped because the loss or the gradients were NaN/inf (rewards of magnitude "
                          f"{float(ro.scores.abs().max()):.3g}); the adapters were not touched.")
        return metrics

    def _check_best_metric_names(self, args, held: dict) -> None:
        """`metric_for_best_model` names a metric evaluate() logs: a typo failed in transformers at the first
        evaluation, after `eval_steps` iterations, before that iteration's checkpoint was written."""
        name = args.metric_for_best_model
        if not name or not held:
            return
        metrics = [*EVAL_METRICS, *self.audit_funcs]
        known = [m if key is None else f"{key}_{m}" for key in held for m in metrics]
        if name.removeprefix("eval_") not in known:
            raise ValueError(f"metric_for_best_model={name!r} is not a metric PPOTrainer's evaluation logs; it logs "
                             f"{', '.join(known)} (as eval_<name>). Set metric_for_best_model to one of them and "
                             f"greater_is_better to match (an audit judge's name is its key in audit_funcs).")

    def evaluate_policy(self, dataset, judges=None, batch_size: int | None = None, adapters: bool = True) -> dict:
        """Sample responses for held-out prompts; report judge scores, lengths (tokens, EOS excluded), EOS rate
        and the exact KL(π‖π_ref) per sequence. `adapters=False` evaluates the reference policy itself."""
        rows = tokenize_prompts(dataset, self.tokenizer, self.args, min_rows=1, desc="Tokenizing evaluation prompts")
        bs = batch_size or self.args.per_device_train_batch_size
        judges = judges or {}
        out = {**{k: [] for k in EVAL_METRICS}, "texts": [], "prompts": [], **{k: [] for k in judges}}
        batches = progress(self, range(0, len(rows), bs), unit="batch", leave=False,
                           desc="Evaluating " + ("the policy" if adapters else "the reference"))
        for i in batches:
            g = self.policy.generate(rows[i : i + bs], self.tokenizer, self._eval_room(rows[i : i + bs]),
                                     self.args.top_p, self.args.stop_on_eos, reference=not adapters)
            h_low = self.policy.lower(g.ids, g.mask)
            ref = self.policy.logits(g.ids, g.mask, g.R, h_low, reference=True)
            evaluated = self.policy.logits(g.ids, g.mask, g.R, h_low) if adapters else ref  # the reference: KL 0
            out["kl"] += self.policy.sequence_kl(evaluated, ref, g.resp_mask).tolist()
            out["length"] += g.lengths.tolist()
            out["eos"] += g.has_eos.float().tolist()
            out["texts"] += g.texts
            out["prompts"] += g.prompts
            for k, vals in self.judge_scores(g, judges, log=False).items():
                out[k] += vals
        summary = {f"{k}_mean": float(torch.tensor(v, dtype=torch.float64).nanmean())  # a judge's None: ungraded
                   for k, v in out.items() if k not in ("texts", "prompts")}
        if adapters:
            self.heldout = summary  # for the model card
            self.heldout_iteration = self.iteration
        return {**summary, "samples": out}

    def _eval_room(self, rows) -> int:
        """max_completion_length for a batch of held-out prompts, within the model's positions: start-up fitted it to
        the training prompts, and a longer held-out prompt would index past a learned position table (an IndexError)
        or past what a rotary model was trained on. Cut for that batch, said once; refused if a prompt fills them."""
        room, n = self._completion_room(rows, "An evaluation prompt"), self.args.max_completion_length
        if room is None or n <= room:
            return n
        limit = self._position_limit()
        _warn_once(self, "eval_room", f"Evaluation prompts of up to {limit - room} tokens leave {room} of the model's "
                   f"{limit} positions: their responses are cut at {room} tokens (max_completion_length {n}). This "
                   f"warning is shown once.", stacklevel=4)
        return room

    # -- training loop -----------------------------------------------------------------------------------------
    def _total_iterations(self) -> int:
        if self.args.max_steps and self.args.max_steps > 0:
            return int(self.args.max_steps)
        per_epoch = len(self.prompts) // (self.args.per_device_train_batch_size * self.accelerator.num_processes)
        return max(1, int(math.ceil(self.args.num_train_epochs * per_epoch)))

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        """Run PPO iterations up to `max_steps` / `num_train_epochs`. Called again on the same trainer it continues
        from the iteration reached (raise `max_steps` to train further); `resume_from_checkpoint` as in `Trainer`.
        `trial` (hyperparameter search) is not supported; `ignore_keys_for_eval` has nothing to ignore (evaluate()
        reports its own metrics), as Trainer takes it."""
        if trial is not None:
            raise NotImplementedError(_NO_HP_SEARCH)
        # one run at a time in output_dir (two wrote into each other's checkpoint-N.tmp): a second one is refused
        with output_dir_lock(self.args.output_dir, self.accelerator):
            return self._train_in_output_dir(resume_from_checkpoint)

    def _train_in_output_dir(self, resume_from_checkpoint: str | bool | None = None):
        args = self.args
        total = self._total_iterations()
        if self._created_lr_scheduler and isinstance(self.lr_scheduler, LambdaLR) \
                and getattr(self, "_schedule_length", total) != total:
            # a run continued on this trainer with another length (max_steps raised): transformers' Trainer builds
            # its schedule again at every train(); the one planned for the earlier length is at its end (a linear
            # decay's 0: every further iteration would train at learning rate 0). Placed at `self.iteration` below.
            self.lr_scheduler, self._created_lr_scheduler = None, False
        self.create_optimizer_and_scheduler(num_training_steps=total)  # in iterations: `_step_schedule`
        self._schedule_length = total
        self.state.max_steps, self.state.global_step = total, self.iteration  # a continued run goes on from there
        self.state.compute_steps(args, total)  # logging/eval/save steps as absolute counts (a fraction of total)
        self.state.num_train_epochs = math.ceil(total / self._iterations_per_epoch())
        self.state.train_batch_size = args.per_device_train_batch_size  # prompts per process per iteration
        if resume_from_checkpoint:
            resume_from_checkpoint = resume_folder(resume_from_checkpoint, args.output_dir, CHECKPOINT_FILES)
            self._load_checkpoint(resume_from_checkpoint)  # each process's own random streams too (or reseeds them)
            finished = self.iteration >= total
            if self.accelerator.is_main_process and not finished:  # a later resume=True continues this timeline
                supersede_later_checkpoints(args.output_dir, resume_from_checkpoint)
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                print(self._nothing_to_train(resume_from_checkpoint, total) if finished else
                      f"Resuming from {resume_from_checkpoint} (iteration {self.iteration} of {total}).",
                      file=sys.stderr, flush=True)
        elif self.iteration == 0:
            self._start_clean(args)
            if self.accelerator.num_processes > 1:  # same init everywhere (seeded in __init__), then own samples
                self._seed_process_rng()
        elif self.iteration >= total and self.accelerator.is_main_process:  # train() again on a finished trainer
            print(self._nothing_to_train("this trainer", total), file=sys.stderr, flush=True)
        if self.iteration:  # a resumed or continued run trains its next iteration at the schedule's position, not at
            # the rate the optimizer's state was left with (the end of a shorter run's schedule: 0 for a linear decay)
            place_schedule_at(self, self.iteration)
        for attr in ("model", "optimizer", "lr_scheduler"):  # what callbacks are given, as Trainer's loop does
            setattr(self.callback_handler, attr, getattr(self, attr))
        # (a resumed run, or one continued in this process, keeps the streams it has: reseeding them would make it
        # sample otherwise than the run it continues)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        start, first = time.time(), self.iteration
        self._initial_num_input_tokens_seen = self.state.num_input_tokens_seen  # this session's tokens/s (Trainer)
        if args.eval_on_start and self.iteration == 0:
            self.evaluate()
        with StopAfterIteration(announce=self.accelerator.is_main_process) as stop:
            in_epoch, self._last_logged = False, self.iteration
            while self.iteration < total and not self.control.should_training_stop:
                if not in_epoch:
                    self.control = self.callback_handler.on_epoch_begin(args, self.state, self.control)
                    in_epoch = True
                self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
                undo = undo_point(self) if self.accelerator.num_processes == 1 else None
                self._params_moved = False
                try:
                    metrics = self._iteration()
                except Exception as e:  # the iterations that finished are saved (`_save_after_failure`)
                    self._save_after_failure(e, undo, finished=False)
                    raise
                self.iteration += 1
                if args.torch_empty_cache_steps and self.iteration % args.torch_empty_cache_steps == 0:
                    clear_device_cache()  # as Trainer: the accelerator's cached blocks back to the device
                self.state.global_step = self.iteration
                epoch_done = self._epoch_done()
                self.state.epoch = self._epoch_position()
                self._metrics_history.append(metrics)
                try:  # the iteration finished: a callback, an evaluation or a log that fails does not lose it
                    # DefaultFlowCallback turns the TrainingArguments cadences into control flags (and stops at
                    # max_steps); any other callback may set them too: they decide, in transformers' order
                    self.control = self.callback_handler.on_step_end(args, self.state, self.control)
                    saved = self._maybe_log_evaluate_save(metrics)
                    if epoch_done or self.control.should_training_stop:  # a pass over the prompts ended, or the run
                        self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
                        saved = self._maybe_log_evaluate_save(metrics) or saved
                        in_epoch = False
                except Exception as e:
                    self._save_after_failure(e, None, finished=True)
                    raise
                if stop.requested(self._sum_over_processes):  # Ctrl-C / SIGTERM: this iteration is kept
                    if not saved:
                        self._save_and_rotate(push=False)
                    if self.accelerator.is_main_process:  # tqdm.write: on a line of its own, not after the bar
                        tqdm.write(f"Stopped after iteration {self.iteration}: checkpoint-{self.iteration} is saved in "
                                   f"{args.output_dir}. {RESUME_HOW}", file=sys.stderr)
                    raise stop.exception()
        try:  # the run's closing log and callbacks: one that fails does not lose the iterations
            history = TrainHistory(self._metrics_history, self.iteration, args.vf_coef, time.time() - start,
                                   (self.iteration - first) * args.per_device_train_batch_size
                                   * self.accelerator.num_processes, self.iteration - first, self.state.epoch,
                                   args.logging_nan_inf_filter)
            if self.iteration > first:  # Trainer's closing log (runtime, samples/s, loss), to log_history, reporters
                self.log(dict(history.metrics), start_time=start)
            self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        except Exception as e:
            self._save_after_failure(e, None, finished=True)
            raise
        return history

    def _save_after_failure(self, error: Exception, undo: dict | None, finished: bool) -> None:
        """An exception in an iteration, or in what follows one (a callback, an evaluation, a log), would lose every
        iteration since the last scheduled checkpoint — `save_steps` of them, hours on a 7B run — for a reward server
        that was down once. In one process the iterations that finished are saved as `checkpoint-N` before the
        exception goes on, and the exception says so. An iteration that failed before its first optimizer step is
        undone first (`checkpoint.undo_iteration`: its samples, data position, reward statistics), so the resumed run
        is the run that never failed; one that failed after it cannot be undone, and the newest checkpoint is named.
        `finished`: the failure came after the iteration (its work is kept); else `undo` is `undo_point` at the
        iteration's start. Under data parallelism the other processes wait in a collective for the one that failed:
        nothing can be saved (the launcher stops them)."""
        if self.accelerator.num_processes > 1 or raised_inside(error, PPOTrainer._save_and_rotate):  # the save failed
            return
        free_failed_step(error)  # whether or not anything is saved: the user's next step needs the memory too
        if not finished:
            if self._params_moved:
                note_not_saved(error, f"iteration {self.iteration + 1} failed after the adapters had taken a step (it "
                                      f"cannot be undone)", newest_complete_checkpoint(self.args.output_dir))
                return
            undo_iteration(self, undo)  # (drops the kept forward and the rollout)
        if self.iteration == 0:
            return  # nothing finished
        done = Path(self.args.output_dir) / f"checkpoint-{self.iteration}"
        if not done.is_dir():
            try:
                self._save_and_rotate(push=False)
            except Exception as save_error:  # a full disk, say: the first error is what the user must see
                error.add_note(f"rlhf_ext: saving checkpoint-{self.iteration} after it failed too: {save_error!r}")
                return
        note_saved(error, done, self.iteration, "iteration",
                   "this error came after it" if finished else "the failed one is undone: a resumed run repeats it")

    def _maybe_log_evaluate_save(self, metrics: dict) -> bool:
        """Log, evaluate, save — each where a callback asked for it (`control.should_*`; on_log / on_evaluate /
        on_save clear them), in that order, as transformers' Trainer; returns whether a checkpoint was written."""
        args = self.args
        if self.control.should_log and self.iteration > self._last_logged:  # once per iteration, as Trainer
            self._last_logged = self.iteration
            self.log(metrics)
            if args.log_completions and self.accelerator.is_main_process:
                self._print_completions(self.rollout)
        if self.control.should_evaluate:
            scores = self.evaluate()
            self._determine_best_metric(scores, None)  # state.best_metric: EarlyStoppingCallback reads it
            if isinstance(self.lr_scheduler, _METRIC_SCHEDULERS):  # (their metric is checked by the line above)
                name = args.metric_for_best_model
                self.lr_scheduler.step(scores[name if name.startswith("eval_") else f"eval_{name}"])
        if not self.control.should_save:
            return False
        self._save_and_rotate(push=args.push_to_hub)
        self.control.should_save = False  # (on_save cleared it unless a callback set it again there)
        return True

    def _nothing_to_train(self, where, total: int) -> str:
        return (f"Nothing to train: {where} is at iteration {self.iteration}, and this run is {total} iterations long "
                f"(max_steps / num_train_epochs); raise it to continue the run.")

    def _iterations_per_epoch(self) -> int:
        """PPO iterations in one pass over the prompts (the remainder short of a global batch is dropped)."""
        return max(1, len(self.prompts) // (self.args.per_device_train_batch_size * self.accelerator.num_processes))

    def _epoch_position(self) -> float:
        """state.epoch as transformers counts it: whole at the end of each pass (the dropped remainder not counted)."""
        per_pass = self._iterations_per_epoch() * self.args.per_device_train_batch_size * self.accelerator.num_processes
        return self.data_epoch + min(self.data_pos, per_pass) / per_pass

    def _save_and_rotate(self, push: bool) -> None:
        """Every process enters: under DDP each one's own state (random streams, reward statistics) is gathered for
        the checkpoint the main process writes (the adapters are identical on every process)."""
        if self.accelerator.num_processes > 1:
            self._process_states = gather_process_states(self)
        self._record_best_checkpoint()
        if self.accelerator.is_main_process:
            path = self.save_checkpoint()
            rotate_checkpoints(self.args.output_dir, self.iteration, self.args.save_total_limit,
                               keep=self.state.best_model_checkpoint)
            if push:
                self._push_checkpoint(path)
        self._process_states = None  # for this checkpoint only
        self.accelerator.wait_for_everyone()
        # on every process: a callback that sets flags in on_save must see the same thing everywhere, or the ranks
        # would take different branches (and collectives) in the loop
        self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    def _record_best_checkpoint(self) -> None:
        """`state.best_model_checkpoint`, as Trainer records it before a checkpoint's state is written: the checkpoint
        of the step that gave `state.best_metric` — the one being written, or an earlier one still on disk — which
        `save_total_limit` then never removes."""
        step = self.state.best_global_step
        if not (self.args.metric_for_best_model and step):
            return
        best = Path(self.args.output_dir) / f"checkpoint-{step}"
        if step == self.iteration or best.is_dir():
            self.state.best_model_checkpoint = str(best)

    def _seed_process_rng(self) -> None:
        """A random stream per process, reproducible from the seed, the rank and the iteration: for a new run under
        DDP (same initialisation everywhere, different samples per process), and for a resume whose checkpoint cannot
        give each process its own saved stream back (`checkpoint._restore_rng`)."""
        torch.manual_seed(self.args.seed + 1000 * self.accelerator.process_index + self.iteration)

    def _sum_over_processes(self, x: float) -> float:
        return sum_over_processes(self.accelerator, x)

    def _start_clean(self, args) -> None:
        """A new run (not resumed) in an output_dir an earlier run used would append to its monitor log and leave its
        checkpoints for a later resume to continue: refused, naming the ways out, unless overwrite_output_dir."""
        found = as_main_process_sees_it(self.accelerator, lambda: earlier_run(args.output_dir))
        clear = check_new_run(args.output_dir, found, args.overwrite_output_dir, args.resume_from_checkpoint)
        if clear and self.accelerator.is_main_process:
            clear_earlier_run(args.output_dir)
        self.accelerator.wait_for_everyone()  # on every rank: all of them took the same decision

    def _epoch_done(self) -> bool:
        """The iteration just run took the last full batch of a pass over the prompts (the next one starts a new
        data epoch: `_next_prompts`)."""
        B, world = self.args.per_device_train_batch_size, self.accelerator.num_processes
        return self.data_pos + B * world > len(self.prompts)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """The policy on `eval_dataset` (default: the one given to the trainer) — exact KL(π‖π_ref), length, EOS rate
        and every audit judge — logged as `eval_*` (`eval_strategy` calls it during train()). Sampled on a forked
        RNG: evaluating never changes the training run. Under DDP each process samples its share of the prompts and
        every rank gets the mean over all of them."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("No eval_dataset: pass one to PPOTrainer(eval_dataset=...) or to evaluate() "
                             "(TRL prompt-only format, like train_dataset).")
        if isinstance(dataset, dict):  # named sets, as transformers' Trainer takes them: eval_<name>_* for each
            return {k: v for name, ds in dataset.items()
                    for k, v in self.evaluate(ds, ignore_keys, f"{metric_key_prefix}_{name}").items()}
        dataset = held_in_memory(dataset)  # a stream handed to evaluate() itself: each process indexes its share
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        sharded = world > 1 and hasattr(dataset, "shard") and len(dataset) >= world
        part = dataset.shard(num_shards=world, index=rank, contiguous=True) if sharded else dataset
        device = self.policy.device
        with forked_rng(device):
            summary = self.evaluate_policy(part, judges=self.audit_funcs,
                                           batch_size=self.args.per_device_eval_batch_size)
        metrics = {f"{metric_key_prefix}_{k.removesuffix('_mean')}": v for k, v in summary.items() if k != "samples"}
        if world > 1:  # sums and counts over the processes: the mean of every graded sample, the same on every rank
            # (unsharded — fewer prompts than processes — each sampled the whole set on its own stream: their mean)
            keys = [k.removesuffix("_mean") for k in summary if k != "samples"]
            vals = [torch.tensor(summary["samples"][k], dtype=torch.float64) for k in keys]
            sums = [torch.where(v.isfinite(), v, 0.0).sum() for v in vals]  # a judge's None: ungraded, not a zero
            counts = [v.isfinite().sum().double() for v in vals]
            t = self.accelerator.reduce(torch.stack(sums + counts).to(self.args.device), reduction="sum").cpu()
            metrics = {f"{metric_key_prefix}_{k}": float(t[i] / t[len(keys) + i]) if t[len(keys) + i] > 0
                       else float("nan") for i, k in enumerate(keys)}
            # the card's held-out numbers are every process's prompts, as logged (not this process's share)
            self.heldout = {f"{k}_mean": metrics[f"{metric_key_prefix}_{k}"] for k in keys}
        self.log(dict(metrics))  # a copy: log() adds the epoch to what it is given
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics

    # -- checkpoints (checkpoint.py) and the policy leaving the trainer (export.py) -----------------------------------
    def save_checkpoint(self, output_dir: str | None = None) -> str:
        """This iteration's checkpoint folder (call on the main process; train() saves through `_save_and_rotate`,
        which every process enters)."""
        return write_checkpoint(self, Path(output_dir or Path(self.args.output_dir) / f"checkpoint-{self.iteration}"))

    def _load_checkpoint(self, path):
        read_checkpoint(self, path)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False, merge: bool = False):
        """A standard PEFT adapter at `output_dir` (`merge=True`: merged weights) + tokenizer + model card; the value
        head and critic adapter in `output_dir/critic/`. With `push_to_hub`, uploaded too, as `Trainer.save_model`
        does (the adapter, or with `merge` the merged weights)."""
        if self.args.should_save:  # the main process writes, as Trainer.save_model (every rank wrote: a rename race)
            save_policy(self, Path(output_dir or self.args.output_dir), merge=merge, card=self._card)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", merge=merge)

    def _push_checkpoint(self, path: str):
        """`push_to_hub` with a hub_strategy other than "end": the policy as it is at this checkpoint, and with
        "checkpoint" / "all_checkpoints" the checkpoint folder too (`hub.push_checkpoint`)."""
        push_checkpoint(self.args, path, default_repo_id(self.args), self.push_to_hub, f"iteration {self.iteration}")

    def push_to_hub(self, commit_message: str | None = None, blocking: bool = True, token: str | None = None,
                    revision: str | None = None, repo_id: str | None = None, critic: bool = False, merge: bool = False,
                    **kwargs) -> str:
        """Upload what `save_model` writes to `repo_id` (default `args.hub_model_id`): the adapter, or with `merge` the
        merged weights; `critic=True` adds `critic/`. Other keywords are the model card's, as in `Trainer`
        (`tags`, `dataset_name`, `license`, `language`, `model_name`, `finetuned_from`). The upload always completes
        before it returns (`blocking=False` is taken, as Trainer's signature has it, and changes nothing)."""
        repo_id = repo_id_for_push(self.args, repo_id, commit_message, "PPOTrainer")
        if not self.is_world_process_zero():  # one upload, as Trainer.push_to_hub (every rank uploaded its own commit)
            return ""
        return push_policy(self, repo_id, critic=critic,
                           token=token,
                           revision=revision or self.args.hub_revision, commit_message=commit_message, merge=merge,
                           card={**self._card, **card_metadata(kwargs, "PPOTrainer")})

    def create_model_card(self, tasks=None, dataset_args=None, **kwargs) -> None:
        """The policy's model card (what save_model() writes) at output_dir/README.md, with `kwargs` — Trainer's and
        TRL's card fields: `model_name`, `tags`, `dataset_name`, `dataset`, `dataset_tags`, `license`, `language`,
        `finetuned_from` — in its metadata, which later save_model() / push_to_hub() calls keep."""
        self._card = {**self._card, **card_metadata(kwargs, "PPOTrainer", "create_model_card")}
        if self.is_world_process_zero():
            out = Path(self.args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out / "README.md", with_card_metadata(model_card(self), self._card))

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        reach_repo_or_explain(lambda: super(PPOTrainer, self).init_hf_repo(token, private), self.args, "PPOTrainer")

    # -- transformers' supervised-training entry points, which PPO has no use for: each says what to use instead ----
    def get_eval_dataloader(self, eval_dataset=None):
        raise NotImplementedError(_NO_EVAL_LOOP.format(what="get_eval_dataloader()"))

    def get_test_dataloader(self, test_dataset):
        raise NotImplementedError(_NO_EVAL_LOOP.format(what="get_test_dataloader()"))

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        raise NotImplementedError(_NO_EVAL_LOOP.format(what="predict()"))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        raise NotImplementedError(_NO_SUPERVISED_STEP.format(what="compute_loss()"))

    def training_step(self, model, inputs, num_items_in_batch=None):
        raise NotImplementedError(_NO_SUPERVISED_STEP.format(what="training_step()"))

    def hyperparameter_search(self, *args, **kwargs):
        raise NotImplementedError(_NO_HP_SEARCH)

    def get_train_dataloader(self):
        raise NotImplementedError(
            "PPOTrainer has no training DataLoader: each iteration draws its prompts itself (per_device_train_batch_size "
            "of them per process, reshuffled each pass over the prompts with data_seed) and samples their responses. "
            "The tokenized prompts are trainer.prompts; the last iteration's batch, responses and rewards are "
            "trainer.rollout.")


def _refuse_multi_label(name: str, trust_remote_code: bool) -> None:
    """A reward string is loaded with one output; a classifier saved with several (a sentiment model's NEGATIVE /
    POSITIVE) would fail in transformers with a size mismatch that names neither the reward nor the fix."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return  # not readable here: load_model says why
    classifier = any(a.endswith("ForSequenceClassification") for a in (getattr(cfg, "architectures", None) or []))
    if classifier and cfg.num_labels > 1:
        labels = ", ".join(f"{i}: {n}" for i, n in sorted(cfg.id2label.items()))
        raise ValueError(f"Reward {name!r} is a classifier with {cfg.num_labels} outputs ({labels}); a reward string "
                         f"is loaded with one. Load it yourself and pass rlhf_ext.ExternalRewardModel("
                         f"model, tokenizer, label=<the output that is the reward, e.g. its name>) in reward_funcs.")


def _graded(vals) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, weights) of a judge's scores for `_global_means`: the mean over the samples it graded (a None / NaN
    is an ungraded sample, not a zero)."""
    v = torch.tensor(vals, dtype=torch.float64)
    ok = torch.isfinite(v)
    return torch.where(ok, v, 0.0), ok.double()


def place_on_training_device(model, args) -> bool:
    """Move `model` to `args.device` now, as Trainer.__init__ would later (not a bnb-quantised model, which bitsandbytes
    placed, nor one a device_map spread over several GPUs): the value head is built on the model's device, the
    start-up checks run there and reward models are placed beside it — a model loaded by name sits on the CPU, and
    Trainer's move of the PeftModel alone left the value head (and so every rollout) on the CPU. Whether it moved."""
    spread = len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1  # device_map="auto" on GPUs
    if is_quantized(model) or spread or getattr(args, "place_model_on_device", True) is False:
        return False
    if next(model.parameters()).device == torch.device(args.device):
        return False
    model.to(args.device)
    return True


def _free_adapter_prefix(model, adapters) -> str:
    """"rm_", "rm2_", …: the first prefix under which none of a reward artifact's adapters would land on an adapter
    already on the base — two reward models trained on the policy's base both name theirs "reward", and the second
    would overwrite the first's weights."""
    taken = set(getattr(model, "peft_config", {}))
    k = 1
    while any(f"rm{'' if k == 1 else k}_{a}" in taken for a in adapters):
        k += 1
    return f"rm{'' if k == 1 else k}_"


def _critic_config(model, policy_cfg):
    """The policy's LoRA config without the LM head: the critic reads hidden states, never logits."""
    cfg = copy.deepcopy(policy_cfg)
    base = model.get_base_model()
    head = base.get_output_embeddings()
    head_name = next((n.rsplit(".", 1)[-1] for n, m in base.named_modules() if m is head), None)
    if isinstance(cfg.target_modules, (list, set, tuple)) and head_name in cfg.target_modules:
        cfg.target_modules = [t for t in cfg.target_modules if t != head_name]
    return cfg
