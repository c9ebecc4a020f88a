"""The reward-model artifact: one folder per run, loadable by one call into an object that scores texts with
every ensemble member.

Layout of a saved artifact::

    rlhf_ext_reward.json        spec: base model, mode, members, normalisation, LoRA config
    heads.safetensors           score heads: "<adapter>.weight" [k, H] (+ ".bias")
    adapters/<adapter>.safetensors   LoRA weights, keys relative to the transformer trunk
    trunk/                      full trunk weights (only for runs without LoRA)
    tokenizer files

Members are LoRA adapters (+ heads) on a frozen base, so the PPO trainer can attach them to *its* base
(`load_reward_model(path, base_model=policy_peft_model)`) instead of loading another model copy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .models import ensure_pad_token, load_model, load_tokenizer, trunk_of
from .rl_math import last_token_index

SPEC_FILE = "rlhf_ext_reward.json"
FORMAT_VERSION = 1


def trunk_key_prefix(peft_model) -> str:
    """State-dict prefix of the trunk inside a PeftModel (`base_model.model.` + `model.` for LMs)."""
    hf = peft_model.get_base_model()
    inner = getattr(hf, "base_model_prefix", "")
    return "base_model.model." + (f"{inner}." if inner and hasattr(hf, inner) else "")


def pool_last(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of the last attended token. hidden: [B, T, H], mask: [B, T] → [B, H]."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]


def pool_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean hidden state over attended tokens (padding side irrelevant). hidden: [B, T, H], mask: [B, T] → [B, H]."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


POOLING = {"last": pool_last, "mean": pool_mean}


def reward_input_ids(tokenizer, prompt, completion) -> list[int]:
    """Token ids in exactly the format TRL's RewardTrainer trains on (chat template, or text + EOS)."""
    if isinstance(completion, list):  # conversational
        messages = (prompt or []) + completion
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    text = (prompt or "") + completion
    if not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return tokenizer(text=text)["input_ids"]


