"""Bradley–Terry reward modelling with cheap ensembles, on top of `trl.RewardTrainer`.

The trainer's model is a `RewardEnsemble` (trunk → pool → heads): the same module, and so the same scoring path,
that PPO and everything else use after training. TRL's RewardTrainer keeps doing what it does well (data
preparation, collation, the Trainer loop, logging); the loss is ours: Bradley–Terry per member with bootstrap
weights, plus an optional length de-correlation penalty.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import warnings
from collections import defaultdict
from contextlib import contextmanager
from functools import partial
from itertools import islice
from pathlib import Path

import torch
from datasets import Dataset, IterableDataset
from torch import nn
from transformers import TrainerCallback
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.trainer_callback import CallbackHandler, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, TrainOutput
from trl import RewardConfig, RewardTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import global_then_local_main_first

from ..architectures import final_hidden_size
from ..adapters import GradientReachCheck, first_step_grad_params, set_trainable, wrap_with_peft, zero_dropout
from ..cpu_linear import route_frozen_linears
from ..cpu_memory import keep_freed_memory_for
from ..distributed import as_main_process_sees_it, close_process_group_at_exit, sum_over_processes
from ..hub import (card_base_model, card_metadata, default_repo_id, push_checkpoint, push_folder,
                   reach_repo_or_explain, repo_id_for_push, with_card_metadata)
from ..interrupt import (RESUME_HOW, StopAfterIteration, free_failed_step, note_not_saved, note_saved, raised_inside,
                         random_streams, set_random_streams)
from ..integrity import (atomic_tmp, check_new_run, checkpoint_fix, earlier_checkpoints, ensure_writable_dir,
                         finish_atomic_folder, newest_verified_checkpoint, output_dir_lock, read_json,
                         remove_checkpoints, remove_oldest_checkpoints, resume_folder, start_atomic_folder,
                         supersede_later_checkpoints, verify_manifest, writing_folder)
from ..models import (assert_trainable_4bit_layout, base_reference, changed_from_checkpoint, changed_in_memory_hint,
                      check_model_object, ensure_pad_token, four_bit_layout, is_quantized, keep_4bit_trainable,
                      load_model, load_tokenizer, model_fingerprint,
                      position_limit, pretrained_kwargs, resolve_model_path, tokenizer_for, trunk_of,
                      warn_unquantized_experts)
from ..prefix_cache import PrefixCache, frozen_prefix_split, restrict_to_top_layers
from ..progress import progress
from ..rl_math import bt_loss, pearson
from ..trainer_state import TRAINER_STATE, save_trainer_state
from .artifact import save_reward_artifact
from .config import RewardEnsembleConfig
from .ensemble import RewardEnsemble
from .preference_data import (EnsemblePreferenceCollator, add_extra_preferences, check_lengths, check_positions,
                              count_reviewed_dropped, drop_token_ties, hashed_bootstrap_weights,
                              validate_preference_dataset, with_prompt_length)

logger = logging.getLogger(__name__)



def _head_std(config) -> float:
    # Small enough that K random heads start near 0 (large trunk activations would otherwise give each member a
    # big random offset to unlearn), large enough that members start different.
    return getattr(config, "initializer_range", 0.02) / config.hidden_size**0.5


def _expected_calibration_error(p: torch.Tensor, n_bins: int = 10) -> float:
    """ECE of P(chosen ≻ rejected) = σ(Δr) when the label is always "chosen"."""
    conf = torch.maximum(p, 1 - p)
    correct = (p > 0.5).float()
    bins = torch.clamp(((conf - 0.5) * 2 * n_bins).long(), max=n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.float().mean().item() * abs(correct[sel].mean().item() - conf[sel].mean().item())
    return ece


# ------------------------------------------------------------------------------------------- model inputs
def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def _is_seq_cls(model) -> bool:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(hf).__name__.endswith("ForSequenceClassification")


def score_head_of(model, adapter: str | None = None) -> nn.Linear | None:
    """The score head (an nn.Linear) of a sequence-classification model, seen through PEFT (a `modules_to_save` copy
    of `adapter` when there is one); None for any other model or head shape."""
    if not _is_seq_cls(model):
        return None
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in ("score", "classifier"):
        head = getattr(hf, name, None)
        if head is None:
            continue
        if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):  # PEFT's ModulesToSaveWrapper
            head = head.modules_to_save[adapter] if adapter in head.modules_to_save else head.original_module
        return head if isinstance(head, nn.Linear) else None
    return None


def _head_scores_last_token(model, head: nn.Linear, tokenizer) -> bool:
    """Whether the checkpoint scores a text with `head` on the trunk's final hidden state at its last token — what a
    RewardEnsemble head computes (causal classifiers: Llama's / GPT-2's `score`). An encoder's (BERT, DistilBERT,
    DeBERTa) reads its [CLS] position through a pooler first: its head kept on the last token would score features
    it never saw. Checked on one short probe text, in eval mode; a model the probe cannot run keeps its head."""
    from ..adapters import eval_mode

    pad = getattr(model.config, "pad_token_id", None)
    ids = tokenizer("the answer is good and clear")["input_ids"]
    while len(ids) > 1 and ids[-1] == pad:  # pad == EOS: transformers pools the last token that is not padding
        ids = ids[:-1]
    trunk, seen = trunk_of(model), {}

    def keep(module, args, out):  # returns None: the output goes on unchanged
        seen.setdefault("hidden", out[0])

    hook = trunk.register_forward_hook(keep)
    try:
        with torch.no_grad(), eval_mode(model):
            x = torch.tensor([ids], device=next(trunk.parameters()).device)
            theirs = model(input_ids=x, attention_mask=torch.ones_like(x)).logits.float()
            ours = head(seen["hidden"][:, -1].to(head.weight.dtype)).float()
    except Exception as e:  # noqa: BLE001 - an unusual model: keep what was done before this check
        logger.warning("Could not check where the checkpoint's score head reads (%s); it is kept.", e)
        return True
    finally:
        hook.remove()
    return bool(((ours - theirs).abs() <= 1e-3 + 2e-2 * theirs.abs()).all())


def _eval_sets(eval_dataset) -> list:
    if eval_dataset is None:
        return []
    return list(eval_dataset.values()) if isinstance(eval_dataset, dict) else [eval_dataset]


def _check_eos_for_text_pairs(datasets, tokenizer, args) -> None:
    """TRL appends the tokenizer's EOS to every text pair before tokenising (`add_eos`); a tokenizer without one
    (BERT's / DistilBERT's WordPiece) fails there with a bare TypeError. Refused here, with the fix."""
    from .preference_data import _TOKENISED

    if tokenizer.eos_token is not None or getattr(args, "eos_token", None) is not None:
        return
    for dataset in datasets:
        first = next(iter(dataset))
        if is_conversational(first) or any(cols <= set(first) for cols in _TOKENISED):
            continue
        raise ValueError(
            f"The tokenizer ({type(tokenizer).__name__}) has no eos_token, and text pairs get the EOS appended before "
            f"they are tokenised (as trl.RewardTrainer does). For an encoder tokenizer that closes texts with "
            f"[SEP], set `tokenizer.eos_token = tokenizer.sep_token` (or RewardEnsembleConfig(eos_token=...)) and pass "
            f"it as processing_class, or give the pairs pre-tokenised (chosen_ids / rejected_ids columns).")


def _head_weights(head: nn.Linear):
    """(weight [1, H], bias [1] or None) of a score head in fp32 (dequantised if bitsandbytes quantised it)."""
    w = head.weight
    if hasattr(w, "quant_state") and w.quant_state is not None:
        import bitsandbytes as bnb

        w = bnb.functional.dequantize_4bit(w.data, w.quant_state)
    bias = head.bias.detach().float().cpu() if head.bias is not None else None
    return w.detach().float().cpu().reshape(head.out_features, -1), bias


def _checkpoint_num_labels(name_or_path: str, trust_remote_code: bool, revision: str | None = None) -> int | None:
    """num_labels of a sequence-classification checkpoint (by its config's `architectures`); None for any other
    checkpoint or when the config cannot be read here (loading then reports the problem)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code,
                                         **({"revision": revision} if revision else {}))
    except Exception:  # noqa: BLE001 - not readable as a transformers config: load_model names the problem
        return None
    if any(str(a).endswith("ForSequenceClassification") for a in (getattr(cfg, "architectures", None) or [])):
        return int(cfg.num_labels)
    return None


def _is_template_file(path: str) -> bool:
    return os.path.isfile(path) and path.endswith((".jinja", ".j2"))


