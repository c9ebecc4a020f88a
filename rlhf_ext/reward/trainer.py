"""Bradley–Terry reward modelling with cheap ensembles, on top of `trl.RewardTrainer`.

The trainer's model is a `RewardEnsemble` (trunk → pool → heads): the same module, and so the same scoring path,
that PPO and everything else use after training. TRL's RewardTrainer keeps doing what it does well (data
preparation, collation, the Trainer loop, logging); the loss is ours: Bradley–Terry per member with bootstrap
weights, plus an optional length de-correlation penalty.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback
from trl import RewardTrainer
from trl.data_utils import is_conversational
from trl.trainer.reward_trainer import DataCollatorForPreference

from ..adapters import check_gradients_reached, first_step_grad_params, set_trainable, zero_dropout
from ..data import message_text
from ..models import base_reference, ensure_pad_token, is_quantized, load_model, load_tokenizer, model_fingerprint, trunk_of
from ..prefix_cache import PrefixCache, frozen_prefix_split, restrict_to_top_layers
from ..rl_math import bt_loss, pearson
from .artifact import save_reward_artifact
from .config import RewardEnsembleConfig
from .ensemble import RewardEnsemble


# ------------------------------------------------------------------------------------------- data checks
def validate_preference_dataset(dataset, name: str = "train_dataset"):
    """Fail early, naming the row and the fix, instead of deep inside tokenisation. Pairs whose chosen and
    rejected responses are identical carry no preference (the loss is log 2 whatever the model does): they are
    dropped with a counted warning. Returns the dataset to train on."""
    cols = set(dataset.column_names)
    if {"chosen_ids", "rejected_ids"} <= cols:
        return dataset
    missing = {"chosen", "rejected"} - cols
    if missing:
        raise ValueError(
            f"{name} is missing column(s) {sorted(missing)}; it has {sorted(cols)}. Reward modelling needs TRL's "
            f"preference format: 'chosen' and 'rejected' (and optionally 'prompt', 'margin')."
        )
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty.")
    ties = []
    for i, row in enumerate(dataset):
        for col in ("chosen", "rejected"):
            text = message_text(row[col])
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{name} row {i}: '{col}' is empty. Remove the row or fill in the response.")
        if "margin" in row and (row["margin"] is None or not math.isfinite(float(row["margin"]))):
            raise ValueError(f"{name} row {i}: margin {row['margin']!r} is not a finite number. Fix or drop the row.")
        if row["chosen"] == row["rejected"]:
            ties.append(i)
    if ties:
        if len(ties) == len(dataset):
            raise ValueError(f"Every pair of {name} has chosen == rejected: there is no preference to learn.")
        warnings.warn(f"{name}: dropped {len(ties)} pair(s) whose chosen and rejected responses are identical (first: "
                      f"row {ties[0]}); they carry no preference.", stacklevel=3)
        keep = sorted(set(range(len(dataset))) - set(ties))
        dataset = dataset.select(keep)
    return dataset


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


class _GradientReachCheck(TrainerCallback):
    """At the first optimizer step: every member's LoRA-B matrix and head got gradient, or stop with the cause."""

    def __init__(self, params, quantized):
        self.params, self.quantized, self.done = params, quantized, False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.done:
            self.done = True
            check_gradients_reached(self.params, "RewardEnsembleTrainer", self.quantized)