def pad_ids(seqs: list[list[int]], pad_id: int, side: str = "right", device=None):
    """Pad token-id lists to one tensor; returns (ids, attention_mask), both [B, T]."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def message_text(value) -> str:
    """The text of a plain string or of a list of chat messages (for emptiness checks)."""
    return " ".join(m.get("content") or "" for m in value) if isinstance(value, list) else value


def _write_atomic(write, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class RewardEnsemble(nn.Module):
    """K reward members hosted on one base: scores token ids or (prompt, completion) pairs → [B, K].

    `mean`/`std` are the per-member normalisation statistics recorded at training time (BT rewards are
    shift-invariant, so raw member scores are not comparable until normalised).
    """

    def __init__(self, model, tokenizer, spec: dict, heads: nn.ModuleDict, owns_base: bool = True):
        super().__init__()
        self.model, self.tokenizer, self.spec, self.heads = model, tokenizer, spec, heads
        self.owns_base = owns_base
        self.adapters = spec["adapters"]  # adapter name on the host model, in column order
        self.names = spec["members"]
        norm = spec.get("normalization") or {}
        K = len(self.names)
        self.register_buffer("mean", torch.tensor(norm.get("mean", [0.0] * K), dtype=torch.float), persistent=False)
        self.register_buffer("std", torch.tensor(norm.get("std", [1.0] * K), dtype=torch.float), persistent=False)
        self.max_length = spec.get("max_length")
        self.pool = POOLING[spec.get("pooling", "last")]

    # -- scoring -------------------------------------------------------------------------------------------
    def _hidden(self, input_ids, attention_mask, adapter_names=None):
        trunk = trunk_of(self.model)
        if adapter_names is None:
            return trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        with self.model._enable_peft_forward_hooks(adapter_names=adapter_names):  # mixed-adapter batch
            return trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw member rewards. input_ids, attention_mask: [B, T] (any padding side) → [B, K]."""
        was_training = self.model.training
        self.model.eval()  # PEFT allows mixed-adapter batches in eval mode only; also no dropout when scoring
        try:
            mode, B = self.spec["mode"], input_ids.shape[0]
            if mode == "full":
                pooled = self.pool(self._hidden(input_ids, attention_mask), attention_mask)
                return self.heads["full"](pooled.float())
            if mode == "heads":
                (adapter,) = self.adapters[:1]
                with _active_adapter(self.model, adapter):
                    pooled = self.pool(self._hidden(input_ids, attention_mask), attention_mask)
                return self.heads[adapter](pooled.float())
            # adapters: one mixed batch, every row repeated once per member adapter
            K = len(self.adapters)
            ids, mask = input_ids.repeat(K, 1), attention_mask.repeat(K, 1)
            names = [a for a in self.adapters for _ in range(B)]
            pooled = self.pool(self._hidden(ids, mask, adapter_names=names), mask).float()
            return torch.cat([self.heads[a](pooled[k * B : (k + 1) * B]) for k, a in enumerate(self.adapters)], -1)
        finally:
            self.model.train(was_training)

    def score_completions(self, prompts, completions, completion_ids=None, batch_size: int = 16, **kwargs):
        """Member interface for `RewardPipeline` (TRL's reward_funcs signature) → raw rewards [B, K]."""
        prompts = prompts if prompts is not None else [None] * len(completions)
        seqs = [reward_input_ids(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        if self.max_length:
            seqs = [s[-self.max_length :] for s in seqs]
        device = next(self.heads.parameters()).device
        out = []
        for i in range(0, len(seqs), batch_size):
            ids, mask = pad_ids(seqs[i : i + batch_size], self.tokenizer.pad_token_id, device=device)
            out.append(self.score_ids(ids, mask))
        return torch.cat(out).cpu()

    __call__ = score_completions  # a RewardEnsemble is itself a pipeline member

    def score_texts(self, prompts, completions, normalize: bool = False) -> torch.Tensor:
        r = self.score_completions(prompts, completions)
        return (r - self.mean) / self.std.clamp(min=1e-6) if normalize else r

    def forward(self, input_ids, attention_mask):
        return self.score_ids(input_ids, attention_mask)


class _active_adapter:
    """Temporarily activate one adapter without changing which parameters are trainable."""

    def __init__(self, model, name):
        self.model, self.name = model, name

    def __enter__(self):
        self.prev = self.model.active_adapter
        flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self.model.base_model.set_adapter(self.name)
        for n, p in self.model.named_parameters():
            p.requires_grad_(flags[n])

    def __exit__(self, *exc):
        flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self.model.base_model.set_adapter(self.prev)
        for n, p in self.model.named_parameters():
            p.requires_grad_(flags[n])


# ------------------------------------------------------------------------------------------ save / load
def save_reward_artifact(out_dir, spec: dict, heads: dict[str, dict[str, torch.Tensor]],
                         adapters: dict[str, dict[str, torch.Tensor]], tokenizer, trunk_model=None):
    """Write an artifact folder. heads: adapter → {"weight": [k,H], "bias"?}; adapters: name → LoRA state."""
    out = Path(out_dir)
    (out / "adapters").mkdir(parents=True, exist_ok=True)
    flat = {f"{a}.{k}": v.detach().float().cpu().contiguous() for a, h in heads.items() for k, v in h.items()}
    _write_atomic(lambda p: save_file(flat, str(p)), out / "heads.safetensors")
    for name, state in adapters.items():
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        _write_atomic(lambda p, s=state: save_file(s, str(p)), out / "adapters" / f"{name}.safetensors")
    if trunk_model is not None:
        trunk_model.save_pretrained(out / "trunk", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    spec = {"format_version": FORMAT_VERSION, **spec}
    _write_atomic(lambda p: p.write_text(json.dumps(spec, indent=2)), out / SPEC_FILE)  # last: marks complete


def read_spec(path) -> dict:
    f = Path(path) / SPEC_FILE
    if not f.is_file():
        raise FileNotFoundError(
            f"{path} is not an rlhf_ext reward-model artifact ({SPEC_FILE} missing). Train one with "
            f"`recipes/reward_modeling.py` or `RewardEnsembleTrainer`, then pass its output_dir."
        )
    spec = json.loads(f.read_text())
    if spec.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer rlhf_ext (format {spec['format_version']}); upgrade rlhf_ext.")
    return spec


def lora_config_of(spec: dict, model):
    """The artifact's LoraConfig for `model` (artifacts written before `layers_pattern` was recorded get it here)."""
    from peft import LoraConfig

    from .split_trunk import layer_list_name

    cfg = dict(spec["lora_config"])
    if cfg.get("layers_to_transform") is not None and not cfg.get("layers_pattern"):
        cfg["layers_pattern"] = layer_list_name(model)
    return LoraConfig(**cfg)


def attach_adapters(peft_model, path, spec, prefix: str = "") -> list[str]:
    """Add the artifact's LoRA adapters to an existing PeftModel (frozen); returns their names on the host."""
    from peft import set_peft_model_state_dict

    names = []
    key_prefix = trunk_key_prefix(peft_model)
    for a in spec["adapters"]:
        host_name = prefix + a
        if host_name not in peft_model.peft_config:
            peft_model.add_adapter(host_name, lora_config_of(spec, peft_model))
        state = load_file(str(Path(path) / "adapters" / f"{a}.safetensors"))
        res = set_peft_model_state_dict(peft_model, {key_prefix + k: v for k, v in state.items()}, adapter_name=host_name)
        missing = [k for k in getattr(res, "unexpected_keys", []) if "lora" in k]
        if missing:
            raise ValueError(f"Reward adapter {a!r} does not fit this base model (unexpected keys {missing[:3]}…).")
        names.append(host_name)
    for n, p in peft_model.named_parameters():  # reward members stay frozen on the host
        if any(f".{h}." in n for h in names):
            p.requires_grad_(False)
    return names


def load_reward_model(path, base_model=None, *, tokenizer=None, dtype=None, load_in_4bit=None,
                      adapter_prefix: str = "", device=None) -> RewardEnsemble:
    """Load a reward-model artifact. With `base_model` (a PeftModel on the same base), members are attached to it
    as extra adapters — no second copy of the base. Otherwise the trunk is loaded from the recorded base model."""
    from peft import PeftModel, get_peft_model

    path = Path(path)
    spec = read_spec(path)
    tokenizer = ensure_pad_token(tokenizer or load_tokenizer(str(path)))
    heads_state = load_file(str(path / "heads.safetensors"))
    mode = spec["mode"]
    if mode == "full":
        model = load_model(str(path / "trunk"), "trunk", dtype=dtype or spec.get("dtype"))
        adapters, owns = ["full"], True
    elif base_model is not None:
        if not isinstance(base_model, PeftModel):
            raise TypeError("`base_model` must be a peft.PeftModel so reward members can be attached as adapters.")
        model, owns = base_model, False
        adapters = attach_adapters(model, path, spec, prefix=adapter_prefix)
    else:
        base = load_model(spec["base_model"], "trunk", dtype=dtype or spec.get("dtype"),
                          load_in_4bit=spec.get("load_in_4bit", False) if load_in_4bit is None else load_in_4bit)
        first = spec["adapters"][0]
        model = get_peft_model(base, lora_config_of(spec, base), adapter_name=adapter_prefix + first)
        adapters, owns = attach_adapters(model, path, spec, prefix=adapter_prefix), True
        model.eval()
    saved_names = spec["adapters"]  # names in the artifact; `adapters` are the names on the host model
    spec = {**spec, "adapters": adapters}
    heads = nn.ModuleDict()
    for host, a in zip(adapters, saved_names):
        w = heads_state[f"{a}.weight"]
        lin = nn.Linear(w.shape[1], w.shape[0], bias=f"{a}.bias" in heads_state)
        lin.weight.data.copy_(w)
        if lin.bias is not None:
            lin.bias.data.copy_(heads_state[f"{a}.bias"])
        heads[host] = lin.requires_grad_(False)
    ens = RewardEnsemble(model, tokenizer, spec, heads, owns_base=owns)
    if device is not None:
        ens.heads.to(device)
    else:
        ens.heads.to(next(trunk_of(model).parameters()).device)
    return ens