def _apply_chat_template_path(trunk, tokenizer, path: str) -> list[int]:
    """TRL's `chat_template_path`, applied to the trunk: a `.jinja`/`.j2` file sets the template; a tokenizer or model
    folder (or Hub id) is cloned with `trl.clone_chat_template` (its added tokens, EOS, and the embedding resized to
    a multiple of 64). Returns the added token ids."""
    if _is_template_file(path):
        with open(path, encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
        return []
    from trl.chat_template_utils import clone_chat_template

    _, _, added = clone_chat_template(trunk, tokenizer, path)
    return added


class _SeenGradient:
    """Stands in for a parameter in `GradientReachCheck` under DeepSpeed: `grad` is whether a non-zero gradient
    reached it in the step's backward passes (None: none reached it), as a hook on the parameter saw it."""

    def __init__(self, param):
        self.dim, self.grad = param.dim, None


class _GradientReachCheck(TrainerCallback):
    """At the first optimizer step: every member's LoRA-B matrix and head got gradient, or stop with the cause (an
    all-zero gradient — a member's bootstrap weights all 0 in a batch — is looked at again: `GradientReachCheck`).

    Under DeepSpeed the parameters' `.grad` is gone by the time `on_pre_optimizer_step` runs: accelerate's
    `backward` has already run the engine's step (and its zero_grad), and ZeRO-1/2 move each gradient into their
    partitioned buffers as it is computed. There, hooks on the parameters record what the backward passes gave them
    (`deepspeed = True`, set by the trainer once it knows; removed once the check has decided)."""

    def __init__(self, params, quantized):
        self.params, self.quantized, self.deepspeed, self._hooks = params, quantized, False, None
        self.check = GradientReachCheck(params, "RewardEnsembleTrainer", quantized)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.deepspeed and not self.check.done and self._hooks is None:
            seen = {n: _SeenGradient(p) for n, p in self.params.items()}
            self.check = GradientReachCheck(seen, "RewardEnsembleTrainer", self.quantized)

            def record(s, g):
                hit = g.detach().ne(0).any()
                s.grad = hit if s.grad is None else s.grad | hit

            self._hooks = [p.register_hook(partial(record, seen[n]))
                           for n, p in self.params.items() if p.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        try:
            self.check()
        except BaseException:  # the run stops here: no hook left on the user's model
            self.on_train_end(args, state, control)
            raise
        if self._hooks is not None:
            for s in self.check.params.values():
                s.grad = None  # the next step's backward passes start afresh, as zero_grad leaves `.grad`
            if self.check.done:
                self.on_train_end(args, state, control)

    def on_train_end(self, args, state, control, **kwargs):
        for h in self._hooks or ():
            h.remove()
        self._hooks = None


class _StopOnSignal(TrainerCallback):
    """Ctrl-C / SIGTERM (`interrupt.StopAfterIteration`): at the end of the optimizer step under way, a checkpoint
    (whatever save_strategy says) and the end of training — every process at the same step under DDP."""

    def __init__(self, trainer, stop):
        self.trainer, self.stop, self.stopped = trainer, stop, False

    def on_step_end(self, args, state, control, **kwargs):
        # one tiny reduction per step under DDP: every process stops at the same one
        if self.stop.requested(partial(sum_over_processes, self.trainer.accelerator)):
            self.stopped = control.should_save = control.should_training_stop = True


class _KeepFinishedSteps(TrainerCallback):
    """What `RewardEnsembleTrainer._save_after_failure` needs: the random streams as the last optimizer step that
    finished left them, whether an exception came inside a step (its micro-batches) and inside its optimizer step
    (the weights moved, the step not yet counted)."""

    def __init__(self):
        self.rng, self.in_step, self.stepping, self.best_loaded = None, False, False, False

    def on_train_begin(self, args, state, control, **kwargs):
        # auto_find_batch_size runs the inner loop again after an out-of-memory error, from step 0: what the failed
        # attempt left (its last step's random streams, a step under way) is not this attempt's
        self.rng, self.in_step, self.stepping, self.best_loaded = None, False, False, False

    def capture(self) -> None:
        self.rng = random_streams()

    def on_step_begin(self, args, state, control, **kwargs):
        self.in_step = True

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.stepping = True

    def on_step_end(self, args, state, control, **kwargs):
        self.in_step = self.stepping = False
        self.capture()

    def restore_rng(self) -> None:
        set_random_streams(self.rng)


# what resuming reads from a checkpoint-N folder: the artifact and Trainer's state (the manifest lists the rest:
# optimizer, scheduler, RNG states)
RESUME_FILES = ("heads.safetensors", TRAINER_STATE)
RESUME_FIX = ("Resume from an earlier checkpoint-N folder of the same output_dir, or pass resume_from_checkpoint=True "
              "to take the newest complete one.")


def _check_peft_config(peft_config) -> None:
    """As trl.RewardTrainer: a `peft.PeftConfig` or nothing. Members are LoRA adapters (saved as LoRA weights and
    rebuilt from LoRA settings on load), so another PEFT method is refused here, not trained and saved wrongly."""
    if peft_config is None:
        return
    from peft import LoraConfig, PeftConfig

    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"`peft_config` must be a `peft.PeftConfig` instance (e.g. `peft.LoraConfig`), got "
                        f"{type(peft_config).__name__}. Build it with `peft.LoraConfig(**your_dict)`.")
    if not isinstance(peft_config, LoraConfig):
        raise ValueError(f"peft_config is a {type(peft_config).__name__}; RewardEnsembleTrainer trains LoRA adapters "
                         f"(each member is saved as LoRA weights and rebuilt from LoRA settings when loaded). Pass a "
                         f"`peft.LoraConfig`, or no peft_config to train the whole model.")
    _check_lora_settings(peft_config)


def _check_user_optimizer(optimizer, ens) -> None:
    """`optimizers=(opt, sched)` built before the trainer cannot hold the score heads the trainer creates: refuse it
    when a trainable parameter is missing from it (trained silently without them before), naming the fix."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in ens.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise ValueError(
            f"The optimizer passed in `optimizers` does not hold {len(missing)} parameter(s) the trainer trains "
            f"({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''}): the ensemble's score heads are created by "
            f"RewardEnsembleTrainer, after your optimizer. Pass `optimizer_cls_and_kwargs=(torch.optim.AdamW, "
            f"{{'lr': ...}})` instead (built over the trainer's parameters), or build the optimizer after the trainer "
            f"over `trainer.model.parameters()` and set `trainer.optimizer`.")


# What an artifact records of a LoRA config: every field `artifact.lora_config_of` needs to rebuild the trained
# adapter's shapes and forward (the saved weights then replace its init)
_RECORDED_LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "use_dora",
                         "fan_in_fan_out", "init_lora_weights", "layers_to_transform", "layers_pattern")
# recorded only when set, so a plain LoRA run records what it did before (and resumes its earlier checkpoints)
_RECORDED_WHEN_SET = ("exclude_modules", "rank_pattern", "alpha_pattern", "modules_to_save", "lora_bias",
                      "target_parameters")
# fields that shape nothing an artifact holds: bookkeeping, and settings read only by an init refused anyway
_NOT_REBUILT = ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "runtime_config",
                "auto_mapping", "peft_version", "loftq_config", "eva_config", "corda_config", "megatron_core",
                "qalora_group_size")


def _check_lora_settings(cfg) -> None:
    """Refuse, before training, a LoRA setting the artifact cannot rebuild: the saved model would load as another
    model (scoring differently, or not loading), which nothing would say until after the run."""
    from peft import AdaLoraConfig

    from ..architectures import refuse_unsupported_peft
    from .artifact import BASE_KEEPING_INITS

    if isinstance(cfg, AdaLoraConfig):
        refuse_unsupported_peft(cfg)  # raises, with the LoraConfig to use instead
    init = cfg.init_lora_weights
    if init not in BASE_KEEPING_INITS:
        raise ValueError(
            f"peft_config has init_lora_weights={init!r}, which starts the adapter from the base weights and "
            f"rewrites those weights (the base keeps what the adapter took). The saved adapter on the unmodified base "
            f"— the one a reward model is loaded onto, or shares with the PPO policy — would not score as the trained "
            f"model did, and rebuilding it with that init would rewrite the shared base. Train with the default init "
            f"(leave init_lora_weights out, or set it to True).")
    defaults, mine = type(cfg)().to_dict(), cfg.to_dict()
    odd = [k for k, v in mine.items()
           if k not in _RECORDED_LORA_FIELDS + _RECORDED_WHEN_SET + _NOT_REBUILT and v != defaults.get(k)]
    if odd:
        raise ValueError(
            f"peft_config sets {', '.join(f'{k}={mine[k]!r}' for k in odd)}, which a reward-model artifact does not "
            f"record: the saved model would load as a different one. Leave {'it' if len(odd) == 1 else 'them'} at "
            f"LoraConfig's default to train a reward model.")


def _lora_config_dict(peft_config) -> dict:
    """The LoRA fields an artifact records (what `artifact.lora_config_of` rebuilds on a bare trunk or a host)."""
    d = peft_config.to_dict()
    cfg = {k: d.get(k) for k in _RECORDED_LORA_FIELDS if k in d}
    cfg.update({k: d[k] for k in _RECORDED_WHEN_SET if d.get(k)})
    # the base's biases stay frozen whatever `bias` says (architectures.refuse_unsupported_peft says so): recorded
    # as such, so attaching the artifact to a host does not make the host's biases trainable
    cfg["bias"] = "none"
    return {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}


_QUANTIZED_WHOLE_TRUNK = (
    "The base model is quantised (load_in_4bit / a BitsAndBytesConfig) and there is no peft_config, so the whole trunk "
    "would train, and quantised weights cannot (transformers' Trainer refuses a purely quantised model alike; here it "
    "failed in torch: 'only Tensors of floating point dtype can require gradients'). Pass `peft_config=LoraConfig(...)` "
    "(QLoRA; recipes: `use_peft: true`), or `heads_only=True` to train the score heads on the frozen quantised base, "
    "or load the model without quantisation.")


class RewardEnsembleTrainer(RewardTrainer):
    """`trl.RewardTrainer` that trains K Bradley–Terry members in one run and saves one loadable artifact.

    Call shape is TRL's: `RewardEnsembleTrainer(model, args=RewardEnsembleConfig(...), train_dataset=...,
    eval_dataset=..., processing_class=..., peft_config=..., compute_metrics=...)`. `model` may be a hub id, a local
    folder, a `.gguf` file, the embedded default name, an instantiated transformers model (its trunk is used), or a
    `peft.PeftModel` (its LoRA adapter is the member: only the adapter and the score heads train). A
    sequence-classification checkpoint with `num_labels=1` (a trained reward model) keeps its score head where that
    head scores the last token (a causal classifier's; an encoder's pooled [CLS] head is not used, with a warning):
    it is the head of K=1, and the K heads of an ensemble start from it. Datasets may be `datasets.Dataset` or streaming
    `IterableDataset` (then `max_steps` is required, as in TRL).
    """

    _tag_names = ["trl", "reward-trainer", "rlhf_ext"]

    # trl.RewardTrainer's parameters in its order (a positional call means the same here), then ours
    def __init__(self, model, args: RewardEnsembleConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), optimizer_cls_and_kwargs=None, preprocess_logits_for_metrics=None,
                 quantization_config=None, peft_config=None, load_in_4bit: bool = False, **kwargs):
        if args is None:
            args = RewardEnsembleConfig("reward-ensemble")
        elif isinstance(args, RewardConfig) and not isinstance(args, RewardEnsembleConfig):
            args = RewardEnsembleConfig.adopt(args)  # TRL's own config, as trl.RewardTrainer takes it (kept: args is args)
        elif not isinstance(args, RewardEnsembleConfig):
            raise TypeError(f"`args` must be a RewardEnsembleConfig (or a trl.RewardConfig), got "
                            f"{type(args).__name__}.")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required (TRL preference format: chosen/rejected[/prompt]).")
        ensure_writable_dir(args.output_dir)  # before any training depends on it
        if args.extra_preferences:
            train_dataset = add_extra_preferences(train_dataset, args.extra_preferences, args.extra_preferences_weight)
        train_dataset = validate_preference_dataset(train_dataset)
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: validate_preference_dataset(v, f"eval_dataset[{k!r}]") for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = validate_preference_dataset(eval_dataset, "eval_dataset")
        K, mode = args.ensemble_size, args.ensemble_mode
        peft_host = _is_peft_model(model)
        _check_peft_config(peft_config)
        if peft_host and peft_config is not None:
            raise ValueError(
                "You passed a `PeftModel` instance together with a `peft_config` to the trainer (as in TRL, this is "
                "refused). Either pass the PeftModel alone (its adapter is trained), or merge and unload its adapter, "
                "save the base model, and pass that base model with the new `peft_config`."
            )
        if mode == "adapters" and K > 1 and peft_config is None and not peft_host:
            raise ValueError(
                "ensemble_mode='adapters' trains K LoRA adapters on one frozen base and needs a LoRA config: pass "
                "`peft_config=LoraConfig(...)` (recipes: `use_peft: true`), or use ensemble_mode='heads'."
            )

        no_lora = peft_config is None and not peft_host
        if no_lora and args.lora_top_layers:
            raise ValueError(
                f"lora_top_layers={args.lora_top_layers} puts the LoRA layers of `peft_config` on the top layers only, "
                f"and there is no peft_config: "
                + ("heads_only trains no trunk layer, so it would do nothing. " if args.heads_only else
                   "the whole trunk would train, every layer. ")
                + "Pass `peft_config=LoraConfig(...)` (recipes: `use_peft: true`), or leave lora_top_layers at 0.")
        if no_lora and not args.heads_only and (load_in_4bit or getattr(quantization_config, "load_in_4bit", False)):
            raise ValueError(_QUANTIZED_WHOLE_TRUNK)

        # The model: a trunk (the transformer body, no LM head), and the trained score head when it has one
        torch.manual_seed(args.seed)
        self.base_model_name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None)
        self.base_revision = None
        if isinstance(model, str):
            init = pretrained_kwargs(args, quantization_config)
            self.base_revision = init.get("revision")  # recorded: a separate load takes the same weights
            if processing_class is None:  # the tokenizer of the weights' revision
                processing_class = tokenizer_for(model, init)
            labels = _checkpoint_num_labels(model, init["trust_remote_code"], init.get("revision"))
            if labels not in (None, 1):
                logger.warning("%s is a sequence-classification checkpoint with num_labels=%d; a reward model has one "
                               "output, so its score head is not used (new heads are trained).", model, labels)
            source = load_model(model, "seq_cls" if labels == 1 else "trunk",
                                load_in_4bit=load_in_4bit, **init)
        else:
            if _is_seq_cls(model) and getattr(model.config, "num_labels", None) != 1:
                raise ValueError(
                    f"The model has `num_labels={model.config.num_labels}`, but reward models require `num_labels=1` "
                    "to output a single scalar reward per sequence (as in trl.RewardTrainer). Instantiate it with "
                    "`num_labels=1`, or pass the causal LM (or its folder): RewardEnsembleTrainer builds its own heads."
                )
            # (model_init_kwargs: TRL's RewardTrainer warns itself)
            check_model_object(model, "RewardEnsembleTrainer", load_in_4bit=load_in_4bit,
                               quantization_config=quantization_config)
            if is_quantized(model):
                keep_4bit_trainable(model)  # bitsandbytes' CPU inference layout has no backward
            changed = changed_from_checkpoint(model, self.base_model_name)
            if changed:  # an SFT adapter merged in memory: the embedding fingerprint the artifact records cannot tell
                warnings.warn(changed_in_memory_hint(
                    "RewardEnsembleTrainer", self.base_model_name, changed,
                    "The reward artifact records that folder as its base: load_reward_model(path) would reload those "
                    "weights, not these, and score otherwise than the model that trained."), UserWarning, stacklevel=2)
            source = model
        trunk = trunk_of(source)
        self.quantized = is_quantized(source)  # of the model as loaded/given: its inner trunk carries no 4-bit flag
        if self.quantized and no_lora and not args.heads_only:  # a quantised model object (the flag was checked above)
            raise ValueError(_QUANTIZED_WHOLE_TRUNK)
        self.four_bit_layout = four_bit_layout(source)  # recorded, so a separate load quantises the base alike
        warn_unquantized_experts(source)
        if processing_class is None:
            if not self.base_model_name:  # a model built in code: "" would read whatever tokenizer is in the cwd
                raise ValueError("Pass `processing_class` (the tokenizer) when `model` is an instantiated model "
                                 "without a name or folder (its config's _name_or_path is empty).")
            processing_class = load_tokenizer(self.base_model_name)
        if getattr(args, "pad_token", None) is not None:  # TRL's deprecated field: set before our collator pads
            if args.pad_token not in processing_class.get_vocab():
                raise ValueError(f"The specified `pad_token` ({args.pad_token!r}) is not in the vocabulary of the "
                                 f"tokenizer. Use a token it has, or set `tokenizer.pad_token` and pass the tokenizer "
                                 f"as `processing_class` (TRL deprecates this field).")
            processing_class.pad_token = args.pad_token
        ensure_pad_token(processing_class)
        self.fingerprint = model_fingerprint(trunk)  # of the base as saved (before a chat template resizes it)
        # the dtype the base loads in for scoring, as loaded here: DeepSpeed's bf16 casts the whole model before the
        # first step (its fp32 copies are the optimizer's), which DDP's autocast does not
        self.trunk_dtype = str(next(trunk.parameters()).dtype).replace("torch.", "")
        added = _apply_chat_template_path(trunk, processing_class, args.chat_template_path) \
            if args.chat_template_path is not None else []
        conversational = is_conversational(next(iter(train_dataset)))
        # (pooling="response" says so itself, below, with its own fix)
        if conversational and processing_class.chat_template is None and args.pooling != "response":
            raise ValueError("train_dataset is conversational (lists of chat messages) but the tokenizer has no chat "
                             "template (a base model's tokenizer). Set chat_template_path (a Jinja file, or a model "
                             "folder whose template to take), or give the pairs as text.")
        _check_eos_for_text_pairs([train_dataset, *_eval_sets(eval_dataset)], processing_class, args)
        head = score_head_of(source, source.active_adapter if peft_host else None)
        if head is not None and not _head_scores_last_token(source, head, processing_class):
            warnings.warn(
                f"The {type(source).__name__} checkpoint's score head does not score the last token's final hidden "
                f"state (an encoder classifier reads its [CLS] position through a pooler), and RewardEnsembleTrainer's "
                f"heads read the last attended token: the checkpoint's head is not used, new heads are trained "
                f"(its scores are not continued from). To continue its own scoring, train it with trl.RewardTrainer.",
                stacklevel=2)
            head = None
        head_init = _head_weights(head) if head is not None else None
        if head_init is not None and getattr(source.config, "pad_token_id", None) == processing_class.eos_token_id:
            warnings.warn(
                f"The sequence-classification checkpoint has pad_token_id == the EOS id ({processing_class.eos_token_id}). "
                f"transformers scores the last token that is not padding, so its head was trained on the token before "
                f"the final EOS; RewardEnsembleTrainer's heads read the last attended token (the EOS itself), so its "
                f"scores shift until training adapts the head. A checkpoint whose pad token differs from EOS keeps "
                f"them exactly.", stacklevel=2)

        # Members: adapters (or the full trunk) + their score heads, as one RewardEnsemble
        if peft_host:
            body, (adapter_names, ens_mode) = source, self._members_on_peft_model(source, args)
        elif peft_config is not None:
            body = self._wrap_peft(trunk, peft_config, args)
            adapter_names = list(body.peft_config)
            ens_mode = "heads" if mode == "heads" or K == 1 else "adapters"
        else:
            body, adapter_names, ens_mode = trunk, ["full"], "full"
        new_tokens = [t for t in processing_class.convert_ids_to_tokens(added) if not t.startswith("<extra_id_")]
        if new_tokens and ens_mode != "full":
            warnings.warn(
                f"chat_template_path added {len(new_tokens)} token(s) to the vocabulary ({', '.join(new_tokens[:4])}"
                f"{' …' if len(new_tokens) > 4 else ''}). With LoRA their embeddings stay as initialised, and the saved "
                f"artifact, which loads the base model from {self.base_model_name!r}, will not have them. Train without "
                f"peft_config (the whole trunk is saved), or add the tokens to the base model and save it first.",
                stacklevel=2)
        if args.disable_dropout:  # TRL's flag; TRL zeroes nn.Dropout only, not functional attention dropout
            zero_dropout(trunk)
        hidden, std = final_hidden_size(body), _head_std(trunk.config)  # OPT-350m: not hidden_size
        if head_init is not None and args.pooling != "last":
            logger.warning("The checkpoint's score head was trained on the last token; pooling=%r feeds it something "
                           "else, so its scores start elsewhere.", args.pooling)
        if head_init is not None and head_init[0].shape[1] != hidden:
            logger.warning("The checkpoint's score head reads %d features but the trunk gives %d; it is not used.",
                           head_init[0].shape[1], hidden)
            head_init = None
        device = next(trunk.parameters()).device
        heads = nn.ModuleDict()
        for k, a in enumerate(adapter_names):
            if K == 1 and head is not None and head_init is not None and not peft_host \
                    and head.weight.dtype == torch.float32 and head.weight.device == device:
                heads[a] = head  # the model's own score module: an optimizer built on model.parameters() trains it
                continue
            torch.manual_seed(args.seed + 2000 + k)  # each member its own head init
            outputs = K if ens_mode != "adapters" else 1
            # fp32 whatever torch's default dtype: a user's set_default_dtype(bfloat16) trained bf16 heads silently
            heads[a] = nn.Linear(hidden, outputs, bias=head_init is not None and head_init[1] is not None,
                                 device=device, dtype=torch.float32)
            nn.init.normal_(heads[a].weight, 0.0, std)
            if head_init is not None:
                w, b = (t.to(device) if t is not None else None for t in head_init)
                with torch.no_grad():
                    if K == 1:
                        heads[a].weight.copy_(w)
                    else:  # the trained head plus each member's own small perturbation: members start different
                        heads[a].weight.add_(w.expand(outputs, -1))
                    if b is not None:
                        heads[a].bias.copy_(b.expand(outputs))
        self.head_init = "random" if head_init is None else "checkpoint" if K == 1 else "checkpoint+noise"
        if head_init is not None:
            logger.info("Score head%s: %s.", "s" if K > 1 else "",
                        "the checkpoint's trained head, kept" if K == 1 else
                        f"the checkpoint's trained head + N(0, {std:.2g}) per member, for each of the {K} members")
        spec = {"mode": ens_mode, "adapters": adapter_names, "members": [f"member_{k}" for k in range(K)],
                "pooling": args.pooling, "max_length": args.max_length}
        config = copy.deepcopy(trunk.config)  # the trainer's view: one score per sequence (TRL checks num_labels=1)
        config.num_labels = 1
        ens = RewardEnsemble(body, processing_class, spec, heads, config=config)
        self.member_adapters = adapter_names if ens_mode != "full" else []
        self._positions = position_limit(trunk)  # longer pairs are refused (`_prepare_dataset`)
        self.heads_only = args.heads_only
        self._set_trainable(ens)
        # on CPU with fp32 weights, the frozen trunk's matmuls through the faster kernel this machine measured
        self.cpu_matmul = route_frozen_linears(ens, args.cpu_matmul_backend, args.device)

        # Per-member bootstrap weights over training pairs (Poisson(1) ≈ resampling with replacement)
        g = torch.Generator().manual_seed(args.seed + 1)
        # `pair_id` is each pair's row (it indexes the bootstrap table): a column of that name in the user's data —
        # which TRL never reads — is replaced, not taken as row numbers (ids 1000… crashed the first step)
        if isinstance(train_dataset, IterableDataset):
            train_dataset = train_dataset.map(lambda row, i: {"pair_id": i}, with_indices=True)
            self.bootstrap_weights = None  # no length: drawn per pair from a hash of its id (hashed_bootstrap_weights)
        else:
            if "pair_id" in train_dataset.column_names:
                train_dataset = train_dataset.remove_columns("pair_id")
            train_dataset = train_dataset.add_column("pair_id", list(range(len(train_dataset))))
            if K > 1 and args.bootstrap:
                self.bootstrap_weights = torch.poisson(torch.ones(K, len(train_dataset)), generator=g)
            else:
                self.bootstrap_weights = torch.ones(K, len(train_dataset))

        if args.length_decorrelation_coef > 0 and args.per_device_train_batch_size < 2:
            warnings.warn(f"length_decorrelation_coef={args.length_decorrelation_coef} with per_device_train_batch_size="
                          f"{args.per_device_train_batch_size}: the term is the correlation of rewards with lengths "
                          f"within each micro-batch, and over one pair's two responses it is ±1 or 0, with no "
                          f"gradient — it only adds to the loss. Use batches of several pairs (it is computed per "
                          f"micro-batch and per process, not over the accumulated step).", stacklevel=2)
        if data_collator is None:
            data_collator = EnsemblePreferenceCollator(pad_token_id=ens.pad_id,  # an unresized [PAD] never embedded
                                                       pad_to_multiple_of=args.pad_to_multiple_of)
        check = _GradientReachCheck(self._reach_params(ens), self.quantized)
        if optimizers[0] is not None:
            _check_user_optimizer(optimizers[0], ens)
        if args.dataloader_pin_memory and not torch.accelerator.is_available():
            # transformers' default (True) where there is no accelerator: torch warns at each dataloader that it pins
            # nothing. Pinning only speeds copies to an accelerator, so turning it off here changes nothing else
            args.dataloader_pin_memory = False
        if args.gradient_checkpointing and args.ddp_find_unused_parameters is None:
            # What transformers does for its own models (ours is not a PreTrainedModel): DDP's unused-parameter
            # search breaks (reentrant) checkpointing, and every member's parameters take part in every step.
            args.ddp_find_unused_parameters = False
        template, init_kwargs = args.chat_template_path, args.model_init_kwargs
        if template is not None and not _is_template_file(template):
            args.chat_template_path = None  # cloned onto the trunk above; TRL would clone onto our wrapper again
        if isinstance(model, str):  # used above to load it; TRL, handed the ensemble, would warn they were ignored
            args.model_init_kwargs = None
        try:
            super().__init__(model=ens, args=args, data_collator=data_collator, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=processing_class, peft_config=None,
                             compute_metrics=compute_metrics, callbacks=[*(callbacks or []), check],
                             optimizers=optimizers, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                             preprocess_logits_for_metrics=preprocess_logits_for_metrics, **kwargs)
        finally:
            args.chat_template_path, args.model_init_kwargs = template, init_kwargs
        close_process_group_at_exit()
        check.deepspeed = self.is_deepspeed_enabled  # the gradients are DeepSpeed's by the optimizer-step callback
        if args.fp16 and self.accelerator.device.type == "cpu" and self.accelerator.scaler is None:
            warnings.warn("fp16=True on CPU: accelerate runs neither an fp16 autocast nor a loss scaler there, so the "
                          "reward model trains in fp32 (as trl.RewardTrainer does on CPU). bf16=True does autocast "
                          "on CPU; fp16 is for GPUs before Ampere.", stacklevel=2)
        # on CPU, each step would otherwise page-fault its activations in again (cpu_memory.py)
        self.cpu_memory = keep_freed_memory_for(args)
        self.prefix_cache = self._build_prefix_cache(ens) if args.cache_frozen_layers else None
        self._eval_buffer = defaultdict(list)
        self._eval_prefix = "eval"
        self._check_4bit_layout = self.quantized  # at the first training step, and after every no-grad pass
        self.normalization: dict | None = None
        self.is_conversational = conversational

    # -- model setup -----------------------------------------------------------------------------------------
    def _wrap_peft(self, trunk, peft_config, args):
        from ..architectures import resolve_lora_config

        peft_config = resolve_lora_config(peft_config, trunk)  # target_modules=None: per-architecture default
        peft_config.task_type = None  # a bare trunk: our heads, not PEFT's modules_to_save, score
        restrict_to_top_layers(peft_config, trunk, args.lora_top_layers)
        self.lora_config = _lora_config_dict(peft_config)
        names = ["reward"] if args.ensemble_mode == "heads" or args.ensemble_size == 1 else [
            f"reward_{k}" for k in range(args.ensemble_size)]
        for k, name in enumerate(names):
            torch.manual_seed(args.seed + 1000 * k)  # different LoRA-A init per member
            if k == 0:
                trunk = wrap_with_peft(trunk, peft_config, name)
            else:
                trunk.add_adapter(name, peft_config)
        return trunk

    def _members_on_peft_model(self, host, args):
        """A PeftModel passed as `model`: its active LoRA adapter is member 0 and trains on (the base stays frozen,
        as in TRL). In "adapters" mode with K > 1 the other members are new adapters with its LoRA config (each its
        own LoRA-A init), starting from its weights when it has been trained."""
        from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

        from ..adapters import adapter_parameters

        name = host.active_adapter
        cfg = host.peft_config[name]
        if not isinstance(cfg, LoraConfig):
            raise ValueError(f"The PeftModel's adapter {name!r} is a {type(cfg).__name__}; RewardEnsembleTrainer trains "
                             f"LoRA adapters (members are saved as LoRA weights). Merge it into the base model and "
                             f"pass a LoraConfig as peft_config instead.")
        if args.lora_top_layers:
            raise ValueError(f"lora_top_layers={args.lora_top_layers} places the LoRA layers the trainer creates from "
                             f"`peft_config`; the PeftModel you passed already has its adapter {name!r}. Leave "
                             f"lora_top_layers at 0, or pass the base model with peft_config=LoraConfig(...).")
        _check_lora_settings(cfg)
        self.lora_config = _lora_config_dict(cfg)
        names = [name]
        K = args.ensemble_size
        if args.ensemble_mode == "adapters" and K > 1:
            trained = any(bool(torch.any(p != 0)) for n, p in adapter_parameters(host, name).items() if "lora_B" in n)
            state = get_peft_model_state_dict(host, adapter_name=name) if trained else None
            for k in range(1, K):
                new = f"reward_{k}"
                while new in host.peft_config:
                    new += "_"
                torch.manual_seed(args.seed + 1000 * k)
                host.add_adapter(new, copy.deepcopy(cfg))
                if state is not None:
                    set_peft_model_state_dict(host, state, adapter_name=new)
                names.append(new)
            logger.info("Members: the PeftModel's adapter %r and %d new adapter(s) with its LoRA config%s.", name, K - 1,
                        ", starting from its weights" if trained else "")
        return names, "heads" if args.ensemble_mode == "heads" or K == 1 else "adapters"

    def _set_trainable(self, ens):
        if self.heads_only:  # a linear probe: nothing below the heads moves
            ens.model.requires_grad_(False)
        elif self.member_adapters:
            set_trainable(ens.model, self.member_adapters)
            inside = {id(p) for p in trunk_of(ens.model).parameters()}
            for p in ens.model.parameters():  # a PeftModel's own LM/score head copies: our heads score instead
                if id(p) not in inside:
                    p.requires_grad_(False)
            if self.quantized:  # keep LoRA math in fp32 on a 4-bit base (TRL would cast to bf16)
                for p in ens.model.parameters():
                    if p.requires_grad:
                        p.data = p.data.float()
        else:
            ens.model.requires_grad_(True)
        ens.heads.requires_grad_(True)

    def _reach_params(self, ens) -> dict:
        params = first_step_grad_params(ens.model, self.member_adapters) if self.member_adapters else {}
        return params | {f"heads.{n}": p for n, p in ens.heads.named_parameters()}

    def _build_prefix_cache(self, ens):
        if not self.member_adapters:
            warnings.warn("cache_frozen_layers needs LoRA on the top layers only (`lora_top_layers`); it is off.")
            return None
        split = frozen_prefix_split(ens.model, self.member_adapters, warn_unlayered=True)
        if split is None:
            return None
        ens.prefix_cache = PrefixCache(split)
        return ens.prefix_cache

    # -- data ------------------------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's preparation (tokenise, rename legacy columns), then its `max_length` filter with counts: no pair
        left is an error naming the shortest pair; most pairs dropped is a warning (TRL drops them silently)."""
        # as TRL's own maps: the main process computes, the others read its cached result (one bar, not one each)
        with global_then_local_main_first():
            dataset = with_prompt_length(dataset, processing_class, args.dataset_num_proc)
        if dataset_name == "reference":
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            return check_positions(dataset, getattr(self, "_positions", None), args.max_length, "the reference set")
        unfiltered = copy.copy(args)
        unfiltered.max_length = None
        dataset = super()._prepare_dataset(dataset, processing_class, unfiltered, dataset_name)
        label = {"train": "train_dataset", "eval": "eval_dataset"}.get(dataset_name, f"eval_dataset[{dataset_name!r}]")
        dataset = drop_token_ties(dataset, label)
        dataset = count_reviewed_dropped(dataset, args.max_length, args.extra_preferences_weight)
        dataset = check_positions(dataset, getattr(self, "_positions", None), args.max_length, label)
        if args.max_length is None:
            return dataset
        limit = args.max_length
        check_lengths(dataset, limit, label)
        kwargs = {"num_proc": args.dataset_num_proc, "desc": f"Filtering {dataset_name} >{limit} tokens"} \
            if isinstance(dataset, Dataset) else {}  # TRL's bar, named as TRL names it
        with global_then_local_main_first():
            return dataset.filter(lambda e: len(e["chosen_ids"]) <= limit and len(e["rejected_ids"]) <= limit, **kwargs)

    def _set_signature_columns_if_needed(self):
        # TRL keeps only chosen_ids/rejected_ids/margin; without pair_id the bootstrap weights would never apply
        # (every member would see the same data); prompt_length: where the responses start (`with_prompt_length`)
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns,
                                   *[c for c in ("pair_id", "prompt_length") if c not in self._signature_columns]]

    # -- loss ------------------------------------------------------------------------------------------------
    def _member_weights(self, inputs, like: torch.Tensor, training: bool | None = None) -> torch.Tensor:
        """Bootstrap weights [B, K] of the batch's pairs (training only; ones otherwise). `training`: whether the
        batch is a training one (default: the model's mode, which is eval right after an evaluation)."""
        K = like.shape[1]
        training = self.model.training if training is None else training
        if not training or "pair_id" not in inputs:
            return torch.ones_like(like)
        ids = inputs["pair_id"].cpu()
        if self.bootstrap_weights is not None:
            return self.bootstrap_weights[:, ids].T.to(like)
        if K > 1 and self.args.bootstrap:  # streaming: no table over the dataset
            return hashed_bootstrap_weights(ids, K, self.args.seed + 1).to(like)
        return torch.ones_like(like)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """transformers prefetches an optimizer step's micro-batches here; with bootstrap weights, each member's
        total weight over all of them and every process is what its weighted mean divides by (`_weight_norm`)."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_weights = None
        K = getattr(self.args, "ensemble_size", 1)
        if getattr(self.args, "bootstrap", False) and K > 1:  # only the training loop prefetches batches here (the
            # model may still be in eval mode after an evaluation: training_step switches it back later)
            total = sum(self._member_weights(b, torch.ones(len(b["pair_id"]), K), training=True).sum(0)
                        for b in batches if "pair_id" in b)
            if torch.is_tensor(total):
                self._step_weights = self.accelerator.reduce(total.to(device), reduction="sum").cpu()
        return batches, num_items

    def _weight_norm(self, w: torch.Tensor):
        """(divisor [K], scale) of the weighted BT mean. With bootstrap weights, each member's weighted mean is taken
        over the whole optimizer step — every micro-batch of gradient accumulation, every process — as one batch of
        that size would take it: per micro-batch, a member with one weighted pair in a chunk gave it half the step's
        weight, so the result depended on how the step was split. The scale undoes transformers' division by the
        accumulation steps and DDP's mean over processes. Without weights: TRL's per-batch mean."""
        totals = getattr(self, "_step_weights", None) if getattr(self, "_in_training_step", False) else None
        if totals is None or not self.model.training or w.shape[1] != len(totals):
            return w.sum(0).clamp(min=1e-6), 1.0
        scale = self.current_gradient_accumulation_steps * self.accelerator.num_processes
        return totals.to(w).clamp(min=1e-6), scale

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        rewards = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).float()  # [2B, K]
        r_chosen, r_rejected = rewards.chunk(2)  # [B, K] each
        margin = inputs.get("margin")
        per_pair = bt_loss(r_chosen, r_rejected, None if margin is None else margin.unsqueeze(-1))  # [B, K]
        w = self._member_weights(inputs, per_pair)
        norm, scale = self._weight_norm(w)
        loss = ((per_pair * w).sum(0) / norm).mean() * scale  # mean over members of BT loss
        if self.args.center_rewards_coefficient is not None:
            # TRL's term (Eisenstein et al. 2023, eq. 2): the pair's summed reward → 0. It centres rewards without
            # pulling chosen and rejected together (Σ r² per response would also shrink the margin).
            centre = (r_chosen + r_rejected) ** 2
            loss = loss + self.args.center_rewards_coefficient * ((centre * w).sum(0) / norm).mean() * scale
        lengths = inputs["response_length"].to(rewards)
        corr = torch.stack([pearson(rewards[:, k], lengths) for k in range(rewards.shape[1])])
        if self.args.length_decorrelation_coef > 0:
            loss = loss + self.args.length_decorrelation_coef * corr.abs().mean()  # ODIN-style de-correlation

        if mode == "train":  # TRL's token count
            self._total_train_tokens += (self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                                         // self._tp_size)
        with torch.no_grad():
            gather = self.accelerator.gather_for_metrics
            delta = (r_chosen - r_rejected).detach()
            m = self._metrics[mode]
            m["num_tokens"] = [self._total_train_tokens]
            everything = self.accelerator.gather(rewards.detach())
            m["min_reward"].append(everything.min().item())
            m["mean_reward"].append(everything.mean().item())
            m["max_reward"].append(everything.max().item())
            m["accuracy"].append(gather((delta.mean(-1) > 0).float().mean()).mean().item())
            m["margin"].append(gather(delta.mean()).mean().item())
            if mode == "train":  # in eval, over the whole set (`_eval_summary`), not a mean of batches
                m["length_corr"].append(gather(corr.detach().mean()).mean().item())
            if rewards.shape[1] > 1:
                m["ensemble_std"].append(gather(rewards.detach().std(-1).mean()).mean().item())
            if mode == "eval":  # whole-set metrics (ECE, Pearson) are computed in `log`
                # gathered as [B, …] halves: gather_for_metrics drops the last batch's duplicated padding in *pairs*,
                # so a [2B, …] tensor lost rows (13 pairs in batches of 4 kept 25 of 26 responses)
                b, (l_chosen, l_rejected) = self._eval_buffer, lengths.chunk(2)
                b["delta"].append(gather(delta).cpu())
                b["rewards"].append(torch.cat([gather(r_chosen.detach()), gather(r_rejected.detach())]).cpu())
                b["lengths"].append(torch.cat([gather(l_chosen), gather(l_rejected)]).cpu())
        # as a model output, so `compute_metrics` gets the rewards [2N, K] as predictions (TRL: [2N, 1])
        return (loss, SequenceClassifierOutput(logits=rewards)) if return_outputs else loss

    def training_step(self, *args, **kwargs):
        if self._check_4bit_layout:  # the first step, and the first after each eval/no-grad pass
            assert_trainable_4bit_layout(self.accelerator.unwrap_model(self.model), "RewardEnsembleTrainer")
            self._check_4bit_layout = False
        self.normalization = None  # the weights move: each checkpoint normalises with its own (was the first's)
        # the step's bootstrap totals (`get_batch_samples`) divide only the loss of the step's own micro-batches: a
        # compute_loss called directly (after train(), from a callback) takes its batch's mean, as without bootstrap
        self._in_training_step = True
        try:
            return super().training_step(*args, **kwargs)
        finally:
            self._in_training_step = False

    def _after_no_grad_pass(self):
        """A 4-bit layer repacked into bitsandbytes' CPU inference layout (no backward) by an eval forward is refused
        at once, and the next training step checks again."""
        if self.quantized:
            assert_trainable_4bit_layout(self.accelerator.unwrap_model(self.model), "RewardEnsembleTrainer")
            self._check_4bit_layout = True

    def _fresh_eval_metrics(self) -> None:
        """predict() runs the eval forward (compute_loss appends to the eval metrics) but never logs, which is what
        empties them: the next evaluate() averaged in predict()'s batches — of another dataset."""
        self._eval_buffer.clear()
        self._metrics["eval"].clear()

    def predict(self, *args, **kwargs):
        self._fresh_eval_metrics()
        try:
            return super().predict(*args, **kwargs)
        finally:
            self._fresh_eval_metrics()
            self._after_no_grad_pass()

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._fresh_eval_metrics()
        prefix, self._eval_prefix = self._eval_prefix, metric_key_prefix  # a dict of eval sets: eval_<name>_*
        try:
            out = super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._eval_prefix = prefix
        self._after_no_grad_pass()
        return out

    def log(self, logs, start_time=None):
        if self._eval_buffer and not self.model.training and self._eval_buffer.get("delta"):
            logs.update({f"{self._eval_prefix}_{k}": v for k, v in self._eval_summary().items()})
            self._eval_buffer.clear()
        super().log(logs, start_time)

    def _eval_summary(self) -> dict:
        b = {k: torch.cat(v) for k, v in self._eval_buffer.items()}
        delta, rewards, lengths = b["delta"], b["rewards"], b["lengths"]  # [N, K], [2N, K], [2N]
        out = {"accuracy_ensemble": (delta.mean(-1) > 0).float().mean().item(),
               "ece": _expected_calibration_error(torch.sigmoid(delta.mean(-1))),
               "length_pearson": pearson(rewards.mean(-1), lengths).item(),  # of the members' mean reward
               # the members' mean |…| as the training term reads it, over every pair of the set
               "length_corr": torch.stack([pearson(rewards[:, k], lengths) for k in range(rewards.shape[1])])
               .mean().item()}
        for k in range(delta.shape[1]):
            out[f"accuracy_member_{k}"] = (delta[:, k] > 0).float().mean().item()
        if delta.shape[1] > 1:
            out["ensemble_disagreement"] = rewards.std(-1).mean().item()
        return out

    # -- normalisation + artifact ----------------------------------------------------------------------------
    @torch.no_grad()
    def compute_normalization(self, dataset=None, max_pairs: int | None = None) -> dict:
        """Per-member mean/std of rewards on a reference set (chosen and rejected responses): the first
        `normalization_samples` pairs of the eval set (else the training set), a stream included."""
        if dataset is None:  # tokenized and filtered at __init__ (`_prepare_dataset`): not a second time here
            single_eval = self.eval_dataset is not None and not isinstance(self.eval_dataset, dict)
            dataset = self.eval_dataset if single_eval else self.train_dataset
        else:
            dataset = self._prepare_dataset(dataset, self.processing_class, self.args, "reference")
        limit = max_pairs or self.args.normalization_samples
        if isinstance(dataset, Dataset):
            n = min(len(dataset), limit)
            cols = [c for c in dataset.column_names if c in ("chosen_ids", "rejected_ids")]
            rows = dataset.select(range(n)).select_columns(cols)
            source = (rows[j] for j in range(n))
        else:
            n = None
            source = ({"chosen_ids": e["chosen_ids"], "rejected_ids": e["rejected_ids"]} for e in islice(dataset, limit))
        ens = self.accelerator.unwrap_model(self.model)
        chunks = []
        bs = self.args.per_device_eval_batch_size
        bar = progress(self, total=n, desc="Reward normalisation", leave=False)
        while batch_rows := list(islice(source, bs)):  # K trunk passes per pair for adapter ensembles: a progress bar
            batch = self.data_collator(batch_rows)
            chunks.append(ens.score_ids(batch["input_ids"].to(self.args.device),
                                        batch["attention_mask"].to(self.args.device)).cpu())
            bar.update(len(batch_rows))
        bar.close()
        if not chunks:
            raise ValueError("The reference set for the reward normalisation statistics is empty (no pair within "
                             f"max_length={self.args.max_length}); pass compute_normalization(dataset) a non-empty one.")
        self._after_no_grad_pass()
        r = torch.cat(chunks)
        self.normalization = {"mean": r.mean(0).tolist(), "std": r.std(0).clamp(min=1e-6).tolist(), "n": int(r.shape[0])}
        ens.mean.copy_(torch.tensor(self.normalization["mean"]))
        ens.std.copy_(torch.tensor(self.normalization["std"]))
        return self.normalization

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # one run at a time in output_dir (two wrote into each other's checkpoint-N.tmp): a second one is refused
        with output_dir_lock(self.args.output_dir, self.accelerator):
            return self._train_in_output_dir(resume_from_checkpoint, *args, **kwargs)

    def _train_in_output_dir(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint:
            resume_from_checkpoint = self._resume_point(resume_from_checkpoint)
            if self._finished(resume_from_checkpoint):
                return self._load_finished_run(resume_from_checkpoint)
        else:
            self._start_clean()
        if self.args.init_reward_model and not resume_from_checkpoint:  # a resumed run has its own, later weights
            self._init_from(self.args.init_reward_model)
        with StopAfterIteration(announce=self.is_world_process_zero(), unit="step") as stop:
            watch, finished = _StopOnSignal(self, stop), _KeepFinishedSteps()
            self.add_callback(watch)
            self.callback_handler.callbacks.insert(0, finished)  # first: it has seen a step end before any other
            self._finished_steps = finished  # `_maybe_log_save_evaluate`, `_load_best_model`
            try:
                with self._deepspeed_resumes_non_strict():
                    out = super().train(resume_from_checkpoint, *args, **kwargs)
            except Exception as e:  # the optimizer steps that finished are saved (`_save_after_failure`)
                self._save_after_failure(e, finished)
                raise
            finally:
                self.remove_callback(watch)
                self.remove_callback(finished)
                self._finished_steps = None
                self._step_weights = None  # the last step's bootstrap totals (`_weight_norm`)
        if watch.stopped:  # the step's checkpoint is written: say where, and end as the signal means
            if self.is_world_process_zero():
                step = self.state.global_step
                print(f"Stopped after step {step}: checkpoint-{step} is saved in {self.args.output_dir}. {RESUME_HOW}",
                      file=sys.stderr, flush=True)
            raise stop.exception()
        try:
            self.compute_normalization()
        except Exception as e:  # out of memory in the reference pass: the trained steps are saved as well
            self._save_after_failure(e, finished)
            raise
        return out

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        self._step_weights = None  # the step is over: a training_step called directly later is not one of its batches
        out = super()._maybe_log_save_evaluate(*args, **kwargs)
        if (finished := getattr(self, "_finished_steps", None)) is not None:
            # an evaluation draws from the random streams (its DataLoader's seed), and transformers' own checkpoint
            # is written after it: a checkpoint saved after a failure in the next step holds the streams from here
            finished.capture()
        return out

    def _save_after_failure(self, error: Exception, finished: _KeepFinishedSteps) -> None:
        """An exception during training — a batch the collator refuses, out of memory, an evaluation or a callback
        that fails — lost every optimizer step since the last scheduled checkpoint (transformers saves nothing on
        its way out). In one process the steps that finished are saved as `checkpoint-N` first, with the random
        streams as step N left them (the failed step's micro-batches are dropped: a resumed run is the run that never
        failed), and the exception says so. Not for an exception inside an optimizer step (the weights moved, the
        step is not counted), nor under data parallelism or DeepSpeed: the other processes wait in a collective for
        the one that failed (the launcher stops them)."""
        if (self.args.world_size > 1 or self.is_deepspeed_enabled
                or raised_inside(error, RewardEnsembleTrainer._save_checkpoint)):
            return  # several processes; the save itself failed
        free_failed_step(error)  # whether or not anything is saved: the save's normalisation pass, the user's next step
        done = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if finished.rng is None:  # no step finished in this run
            if self.state.global_step and done.is_dir():  # a resumed run: what it resumed from stands
                note_saved(error, done, self.state.global_step, "optimizer step",
                           "this run failed before it finished a step of its own")
            return
        if finished.best_loaded and not done.is_dir():  # load_best_model_at_end: step N's weights are gone
            note_not_saved(error, f"training had finished and the model holds the best checkpoint's weights "
                                  f"({self.state.best_model_checkpoint}), not step {self.state.global_step}'s",
                           newest_verified_checkpoint(self.args.output_dir, RESUME_FILES))
            return
        # a callback's on_pre_optimizer_step comes before optimizer.step(): the weights have not moved
        if finished.stepping and not raised_inside(error, CallbackHandler.on_pre_optimizer_step):
            note_not_saved(error, f"optimizer step {self.state.global_step + 1} failed while the weights were being "
                                  f"updated", newest_verified_checkpoint(self.args.output_dir, RESUME_FILES))
            return
        if not done.is_dir():
            finished.restore_rng()
            try:
                self._save_checkpoint(self.model, trial=None)
            except Exception as save_error:  # a full disk, say: the first error is what the user must see
                error.add_note(f"rlhf_ext: saving {done.name} after it failed too: {save_error!r}")
                return
        note_saved(error, done, self.state.global_step, "optimizer step",
                   "the failed step is dropped: a resumed run repeats it" if finished.in_step else
                   "this error came after it")

    # -- checkpoints and resuming ------------------------------------------------------------------------------
    def _resume_point(self, resume_from_checkpoint) -> str:
        """The checkpoint to resume from, verified against its manifest before anything is read (transformers
        itself reads a torn trainer_state.json into a bare JSONDecodeError): True — the newest complete one in
        output_dir, damaged ones skipped with a warning naming the file (as PPOTrainer); a folder — itself, refused
        naming the damaged file. Going back to an older checkpoint-N of output_dir renames the later ones, so that a
        later resume=True continues this timeline (`supersede_later_checkpoints`)."""
        explicit = resume_from_checkpoint is not True
        path = resume_folder(resume_from_checkpoint, self.args.output_dir, RESUME_FILES)
        if explicit:
            verify_manifest(path, RESUME_FIX, required=RESUME_FILES)
        # refused before anything in output_dir changes (the later ones superseded): other settings, an earlier
        # version's checkpoint (DeepSpeed loads its own files, past _load_from_checkpoint's check: its error named a
        # ZeRO alignment setting instead), another number of pairs per step
        self._checked_spec(Path(path), verified=True)  # (verified just above, or by resume_folder's pick)
        if not self._finished(path):
            self._check_resume_batch(Path(path))
        if explicit:
            if self.args.should_save:
                supersede_later_checkpoints(self.args.output_dir, path)
            self.accelerator.wait_for_everyone()
        return path

    def _check_resume_batch(self, path: Path) -> None:
        """transformers fast-forwards a resumed run by `global_step` batches of *this* run's size
        (`Trainer._init_training_state`); a checkpoint written with another number of pairs per optimizer step
        (another process count, per-device batch or accumulation) would resume elsewhere in the epoch's order —
        repeating pairs already trained, or skipping some — without a word: refused, naming the settings that keep
        the position. Same pairs per step with another process count: the position is right, the random streams
        (one per process) cannot be dealt out: a warning, as PPOTrainer's."""
        args = self.args
        streams = len(list(path.glob("rng_state_*.pth"))) or int((path / "rng_state.pth").is_file())
        saved_args = path / "training_args.json"
        if not streams or not saved_args.is_file() or args.ignore_data_skip:
            return  # save_only_model (no RNG files): nothing says how it was launched; ignore_data_skip: no skip
        saved, state = read_json(saved_args, RESUME_FIX), read_json(path / TRAINER_STATE, RESUME_FIX)
        # the batch that trained, as transformers records it (auto_find_batch_size shrinks it below the configured
        # per_device_train_batch_size; × n_gpu under DataParallel), and the one this run skips by: the checkpoint's
        # when auto_find_batch_size is on (`Trainer.train` restores it), else the configured one
        trained = state.get("train_batch_size") or saved.get("per_device_train_batch_size", args.train_batch_size)
        was = (streams, int(trained), int(saved.get("gradient_accumulation_steps", args.gradient_accumulation_steps)))
        batch = int(trained) if args.auto_find_batch_size and state.get("train_batch_size") else args.train_batch_size
        now = (args.world_size, batch, args.gradient_accumulation_steps)
        then_pairs, now_pairs = math.prod(was), math.prod(now)
        if then_pairs != now_pairs:
            step = state.get("global_step", 0)
            per_batch = now[0] * now[2]  # processes x accumulation: pairs per step / this = the per-device batch
            keep = [f"per_device_train_batch_size={then_pairs // per_batch}"] if then_pairs % per_batch == 0 else []
            raise ValueError(
                f"{path} trained {then_pairs} pairs per optimizer step ({was[0]} process(es) x "
                f"per_device_train_batch_size {was[1]} x gradient_accumulation_steps {was[2]}); this run takes "
                f"{now_pairs} ({now[0]} x {now[1]} x {now[2]}). Resuming skips {step} steps of this run's size, "
                f"{step * now_pairs} pairs where {step * then_pairs} were trained, so pairs would be "
                f"{'trained again' if now_pairs < then_pairs else 'skipped'}. Keep {then_pairs} pairs per step ("
                + " or ".join(keep + [f"launch {was[0]} process(es) with the checkpoint's settings"]) +
                "), or set ignore_data_skip=True to skip nothing: the resumed epoch's pairs are then taken from its "
                "beginning, some trained again.")
        if was[0] != now[0] and self.is_world_process_zero():
            warnings.warn(f"{path} holds the random streams of {was[0]} process(es) and this run has {now[0]}: the "
                          f"data position is kept ({now_pairs} pairs per step, as before), the random streams are not "
                          f"restored (resume with {was[0]} process(es) to continue it exactly).", UserWarning,
                          stacklevel=3)

    def _start_clean(self) -> None:
        """A new run (not resumed) in an output_dir holding an earlier run's checkpoints would overwrite some of them
        and leave the higher-numbered ones for a later resume=True to continue: refused, naming the ways out, unless
        overwrite_output_dir (which removes them). trl.RewardTrainer accepts it silently; PPOTrainer refuses alike."""
        out = self.args.output_dir
        found = as_main_process_sees_it(self.accelerator, lambda: earlier_checkpoints(out))
        if check_new_run(out, found, self.args.overwrite_output_dir, self.args.resume_from_checkpoint) and self.args.should_save:  # same on every rank
            remove_checkpoints(out)
        self.accelerator.wait_for_everyone()

    def _total_steps(self) -> int:
        """The optimizer steps this run trains in all, as transformers counts them: max_steps, else the epochs'
        (a stream has no length: it needs max_steps)."""
        if self.args.max_steps > 0:
            return int(self.args.max_steps)
        if isinstance(self.train_dataset, IterableDataset):
            raise ValueError("A streaming train_dataset has no length, so num_train_epochs cannot say when the run "
                             "ends: set max_steps (as transformers' Trainer requires for a stream).")
        batches = len(self.get_train_dataloader())
        per_epoch = max(math.ceil(batches / self.args.gradient_accumulation_steps), 1)
        return math.ceil(self.args.num_train_epochs * per_epoch)

    def _finished(self, checkpoint) -> bool:
        """The checkpoint is at (or past) the end of this run: transformers would train one step past max_steps."""
        return read_json(Path(checkpoint) / TRAINER_STATE, RESUME_FIX).get("global_step", 0) >= self._total_steps()

    def _load_finished_run(self, checkpoint) -> TrainOutput:
        """Resuming a run that has finished: its weights and state are loaded and nothing is trained (transformers
        trains one more step and changes the weights); PPOTrainer does the same."""
        self._load_from_checkpoint(checkpoint)
        self.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE))
        if self.is_world_process_zero():
            print(f"Nothing to train: {checkpoint} is at step {self.state.global_step} and this run trains "
                  f"{self._total_steps()} steps (max_steps, or num_train_epochs), so it has finished. Its weights are "
                  f"loaded; set a higher max_steps (or num_train_epochs) to train further.", file=sys.stderr,
                  flush=True)
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint:  # what the finished run ended on
            self._load_best_model()
        self.compute_normalization()
        losses = [h["loss"] for h in self.state.log_history if "loss" in h]
        return TrainOutput(self.state.global_step, losses[-1] if losses else float("nan"), {})

    def _deepspeed_frozen_base(self) -> bool:
        """DeepSpeed trains a model with frozen parameters (LoRA members or heads only on a frozen base)."""
        return self.is_deepspeed_enabled and any(not p.requires_grad for p in self.model.parameters())

    def _save_optimizer_and_scheduler(self, output_dir):
        """Under DeepSpeed with a frozen base, its checkpoint leaves the base out, as transformers leaves it out for a
        PeftModel (`exclude_frozen_parameters`): it tells a PeftModel by its class, and ours is a RewardEnsemble, so
        every checkpoint-N held the whole base again (a 7B base: GBs per checkpoint, where DDP's hold the adapters)."""
        if not self._deepspeed_frozen_base():
            return super()._save_optimizer_and_scheduler(output_dir)
        engine = self.model_wrapped
        engine.save_checkpoint = partial(type(engine).save_checkpoint, engine, exclude_frozen_parameters=True)
        try:
            return super()._save_optimizer_and_scheduler(output_dir)
        finally:
            del engine.save_checkpoint  # the class's method again

    @contextmanager
    def _deepspeed_resumes_non_strict(self):
        """Under DeepSpeed with a frozen base, a resume loads the checkpoint's module state non-strictly, as
        transformers does for a PeftModel: the base is left out of it (`_save_optimizer_and_scheduler`), and a 4-bit
        base's quantisation state (absmax, quant_map…), which a checkpoint from before held, is refused by a strict
        load ("Unexpected key(s)": every QLoRA run under ZeRO-2 failed to resume). The trained weights come back
        from DeepSpeed's fp32 optimizer partitions either way."""
        if not self._deepspeed_frozen_base():
            yield
            return
        import transformers.trainer as hf_trainer

        load = hf_trainer.deepspeed_load_checkpoint

        def non_strict(engine, checkpoint_path, load_module_strict=True):
            return load(engine, checkpoint_path, load_module_strict=False)

        hf_trainer.deepspeed_load_checkpoint = non_strict
        try:
            yield
        finally:
            hf_trainer.deepspeed_load_checkpoint = load

    def _save_checkpoint(self, model, trial) -> None:
        """transformers' checkpoint (the artifact, optimizer, scheduler, scaler, RNG states, trainer_state.json) as
        one atomic folder whose manifest covers every file: transformers writes its files into checkpoint-N in
        place, so a kill left a torn trainer_state.json or optimizer.pt that resuming read into a bare
        JSONDecodeError. Every process writes its files into `checkpoint-N.tmp`; the main one adds the manifest and
        renames it. Best-model tracking, the Hub upload and save_total_limit are transformers'."""
        if self.args.hub_model_id is None:  # trl.RewardTrainer's card in output_dir, as its _save_checkpoint writes
            self.create_model_card(model_name=Path(self.args.output_dir).name)
        else:
            self.create_model_card(model_name=self.args.hub_model_id.split("/")[-1])
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        final = Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        tmp, fix = atomic_tmp(final), checkpoint_fix(final)
        # a failed write (a full disk) removes checkpoint-N.tmp and is one OSError naming the checkpoint, the cause
        # and the intact previous checkpoint; before, torch's "unexpected pos 64 vs 0" left the half folder behind
        with writing_folder(tmp, final, fix):
            if self.args.should_save:
                start_atomic_folder(final)
            self.accelerator.wait_for_everyone()  # the folder is there before any process writes into it
            self.save_model(str(tmp), _internal_call=True)
            self._note_best_checkpoint(run_dir)
            if not self.args.save_only_model:
                self._save_optimizer_and_scheduler(str(tmp))
                self._save_scaler(str(tmp))
                self._save_rng_state(str(tmp))  # every process its own under DDP
            if self.args.should_save:
                save_trainer_state(self, tmp / TRAINER_STATE)
            self.accelerator.wait_for_everyone()  # every process's files are in before the manifest
            if self.args.should_save:
                finish_atomic_folder(tmp, final, fix=fix)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(str(final))
        if self.args.should_save:
            remove_oldest_checkpoints(run_dir, self.state.global_step, self.args.save_total_limit,
                                      keep=self.state.best_model_checkpoint)

    def _load_best_model(self) -> None:
        """load_best_model_at_end: the best checkpoint is an rlhf_ext artifact (adapters + heads), which transformers'
        loader looks for as model.safetensors / adapter_model.* and, not finding, skips with a log line — training
        ended on the last weights. Every process loads it."""
        best = self.state.best_model_checkpoint
        if not best or not Path(best).is_dir():
            warnings.warn(f"load_best_model_at_end: the best checkpoint {best} is not there (save_total_limit "
                          f"removed it?); the model keeps the last step's weights.", stacklevel=2)
            return
        if (finished := getattr(self, "_finished_steps", None)) is not None:
            finished.best_loaded = True  # a save after a failure would label its weights as the last step's
        logger.info(f"Loading best model from {best} (score: {self.state.best_metric}).")
        self._load_from_checkpoint(best)

    def _note_best_checkpoint(self, run_dir) -> None:
        """transformers' best-model bookkeeping: the best step's checkpoint folder, once it exists — this one's
        exists only after the rename, so it is named by its step."""
        best = self.state.best_global_step
        if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and best:
            folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best}")
            if best == self.state.global_step or os.path.exists(folder):
                self.state.best_model_checkpoint = folder

    def artifact_spec(self) -> dict:
        ens = self.accelerator.unwrap_model(self.model)
        return {
            **ens.spec,
            "base_model": base_reference(self.base_model_name) if self.base_model_name else None,
            "base_model_display": self.base_model_name,
            "base_fingerprint": self.fingerprint,
            "base_revision": self.base_revision,
            "ensemble_size": self.args.ensemble_size,
            "lora_config": getattr(self, "lora_config", None),
            "normalization": self.normalization,
            "load_in_4bit": self.quantized,  # how it trained (a flag given with a model object is ignored)
            "four_bit": self.four_bit_layout,
            "dtype": "float32" if self.quantized else self.trunk_dtype,
            "conversational": self.is_conversational,
            "tags": list(ens.model_tags),
            "training": {"length_decorrelation_coef": self.args.length_decorrelation_coef,
                         "bootstrap": self.args.bootstrap, "seed": self.args.seed,
                         # what trained (max_steps overrides num_train_epochs, as in transformers)
                         "epochs": self.state.epoch if self.state.global_step else self.args.num_train_epochs,
                         "steps": self.state.global_step, "learning_rate": self.args.learning_rate,
                         "head_init": self.head_init},
        }

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Write the artifact (adapters + heads + normalisation + tokenizer + card + manifest). No pickles: the
        training arguments go to training_args.json."""
        self._write_artifact(Path(output_dir or self.args.output_dir))
        if self.args.push_to_hub and not _internal_call:  # as Trainer.save_model does
            self.push_to_hub(commit_message="Model save")

    def create_model_card(self, model_name: str | None = None, dataset_name=None, tags=None, **kwargs) -> None:
        """The reward model's card (what save_model() writes) at output_dir/README.md. trl.RewardTrainer's own card
        says `library_name: transformers` and loads the repo with `pipeline(...)`, which an ensemble artifact (no
        config.json) does not load."""
        if not self.is_world_process_zero():
            return
        meta = card_metadata({"model_name": model_name, "dataset_name": dataset_name, "tags": tags, **kwargs},
                             "RewardEnsembleTrainer", "create_model_card")
        out = Path(self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "README.md").write_text(self._card(self.artifact_spec(), meta))

    def _card(self, spec: dict, meta: dict | None) -> str:
        """The artifact's model card: `_reward_card` with `meta`'s metadata (`hub.with_card_metadata`)."""
        return with_card_metadata(_reward_card(spec, self.state.log_history), meta or {})

    def _write_artifact(self, out: Path, card: dict | None = None) -> None:
        """`save_model`'s files at `out`, the card with `card`'s metadata (`hub.with_card_metadata`)."""
        if self.normalization is None:  # on every process: preparing the reference set synchronises them
            self.compute_normalization()  # (a mid-training checkpoint under DDP deadlocked when only rank 0 did)
        if not self.args.should_save:
            return
        spec = self.artifact_spec()
        save_reward_artifact(out, self.accelerator.unwrap_model(self.model), spec, self.processing_class,
                             card=self._card(spec, card))
        (out / "training_args.json").write_text(self.args.to_json_string())

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Trainer's upload at a checkpoint copies transformers' file names (config.json, model.safetensors), none of
        which an ensemble artifact has: upload the artifact itself, and the checkpoint folder as hub_strategy says."""
        if self.is_world_process_zero():
            label = (f"step {self.state.global_step}" if self.args.save_strategy == "steps"
                     else f"epoch {int(self.state.epoch or 0)}")
            push_checkpoint(self.args, checkpoint_folder, default_repo_id(self.args), self.push_to_hub, label)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        reach_repo_or_explain(lambda: super(RewardEnsembleTrainer, self).init_hf_repo(token, private), self.args,
                              "RewardEnsembleTrainer")

    def push_to_hub(self, commit_message: str | None = "Upload reward ensemble with rlhf_ext", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, repo_id: str | None = None, **kwargs) -> str:
        """Upload the artifact (what `save_model` writes) to `repo_id` (default: `args.hub_model_id`);
        `load_reward_model(repo_id)` loads it back. Other keywords are the model card's, as in `Trainer`
        (`tags`, `dataset_name`, `license`, `language`, `model_name`, `finetuned_from`). The upload always completes
        before it returns (`blocking=False` is taken, as Trainer's signature has it, and changes nothing)."""
        import tempfile

        repo_id = repo_id_for_push(self.args, repo_id, commit_message, "RewardEnsembleTrainer")
        card = card_metadata(kwargs, "RewardEnsembleTrainer")
        with tempfile.TemporaryDirectory() as tmp:
            self._write_artifact(Path(tmp) / "artifact", card)  # every process: the normalisation is in step
            if not self.is_world_process_zero():
                return ""
            return push_folder(Path(tmp) / "artifact", repo_id,
                               private=self.args.hub_private_repo, token=token or self.args.hub_token,
                               revision=revision or self.args.hub_revision,  # as Trainer.push_to_hub
                               commit_message=commit_message or "Upload reward ensemble with rlhf_ext")

    def _init_from(self, path) -> None:
        """`init_reward_model`: start from a saved reward model's adapters and heads, refused (naming the
        difference) unless its base, members and LoRA settings are this trainer's."""
        from .artifact import read_spec

        key, theirs, ours = self._spec_difference(read_spec(Path(path)))
        if key:
            raise ValueError(
                f"init_reward_model: {path} has {key} = {theirs!r}, this trainer {ours!r}. Start from a reward model "
                f"trained with the same base model, ensemble_size/ensemble_mode and LoRA settings, or leave "
                f"init_reward_model unset to train from scratch.")
        self._initialising = True  # weights only: an earlier format's artifact is fine here
        try:
            self._load_from_checkpoint(str(path))
        finally:
            self._initialising = False
        self.normalization = None  # recomputed after training, on the new weights

    def _spec_difference(self, spec: dict):
        """The first of what shapes the weights (mode, members, adapters, LoRA settings, base) where a saved `spec`
        differs from this trainer's: (key, theirs, ours), or (None, None, None)."""
        mine = json.loads(json.dumps(self.artifact_spec(), default=str))
        for key in ("mode", "members", "adapters", "lora_config"):
            if spec.get(key) != mine.get(key):
                return key, spec.get(key), mine.get(key)
        if spec.get("base_fingerprint") is None:  # written before the fingerprint was recorded (format 1): compare
            from .artifact import same_base      # the base by its recorded reference, as load_reward_model does
            model = self.accelerator.unwrap_model(self.model).model
            if not same_base(spec, model, mine.get("base_model")):
                return "base_model", spec.get("base_model"), mine.get("base_model")
        elif spec["base_fingerprint"] != mine.get("base_fingerprint"):
            return "base_fingerprint", spec["base_fingerprint"], mine.get("base_fingerprint")
        return None, None, None

    def _checked_spec(self, path: Path, verified: bool = False) -> dict:
        """The checkpoint's spec, verified by its manifest (unless the caller just did: `verified`) and refused
        (naming the setting) where what shapes the weights differs from this trainer's."""
        from ..integrity import verify_manifest
        from .artifact import read_spec

        spec = read_spec(path)
        if spec.get("format_version", 0) < 2 and not getattr(self, "_initialising", False):
            raise ValueError(f"{path} was written by rlhf_ext 0.1 (format {spec.get('format_version', 0)}), whose "
                             f"training this version does not continue step for step. Start from its weights "
                             f"instead: init_reward_model={str(path)!r} (a new run, in another output_dir or with "
                             f"overwrite_output_dir=True; the optimizer starts afresh).")
        if not verified:
            verify_manifest(path, "Resume from an earlier checkpoint-N folder.", required=("heads.safetensors",))
        key, theirs, ours = self._spec_difference(spec)
        if key:  # torch would say "size mismatch" or "Missing key(s)", naming neither the folder nor the setting
            raise ValueError(f"{path} was saved with {key} = {theirs!r}; this trainer has {ours!r}. Resume with the "
                             f"settings it was trained with (ensemble_size, ensemble_mode, LoRA settings, base model), "
                             f"or start a new run in another output_dir.")
        return spec

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Trainer's resume, for our artifact-shaped checkpoints (adapters + heads, verified by the manifest)."""
        from peft import set_peft_model_state_dict

        from ..integrity import load_safetensors
        from .artifact import _REBUILD, trunk_key_prefix

        ens, path = self.accelerator.unwrap_model(self.model), Path(resume_from_checkpoint)
        spec = self._checked_spec(path)
        heads = load_safetensors(path / "heads.safetensors", _REBUILD + ".")
        for a, head in ens.heads.items():
            head.load_state_dict({k[len(a) + 1 :]: v for k, v in heads.items() if k.startswith(a + ".")})
        if spec["mode"] == "full":
            trunk = trunk_of(ens.model)
            trunk.load_state_dict(load_safetensors(path / "trunk" / "model.safetensors", _REBUILD + "."))
        else:
            prefix = trunk_key_prefix(ens.model)
            for a in ens.adapters:
                state = load_safetensors(path / "adapters" / f"{a}.safetensors", _REBUILD + ".")
                set_peft_model_state_dict(ens.model, {prefix + k: v for k, v in state.items()}, adapter_name=a)
        self._set_trainable(ens)


def _reward_card(spec: dict, history: list[dict]) -> str:
    from ..hub import framework_versions, yaml_value

    # transformers' card leaves the speed figures out of its results (parse_log_history): they describe the machine
    speed = ("_runtime", "_samples_per_second", "_steps_per_second", "_num_tokens")
    evals = {k: v for h in history for k, v in h.items() if k.startswith("eval_") and not k.endswith(speed)}
    step = max((h.get("step", 0) for h in history if any(k.startswith("eval_") for k in h)), default=None)
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(evals.items()) if isinstance(v, (int, float)))
    tags = list(dict.fromkeys(["rlhf_ext", "reward-model", "trl", *spec.get("tags", [])]))  # + the trainers' tags
    base = card_base_model(spec.get("base_model"))
    usage = ('prompts = [[{"role": "user", "content": "Write a short review."}]]  # chat messages, as it trained\n'
             'completions = [[{"role": "assistant", "content": "It was great."}]]\n'
             if spec.get("conversational") else
             'prompts, completions = ["Write a short review. "], ["It was great."]  # plain text, as it trained\n')
    return ("---\nlibrary_name: rlhf_ext\n" + (f"base_model: {yaml_value(base)}\n" if base else "") +  # Hub ids only
            f"tags: {yaml_value(tags)}\n---\n\n# Reward ensemble trained with rlhf_ext\n\n"
            f"K = {spec['ensemble_size']} members, mode `{spec['mode']}`, pooling `{spec.get('pooling', 'last')}`, "
            f"length de-correlation {spec['training']['length_decorrelation_coef']}.\n\n"
            "```python\nfrom rlhf_ext import load_reward_model\nrm = load_reward_model(\"<this folder or repo id>\")\n"
            + usage +
            "scores = rm.score_texts(prompts, completions, normalize=True)  # [N, K]\n```\n\n"
            + (f"Evaluation (step {step}):\n\n| metric | value |\n|---|---|\n{metrics}\n" if metrics else "")
            + framework_versions())