class RewardEnsembleTrainer(RewardTrainer):
    """`trl.RewardTrainer` that trains K Bradley–Terry members in one run and saves one loadable artifact.

    Call shape is TRL's: `RewardEnsembleTrainer(model, args=RewardEnsembleConfig(...), train_dataset=...,
    eval_dataset=..., processing_class=..., peft_config=...)`. `model` may be a hub id, a local folder, a
    `.gguf` file, the embedded default name, or an instantiated transformers model (its trunk is used).
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
        train_dataset = validate_preference_dataset(train_dataset)
        if eval_dataset is not None and not isinstance(eval_dataset, dict):
            eval_dataset = validate_preference_dataset(eval_dataset, "eval_dataset")
        K, mode = args.ensemble_size, args.ensemble_mode
        if mode == "adapters" and K > 1 and peft_config is None:
            raise ValueError(
                "ensemble_mode='adapters' trains K LoRA adapters on one frozen base and needs a LoRA config: pass "
                "`peft_config=LoraConfig(...)` (recipes: `use_peft: true`), or use ensemble_mode='heads'."
            )

        # Trunk (the transformer body, no LM head) of the base model
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
            trunk = load_model(model, "trunk", load_in_4bit=load_in_4bit and quantization_config is None, **init)
        else:
            trunk = trunk_of(model)
        if processing_class is None:
            processing_class = load_tokenizer(self.base_model_name)
        ensure_pad_token(processing_class)
        trunk.config.num_labels = 1  # TRL's reward-model check; our heads carry the K outputs
        self.fingerprint = model_fingerprint(trunk)

        # Members: adapters (or the full trunk) + their score heads, as one RewardEnsemble
        if peft_config is not None:
            trunk = self._wrap_peft(trunk, peft_config, args)
            adapter_names = list(trunk.peft_config)
            ens_mode = "heads" if mode == "heads" or K == 1 else "adapters"
        else:
            adapter_names, ens_mode = ["full"], "full"
        if args.disable_dropout:  # TRL's flag; TRL zeroes nn.Dropout only, not functional attention dropout
            zero_dropout(trunk)
        hidden, std = trunk.config.hidden_size, _head_std(trunk.config)
        device = next(trunk.parameters()).device
        heads = nn.ModuleDict()
        for k, a in enumerate(adapter_names):
            torch.manual_seed(args.seed + 2000 + k)  # each member its own head init
            heads[a] = nn.Linear(hidden, K if ens_mode != "adapters" else 1, bias=False, device=device)
            nn.init.normal_(heads[a].weight, 0.0, std)
        spec = {"mode": ens_mode, "adapters": adapter_names, "members": [f"member_{k}" for k in range(K)],
                "pooling": args.pooling, "max_length": args.max_length}
        ens = RewardEnsemble(trunk, processing_class, spec, heads)
        self.member_adapters = adapter_names if ens_mode != "full" else []
        self._set_trainable(ens)

        # Per-member bootstrap weights over training pairs (Poisson(1) ≈ resampling with replacement)
        if "pair_id" not in train_dataset.column_names:
            train_dataset = train_dataset.add_column("pair_id", list(range(len(train_dataset))))
        g = torch.Generator().manual_seed(args.seed + 1)
        if K > 1 and args.bootstrap:
            self.bootstrap_weights = torch.poisson(torch.ones(K, len(train_dataset)), generator=g)
        else:
            self.bootstrap_weights = torch.ones(K, len(train_dataset))

        if data_collator is None:
            data_collator = EnsemblePreferenceCollator(pad_token_id=processing_class.pad_token_id,
                                                       pad_to_multiple_of=args.pad_to_multiple_of)
        self._raw_reference = eval_dataset if eval_dataset is not None and not isinstance(eval_dataset, dict) else train_dataset
        check = _GradientReachCheck(self._reach_params(ens), is_quantized(trunk))
        super().__init__(model=ens, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, peft_config=None,
                         callbacks=[*(kwargs.pop("callbacks", None) or []), check], **kwargs)
        self.prefix_cache = self._build_prefix_cache(ens) if args.cache_frozen_layers else None
        self._eval_buffer = defaultdict(list)
        self.normalization: dict | None = None
        self.is_conversational = is_conversational(next(iter(train_dataset)))

    # -- model setup -----------------------------------------------------------------------------------------
    def _wrap_peft(self, trunk, peft_config, args):
        from peft import get_peft_model

        peft_config.task_type = None  # a bare trunk: our heads, not PEFT's modules_to_save, score
        restrict_to_top_layers(peft_config, trunk, args.lora_top_layers)
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
                trunk = get_peft_model(trunk, peft_config, adapter_name=name)
            else:
                trunk.add_adapter(name, peft_config)
        return trunk

    def _set_trainable(self, ens):
        if self.member_adapters:
            set_trainable(ens.model, self.member_adapters)
            if is_quantized(ens.model):  # keep LoRA math in fp32 on a 4-bit base (TRL would cast to bf16)
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

    def _set_signature_columns_if_needed(self):
        # TRL keeps only chosen_ids/rejected_ids/margin; without pair_id the bootstrap weights would never apply
        # (every member would see the same data).
        super()._set_signature_columns_if_needed()
        if "pair_id" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "pair_id"]

    # -- loss ------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        rewards = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).float()  # [2B, K]
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
        ens = self.accelerator.unwrap_model(self.model)
        chunks = []
        bs = self.args.per_device_eval_batch_size
        cols = [c for c in dataset.column_names if c in ("chosen_ids", "rejected_ids")]
        rows = dataset.select(range(n)).select_columns(cols)
        steps = tqdm(range(0, n, bs), desc="Reward normalisation", leave=False,
                     disable=self.args.disable_tqdm or not self.is_world_process_zero())
        for i in steps:  # K trunk passes per pair for adapter ensembles: minutes on a CPU, so a progress bar
            batch = self.data_collator([rows[j] for j in range(i, min(n, i + bs))])
            chunks.append(ens.score_ids(batch["input_ids"].to(self.args.device),
                                        batch["attention_mask"].to(self.args.device)).cpu())
        r = torch.cat(chunks)
        self.normalization = {"mean": r.mean(0).tolist(), "std": r.std(0).clamp(min=1e-6).tolist(), "n": int(r.shape[0])}
        ens.mean.copy_(torch.tensor(self.normalization["mean"]))
        ens.std.copy_(torch.tensor(self.normalization["std"]))
        return self.normalization

    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        self.compute_normalization()
        return out

    def artifact_spec(self) -> dict:
        ens = self.accelerator.unwrap_model(self.model)
        trunk = trunk_of(ens.model)
        return {
            **ens.spec,
            "base_model": base_reference(self.base_model_name) if self.base_model_name else None,
            "base_model_display": self.base_model_name,
            "base_fingerprint": self.fingerprint,
            "ensemble_size": self.args.ensemble_size,
            "lora_config": getattr(self, "lora_config", None),
            "normalization": self.normalization,
            "load_in_4bit": bool(self.load_in_4bit),
            "dtype": "float32" if self.load_in_4bit else str(next(trunk.parameters()).dtype).replace("torch.", ""),
            "conversational": self.is_conversational,
            "training": {"length_decorrelation_coef": self.args.length_decorrelation_coef,
                         "bootstrap": self.args.bootstrap, "seed": self.args.seed,
                         "epochs": self.args.num_train_epochs, "learning_rate": self.args.learning_rate},
        }

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Write the artifact (adapters + heads + normalisation + tokenizer + card + manifest). No pickles: the
        training arguments go to training_args.json."""
        if not self.args.should_save:
            return
        out = Path(output_dir or self.args.output_dir)
        if self.normalization is None:
            self.compute_normalization()
        spec = self.artifact_spec()
        save_reward_artifact(out, self.accelerator.unwrap_model(self.model), spec, self.processing_class,
                             card=_reward_card(spec, self.state.log_history))
        (out / "training_args.json").write_text(self.args.to_json_string())

    def push_to_hub(self, commit_message: str | None = "Upload reward ensemble with rlhf_ext", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, repo_id: str | None = None, **kwargs) -> str:
        """Upload the artifact (what `save_model` writes) to `repo_id` (default: `args.hub_model_id`);
        `load_reward_model(repo_id)` loads it back."""
        import tempfile

        from ..hub import push_folder

        repo_id = repo_id or self.args.hub_model_id or Path(self.args.output_dir).name
        with tempfile.TemporaryDirectory() as tmp:
            self.save_model(str(Path(tmp) / "artifact"))
            return push_folder(Path(tmp) / "artifact", repo_id, private=self.args.hub_private_repo,
                               token=token or self.args.hub_token, revision=revision,
                               commit_message=commit_message or "Upload reward ensemble with rlhf_ext")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Trainer's resume, for our artifact-shaped checkpoints (adapters + heads, verified by the manifest)."""
        from peft import set_peft_model_state_dict

        from ..integrity import load_safetensors, verify_manifest
        from .artifact import _REBUILD, read_spec, trunk_key_prefix

        ens, path = self.accelerator.unwrap_model(self.model), Path(resume_from_checkpoint)
        spec = read_spec(path)
        verify_manifest(path, "Resume from an earlier checkpoint-N folder.", required=("heads.safetensors",))
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
    evals = {k: v for h in history for k, v in h.items() if k.startswith("eval_")}
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(evals.items()) if isinstance(v, (int, float)))
    return (f"---\nlibrary_name: rlhf_ext\nbase_model: {spec.get('base_model_display') or spec.get('base_model')}\n"
            f"tags: [rlhf_ext, reward-model, trl]\n---\n\n# Reward ensemble trained with rlhf_ext\n\n"
            f"K = {spec['ensemble_size']} members, mode `{spec['mode']}`, pooling `{spec.get('pooling', 'last')}`, "
            f"length de-correlation {spec['training']['length_decorrelation_coef']}.\n\n"
            f"```python\nfrom rlhf_ext import load_reward_model\nrm = load_reward_model(\"<this folder or repo id>\")\n"
            f"scores = rm.score_texts(prompts, completions, normalize=True)  # [N, K]\n```\n\n"
            + (f"| metric | value |\n|---|---|\n{metrics}\n" if metrics else ""))
