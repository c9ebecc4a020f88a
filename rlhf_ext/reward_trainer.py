"""Bradley–Terry reward modelling with cheap ensembles, on top of `trl.RewardTrainer`."""

from __future__ import annotations

import math
import types
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from trl import RewardTrainer
from trl.data_utils import is_conversational
from trl.trainer.reward_trainer import DataCollatorForPreference

from .models import ensure_pad_token, load_model, load_tokenizer, trunk_of
from .reward_config import RewardEnsembleConfig
from .reward_model import POOLING, message_text, save_reward_artifact
from .rl_math import bt_loss, pearson
from .split_trunk import PrefixCache, frozen_prefix_split, restrict_to_top_layers


# ------------------------------------------------------------------------------------------- data checks
def validate_preference_dataset(dataset, name: str = "train_dataset") -> None:
    """Fail early, naming the row and the fix, instead of deep inside tokenisation."""
    cols = set(dataset.column_names)
    if {"chosen_ids", "rejected_ids"} <= cols:
        return
    missing = {"chosen", "rejected"} - cols
    if missing:
        raise ValueError(
            f"{name} is missing column(s) {sorted(missing)}; it has {sorted(cols)}. Reward modelling needs TRL's "
            f"preference format: 'chosen' and 'rejected' (and optionally 'prompt', 'margin')."
        )
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty.")
    for i, row in enumerate(dataset):
        for col in ("chosen", "rejected"):
            v = row[col]
            text = message_text(v)
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{name} row {i}: '{col}' is empty. Remove the row or fill in the response.")
        if "margin" in row and (row["margin"] is None or not math.isfinite(float(row["margin"]))):
            raise ValueError(f"{name} row {i}: margin {row['margin']!r} is not a finite number. Fix or drop the row.")


