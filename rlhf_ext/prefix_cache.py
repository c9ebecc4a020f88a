"""Frozen-prefix cache: run the layers below the lowest adapted layer once per rollout (PPO) or once per text
(reward-model epochs).

When every trained adapter (policy, critic) sits on the top layers only (LoRA `layers_to_transform`), the hidden
state entering the first adapted layer is the same for the reference pass, every PPO epoch, the critic and each
KL check. Computing it once and running only the top layers per pass is exact and skips most of the work —
including the backward pass, which stops at the first adapted layer.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from .models import trunk_of

_LAYER_LISTS = ("layers", "h", "blocks")
_FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm")
_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def lowest_adapted_layer(peft_model, adapters) -> int | None:
    """Index of the lowest decoder layer holding weights of any of `adapters`; None if not layered, 0 when an
    adapted module sits below the layer stack (embeddings). Adapters on the LM head (above the stack) don't count."""
    from .adapters import adapted_modules

    adapted = {n: m for a in adapters for n, m in adapted_modules(peft_model, a).items()}
    hf = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    above = [m for m in (hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None,
                         getattr(hf, "score", None)) if m is not None]  # LM head / reward head: above the stack
    lowest = None
    for name, module in adapted.items():
        if any(module is m for m in above):
            continue
        m = _LAYER_INDEX.search(name + ".")
        if m is None:  # an adapted module outside the layer stack (e.g. embeddings): nothing to cache
            return 0
        lowest = int(m.group(1)) if lowest is None else min(lowest, int(m.group(1)))
    return lowest


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from an attention mask (left or right padding), as `generate()` uses. [B, T] → [B, T]."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def frozen_prefix_split(peft_model, adapters, warn_unlayered: bool = False, whole_model: bool = False,
                        train_mode: bool = True) -> "SplitTrunk | None":
    """A verified SplitTrunk below the lowest layer any of `adapters` touches, or None (nothing to cache, or the
    architecture does not allow it). Verification runs with adapters disabled and compares the trunk's output, or
    with `whole_model` the model's own logits (LM head, soft-capping and all). `train_mode`: verify with dropout
    as training will run it. requires_grad is left as it was."""
    k = lowest_adapted_layer(peft_model, adapters)
    if not k:
        if warn_unlayered:
            warnings.warn("cache_frozen_layers needs LoRA on the top layers only (`lora_top_layers` or "
                          "`layers_to_transform`); it is off.")
        return None
    hf = peft_model.get_base_model()
    split = SplitTrunk(trunk_of(hf), k)
    from .adapters import adapters_disabled

    with adapters_disabled(peft_model):
        ok = split.verify(hf.config.get_text_config().vocab_size, next(hf.parameters()).device,
                          model=peft_model if whole_model else None, train_mode=train_mode)
    return split if ok else None


def restrict_to_top_layers(peft_config, model, n: int | None):
    """Put LoRA on the last `n` decoder layers only (None/0: leave the config alone); returns the config."""
    if n:
        total = model.config.get_text_config().num_hidden_layers
        if not 0 < n <= total:
            raise ValueError(f"lora_top_layers={n} but the model has {total} layers; use 1…{total} (or 0 for all).")
        peft_config.layers_to_transform = list(range(total - n, total))
    if peft_config.layers_to_transform is not None and not peft_config.layers_pattern:
        # Without a pattern PEFT needs a dot before the layer list ("model.layers.3."), so the adapter would not
        # load onto a bare trunk ("layers.3.") — the reward artifact's standalone path.
        peft_config.layers_pattern = layer_list_name(model)
    return peft_config


def layer_list_name(model) -> str | None:
    """Attribute name of the decoder-layer list ("layers" for Llama, "h" for GPT-2) of a model or trunk, or None."""
    trunk = trunk_of(model)
    return next((a for a in _LAYER_LISTS if isinstance(getattr(trunk, a, None), nn.ModuleList)), None)