@dataclass
class EnsemblePreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator + the pair index (for bootstrap weights) and response lengths."""

    def torch_call(self, examples):
        out = super().torch_call(examples)
        if "pair_id" in examples[0]:
            out["pair_id"] = torch.tensor([e["pair_id"] for e in examples])
        # response length = tokens after the prefix chosen and rejected share (their prompt)
        lens = []
        for e in examples:
            c, r = e["chosen_ids"], e["rejected_ids"]
            n = 0
            while n < min(len(c), len(r)) and c[n] == r[n]:
                n += 1
            lens.append((len(c) - n, len(r) - n))
        out["response_length"] = torch.tensor([a for a, _ in lens] + [b for _, b in lens], dtype=torch.float)
        return out


def _masked_pool_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
    """Sequence-classification forward that pools by attention mask (`last` attended token, or `mean`), never by
    the last non-pad id: with pad == EOS (SmolLM2) the id-based pooling of transformers skips the final EOS."""
    for k in ("labels", "return_dict", "output_attentions", "output_hidden_states"):
        kwargs.pop(k, None)
    if attention_mask is None:
        ref = input_ids if input_ids is not None else inputs_embeds[..., 0]
        attention_mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
    cache = getattr(self, "_prefix_cache", None)
    if cache is not None and inputs_embeds is None:  # frozen lower layers: computed once per text
        hidden = cache(input_ids, attention_mask)
    else:
        hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                 **kwargs).last_hidden_state
    return SequenceClassifierOutputWithPast(logits=self.score(POOLING[self._reward_pooling](hidden, attention_mask)))


def _head_std(model) -> float:
    # Small enough that K random heads start near 0 (large trunk activations would otherwise give each member a
    # big random offset to unlearn), large enough that members start different.
    cfg = model.config
    return cfg.initializer_range / cfg.hidden_size**0.5


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


class RewardEnsembleTrainer(RewardTrainer):
    """`trl.RewardTrainer` that trains K Bradley–Terry members in one run and saves one loadable artifact.

    Call shape is TRL's: `RewardEnsembleTrainer(model, args=RewardEnsembleConfig(...), train_dataset=...,
    eval_dataset=..., processing_class=..., peft_config=...)`. `model` may be a hub id, a local folder, a
    `.gguf` file, the embedded default name, or an instantiated `AutoModelForSequenceClassification`.
    """

    _tag_names = ["trl", "reward-trainer", "rlhf_ext"]

    def __init__(self, model, args: RewardEnsembleConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, peft_config=None, quantization_config=None,
                 load_in_4bit: bool = False, **kwargs):
        if args is None:
            args = RewardEnsembleConfig("reward-ensemble")
        elif not isinstance(args, RewardEnsembleConfig):
            raise TypeError("`args` must be a RewardEnsembleConfig (a subclass of trl.RewardConfig).")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required (TRL preference format: chosen/rejected[/prompt]).")
        validate_preference_dataset(train_dataset)
        if eval_dataset is not None and not isinstance(eval_dataset, dict):
            validate_preference_dataset(eval_dataset, "eval_dataset")
        K, mode = args.ensemble_size, args.ensemble_mode
        if mode == "adapters" and K > 1 and peft_config is None:
            raise ValueError(
                "ensemble_mode='adapters' trains K LoRA adapters on one frozen base and needs a LoRA config: pass "
                "`peft_config=LoraConfig(...)` (recipes: `use_peft: true`), or use ensemble_mode='heads'."
            )

        # Model: a sequence classifier whose head has K outputs and pools by attention mask
        torch.manual_seed(args.seed)
        self.base_model_name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None)
        self.load_in_4bit = load_in_4bit or quantization_config is not None
        if isinstance(model, str):
            init = dict(args.model_init_kwargs or {})
            init.setdefault("trust_remote_code", args.trust_remote_code)
            if quantization_config is not None:
                init["quantization_config"] = quantization_config
            if processing_class is None:
                processing_class = load_tokenizer(model, trust_remote_code=args.trust_remote_code)
            model = load_model(model, "seq_cls", num_labels=1, load_in_4bit=load_in_4bit and quantization_config is None,
                               **init)
        if processing_class is None:
            processing_class = load_tokenizer(self.base_model_name)
        ensure_pad_token(processing_class)
        model.config.pad_token_id = processing_class.pad_token_id
        hidden = model.score.in_features
        if K > 1 and mode == "heads":
            model.score = nn.Linear(hidden, K, bias=False, dtype=model.score.weight.dtype,
                                    device=model.score.weight.device)
            model.score.weight.data.normal_(0.0, _head_std(model))  # rows differ: members differ
        model._reward_pooling = args.pooling
        model.forward = types.MethodType(_masked_pool_forward, model)

        self.member_adapters: list[str] = []
        if peft_config is not None:
            model = self._wrap_peft(model, peft_config, args)
            peft_config = None  # already applied

        # Per-member bootstrap weights over training pairs (Poisson(1) ≈ resampling with replacement)
        n_members = K
        if "pair_id" not in train_dataset.column_names:
            train_dataset = train_dataset.add_column("pair_id", list(range(len(train_dataset))))
        g = torch.Generator().manual_seed(args.seed + 1)
        if K > 1 and args.bootstrap:
            self.bootstrap_weights = torch.poisson(torch.ones(n_members, len(train_dataset)), generator=g)
        else:
            self.bootstrap_weights = torch.ones(n_members, len(train_dataset))

        if data_collator is None:
            pad_id = processing_class.pad_token_id
            data_collator = EnsemblePreferenceCollator(pad_token_id=pad_id, pad_to_multiple_of=args.pad_to_multiple_of)
        self._raw_reference = eval_dataset if eval_dataset is not None and not isinstance(eval_dataset, dict) else train_dataset
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, peft_config=None, **kwargs)
        if self.member_adapters:
            self._mark_members_trainable()
        if self.load_in_4bit:  # TRL casts QLoRA adapters to bf16; our heads pool fp32 hidden states, keep fp32
            for p in self.model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        self.prefix_cache = self._build_prefix_cache() if args.cache_frozen_layers else None
        self._eval_buffer = defaultdict(list)
        self.normalization: dict | None = None
        self.is_conversational = is_conversational(next(iter(train_dataset)))

    # -- model setup -----------------------------------------------------------------------------------------
    def _wrap_peft(self, model, peft_config, args):
        from peft import get_peft_model

        peft_config.task_type = "SEQ_CLS"  # puts `score` in modules_to_save: each adapter owns its head
        restrict_to_top_layers(peft_config, model, args.lora_top_layers)
        self.lora_config = {k: v for k, v in peft_config.to_dict().items()
                            if k in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora",
                                     "use_dora", "fan_in_fan_out", "init_lora_weights", "layers_to_transform",
                                     "layers_pattern")}
        if isinstance(self.lora_config.get("target_modules"), set):
            self.lora_config["target_modules"] = sorted(self.lora_config["target_modules"])
        names = ["reward"] if args.ensemble_mode == "heads" or args.ensemble_size == 1 else [
            f"reward_{k}" for k in range(args.ensemble_size)]
        for k, name in enumerate(names):
            torch.manual_seed(args.seed + 1000 * k)  # different LoRA-A init per member
            if k == 0:
                model = get_peft_model(model, peft_config, adapter_name=name)
            else:
                model.add_adapter(name, peft_config)
            head = model.get_base_model().score.modules_to_save[name]
            head.weight.data.normal_(0.0, _head_std(model))  # each member its own head init
        self.member_adapters = names
        return model

    def _build_prefix_cache(self):
        if not self.member_adapters:
            warnings.warn("cache_frozen_layers needs LoRA on the top layers only (`lora_top_layers`); it is off.")
            return None
        split = frozen_prefix_split(self.model, self.member_adapters, warn_unlayered=True)
        self._mark_members_trainable()  # leaving disable_adapter() re-freezes the inactive members
        if split is None:
            return None
        hf = self.model.get_base_model()
        hf._prefix_cache = PrefixCache(split)  # read by the patched forward
        return hf._prefix_cache

    def _mark_members_trainable(self):
        for n, p in self.model.named_parameters():
            if any(f".{a}." in n for a in self.member_adapters) and ("lora_" in n or "modules_to_save" in n):
                p.requires_grad_(True)

    def _member_rewards(self, model, inputs) -> torch.Tensor:
        """[2B, K] rewards (chosen rows first). Adapter members run one forward each."""
        kw = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        if len(self.member_adapters) <= 1:
            return model(**kw).logits.float()
        peft = self.accelerator.unwrap_model(model)
        out = []
        for a in self.member_adapters:
            peft.base_model.set_adapter(a)
            self._mark_members_trainable()  # set_adapter freezes the others; the optimizer owns all of them
            out.append(model(**kw).logits.float())
        return torch.cat(out, -1)

    # -- loss ------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        rewards = self._member_rewards(model, inputs)  # [2B, K]
        r_chosen, r_rejected = rewards.chunk(2)  # [B, K] each
        margin = inputs.get("margin")
        per_pair = bt_loss(r_chosen, r_rejected, None if margin is None else margin.unsqueeze(-1))  # [B, K]
        if mode == "train" and "pair_id" in inputs:
            w = self.bootstrap_weights[:, inputs["pair_id"].cpu()].T.to(per_pair)  # [B, K]
        else:
            w = torch.ones_like(per_pair)
        loss = ((per_pair * w).sum(0) / w.sum(0).clamp(min=1e-6)).mean()  # mean over members of BT loss
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * (rewards**2).mean()
        lengths = inputs["response_length"].to(rewards)
        corr = torch.stack([pearson(rewards[:, k], lengths) for k in range(rewards.shape[1])])
        if self.args.length_decorrelation_coef > 0:
            loss = loss + self.args.length_decorrelation_coef * corr.abs().mean()  # ODIN-style de-correlation

        with torch.no_grad():
            gather = self.accelerator.gather_for_metrics
            delta = (r_chosen - r_rejected).detach()
            m = self._metrics[mode]
            m["accuracy"].append(gather((delta.mean(-1) > 0).float().mean()).mean().item())
            m["margin"].append(gather(delta.mean()).mean().item())
            m["mean_reward"].append(gather(rewards.detach().mean()).mean().item())
            m["length_corr"].append(gather(corr.detach().mean()).mean().item())
            if rewards.shape[1] > 1:
                m["ensemble_std"].append(gather(rewards.detach().std(-1).mean()).mean().item())
            if mode == "eval":  # whole-set metrics (ECE, Pearson) are computed in `log`
                b = self._eval_buffer
                b["delta"].append(gather(delta).cpu())
                b["rewards"].append(gather(rewards.detach()).cpu())
                b["lengths"].append(gather(lengths).cpu())
        return (loss, rewards) if return_outputs else loss

    def log(self, logs, start_time=None):
        if self._eval_buffer and not self.model.training and self._eval_buffer.get("delta"):
            logs.update({f"eval_{k}": v for k, v in self._eval_summary().items()})
            self._eval_buffer.clear()
        super().log(logs, start_time)

    def _eval_summary(self) -> dict:
        b = {k: torch.cat(v) for k, v in self._eval_buffer.items()}
        delta, rewards, lengths = b["delta"], b["rewards"], b["lengths"]  # [N, K], [2N, K], [2N]
        out = {"accuracy_ensemble": (delta.mean(-1) > 0).float().mean().item(),
               "ece": _expected_calibration_error(torch.sigmoid(delta.mean(-1))),
               "length_pearson": pearson(rewards.mean(-1), lengths).item()}
        for k in range(delta.shape[1]):
            out[f"accuracy_member_{k}"] = (delta[:, k] > 0).float().mean().item()
        if delta.shape[1] > 1:
            out["ensemble_disagreement"] = rewards.std(-1).mean().item()
        return out

    # -- normalisation + artifact ----------------------------------------------------------------------------
    @torch.no_grad()
    def compute_normalization(self, dataset=None, max_pairs: int | None = None) -> dict:
        """Per-member mean/std of rewards on a reference set (chosen and rejected responses)."""
        dataset = self._prepare_dataset(dataset if dataset is not None else self._raw_reference,
                                        self.processing_class, self.args, "reference")
        n = min(len(dataset), max_pairs or self.args.normalization_samples)
        model = self.model
        model.eval()
        chunks = []
        bs = self.args.per_device_eval_batch_size
        cols = [c for c in dataset.column_names if c in ("chosen_ids", "rejected_ids")]
        rows = dataset.select(range(n)).select_columns(cols)
        for i in range(0, n, bs):
            batch = self.data_collator([rows[j] for j in range(i, min(n, i + bs))])
            batch = {k: v.to(self.args.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            chunks.append(self._member_rewards(model, batch).cpu())
        r = torch.cat(chunks)
        self.normalization = {"mean": r.mean(0).tolist(), "std": r.std(0).clamp(min=1e-6).tolist(), "n": int(r.shape[0])}
        return self.normalization

    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        self.compute_normalization()
        return out

    def artifact_spec(self) -> dict:
        K, mode = self.args.ensemble_size, self.args.ensemble_mode
        peft = bool(self.member_adapters)
        return {
            "base_model": self.base_model_name,
            "mode": ("heads" if mode == "heads" or K == 1 else "adapters") if peft else "full",
            "ensemble_size": K,
            "members": [f"member_{k}" for k in range(K)],
            "adapters": list(self.member_adapters) if peft else ["full"],
            "lora_config": getattr(self, "lora_config", None),
            "normalization": self.normalization,
            "load_in_4bit": bool(self.load_in_4bit),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", "") if not self.load_in_4bit else "float32",
            "conversational": self.is_conversational,
            "max_length": self.args.max_length,
            "pooling": self.args.pooling,
            "training": {"length_decorrelation_coef": self.args.length_decorrelation_coef,
                         "bootstrap": self.args.bootstrap, "seed": self.args.seed},
        }

    def export_artifact(self, output_dir: str) -> None:
        from peft import get_peft_model_state_dict

        model = self.accelerator.unwrap_model(self.model)
        heads, adapters, trunk = {}, {}, None
        if self.member_adapters:
            from .reward_model import trunk_key_prefix

            prefix = trunk_key_prefix(model)
            score = model.get_base_model().score
            for a in self.member_adapters:
                sd = get_peft_model_state_dict(model, adapter_name=a)
                adapters[a] = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and "lora_" in k}
                head = score.modules_to_save[a]
                heads[a] = {"weight": head.weight} | ({"bias": head.bias} if head.bias is not None else {})
        else:
            trunk = trunk_of(model)
            heads["full"] = {"weight": model.score.weight} | ({"bias": model.score.bias} if model.score.bias is not None else {})
        save_reward_artifact(output_dir, self.artifact_spec(), heads, adapters, self.processing_class, trunk)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            # Trainer pickles the arguments to training_args.bin; keep the folder pickle-free (JSON instead)
            out = Path(output_dir or self.args.output_dir)
            (out / "training_args.bin").unlink(missing_ok=True)
            (out / "training_args.json").write_text(self.args.to_json_string())
            if self.normalization is None:
                self.compute_normalization()
            self.export_artifact(output_dir or self.args.output_dir)