class SplitTrunk:
    """A decoder trunk run as layers [0, k) (`lower`, no grad) then [k, n) (`upper`) on the cached state.

    Works for trunks whose forward feeds `inputs_embeds` straight into the first layer (Llama, Mistral, Qwen2,
    SmolLM…); `verify` checks that on the model at hand, so others (GPT-2 adds position embeddings) fall back.
    """

    def __init__(self, trunk: nn.Module, k: int):
        self.trunk, self.k = trunk, k
        self.layers_attr = layer_list_name(trunk)
        self.norm_attr = next((a for a in _FINAL_NORMS if isinstance(getattr(trunk, a, None), nn.Module)), None)
        if self.layers_attr is None or self.norm_attr is None:
            raise ValueError(f"{type(trunk).__name__} has no recognisable layer list / final norm.")

    @contextmanager
    def _only(self, layers: nn.ModuleList, norm: nn.Module):
        all_layers, final_norm = getattr(self.trunk, self.layers_attr), getattr(self.trunk, self.norm_attr)
        setattr(self.trunk, self.layers_attr, layers)
        setattr(self.trunk, self.norm_attr, norm)
        try:
            yield
        finally:
            setattr(self.trunk, self.layers_attr, all_layers)
            setattr(self.trunk, self.norm_attr, final_norm)

    @contextmanager
    def upper_only(self):
        """Inside, the trunk runs layers [k, n) + final norm: feed the cached state as `inputs_embeds`, through
        the trunk or through the whole model (whose LM head then runs as usual)."""
        layers = getattr(self.trunk, self.layers_attr)
        with self._only(layers[self.k :], getattr(self.trunk, self.norm_attr)):
            yield

    @torch.no_grad()
    def lower(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """Hidden state entering layer k. [B, T] ids → [B, T, H]."""
        layers = getattr(self.trunk, self.layers_attr)
        with self._only(layers[: self.k], nn.Identity()):
            return self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state

    def upper(self, hidden, attention_mask, position_ids) -> torch.Tensor:
        """Final hidden states from the cached state. [B, T, H] → [B, T, H]."""
        with self.upper_only():
            return self.trunk(inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state

    @torch.no_grad()
    def verify(self, vocab_size: int, device, atol: float = 1e-4, model=None, train_mode: bool = True) -> bool:
        """lower → upper equals the full forward on a left-padded random batch (a dry run, adapters as they are).
        `model`: compare that model's logits instead of the trunk's hidden states."""
        root = model if model is not None else self.trunk
        states = [(m, m.training) for m in root.modules()]
        root.train(train_mode)  # dropout below k would make a cached state inexact: train mode exposes it
        try:
            return self._verify(vocab_size, device, atol, model)
        finally:
            for m, t in states:
                m.training = t

    def _verify(self, vocab_size, device, atol, model) -> bool:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab_size, (2, 9), generator=g).to(device)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        pos = positions(mask)
        try:
            if model is None:
                full = self.trunk(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
                split = self.upper(self.lower(ids, mask, pos), mask, pos)
            else:
                kw = dict(attention_mask=mask, position_ids=pos, use_cache=False)
                full = model(input_ids=ids, **kw).logits
                h_low = self.lower(ids, mask, pos)
                with self.upper_only():
                    split = model(inputs_embeds=h_low, **kw).logits
        except Exception as e:  # noqa: BLE001 — any failure means "not this architecture"
            warnings.warn(f"Frozen-prefix cache disabled: split forward failed on {type(self.trunk).__name__} ({e}).")
            return False
        m = mask.bool()
        err = float((full[m].float() - split[m].float()).abs().max())
        scale = float(full[m].float().abs().max()) + 1e-6
        if err > atol * max(1.0, scale):
            warnings.warn(f"Frozen-prefix cache disabled: split forward differs from the full forward on "
                          f"{type(self.trunk).__name__} (max |Δ| {err:.2e}); running full passes.")
            return False
        return True


class PrefixCache:
    """Per-sequence cache of the frozen lower layers, for loops that revisit the same texts (reward-model epochs,
    evaluation). Rows are keyed by their token ids; right-padded batches use the cache, others run in full.
    Costs T·H floats per cached sequence (kept on the CPU)."""

    def __init__(self, split: SplitTrunk):
        self.split, self.store = split, {}

    def __call__(self, input_ids, attention_mask) -> torch.Tensor:
        """Final hidden states. input_ids, attention_mask: [B, T] → [B, T, H]."""
        lens, pos = attention_mask.sum(1), positions(attention_mask)
        right_padded = bool((attention_mask[:, 0] == 1).all() and (attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
        if not right_padded:
            return self.split.upper(self.split.lower(input_ids, attention_mask, pos), attention_mask, pos)
        keys = [input_ids[i, : int(n)].cpu().numpy().tobytes() for i, n in enumerate(lens)]
        todo = [i for i, k in enumerate(keys) if k not in self.store]
        if todo:
            n_max = int(lens[todo].max())
            rows = torch.tensor(todo, device=input_ids.device)
            sub_mask = attention_mask[rows, :n_max]
            h = self.split.lower(input_ids[rows, :n_max], sub_mask, pos[rows, :n_max])
            for j, i in enumerate(todo):
                self.store[keys[i]] = h[j, : int(lens[i])].to("cpu", copy=True)
        first = self.store[keys[0]]
        h_low = torch.zeros(*input_ids.shape, first.shape[-1], dtype=first.dtype, device=input_ids.device)
        for i, k in enumerate(keys):
            h_low[i, : int(lens[i])] = self.store[k].to(input_ids.device)
        return self.split.upper(h_low, attention_mask, pos)
