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
    try:
        split = SplitTrunk(trunk_of(hf), k)
    except ValueError as e:
        warnings.warn(f"Frozen-prefix cache disabled: {e}")
        return None
    from .adapters import adapters_disabled

    with adapters_disabled(peft_model):
        ok = split.verify(hf.config.get_text_config().vocab_size, next(hf.parameters()).device,
                          model=peft_model if whole_model else None, train_mode=train_mode)
    return split if ok else None


def restrict_to_top_layers(peft_config, model, n: int | None):
    """Put LoRA on the last `n` decoder layers only (None/0: leave the config alone); returns the config."""
    if not hasattr(peft_config, "layers_to_transform"):  # IA³ and others: no per-layer selection
        if n:
            raise ValueError(f"lora_top_layers={n}: {type(peft_config).__name__} has no layers_to_transform to put "
                             f"adapters on the top layers only. Use a LoraConfig, or lora_top_layers=0.")
        return peft_config
    if n:
        total = model.config.get_text_config().num_hidden_layers
        if not 0 < n <= total:
            raise ValueError(f"lora_top_layers={n} but the model has {total} layers; use 1…{total} (or 0 for all).")
        top = list(range(total - n, total))
        given = peft_config.layers_to_transform
        if given is not None and sorted([given] if isinstance(given, int) else given) != top:
            raise ValueError(f"lora_top_layers={n} (LoRA on layers {top}) and the LoRA config's layers_to_transform="
                             f"{given} disagree; keep one of them.")
        peft_config.layers_to_transform = top
    if peft_config.layers_to_transform is not None and not peft_config.layers_pattern:
        # Without a pattern PEFT needs a dot before the layer list ("model.layers.3."), so the adapter would not
        # load onto a bare trunk ("layers.3.") — the reward artifact's standalone path.
        peft_config.layers_pattern = layer_list_name(model)
    return peft_config


def layer_list_name(model) -> str | None:
    """Attribute name of the decoder-layer list ("layers" for Llama and OPT, "h" for GPT-2) of a model or trunk, or
    None."""
    found = _layer_stack(trunk_of(model))
    return found[1] if found else None


_STACK_HOLDERS = ("decoder", "transformer", "model", "language_model")
_INPUT_PROJECTIONS = ("project_in",)


def _layer_stack(trunk: nn.Module) -> tuple[nn.Module, str] | None:
    """(the module whose forward runs the decoder layers, the attribute of its layer list): the trunk itself for
    most families, `trunk.decoder` for OPT."""
    for holder in (trunk, *(getattr(trunk, a, None) for a in _STACK_HOLDERS)):
        if isinstance(holder, nn.Module):
            attr = next((a for a in _LAYER_LISTS if isinstance(getattr(holder, a, None), nn.ModuleList)), None)
            if attr is not None:
                return holder, attr
    return None


class _Stop(Exception):
    """Raised by the hook that ends the lower pass at layer k."""


class _Skip(nn.Module):
    """Stands in for a layer below k during the upper pass: returns the cached state, whatever it is given, in the
    form the real layers return (a tensor, or a tuple whose first item the stack reads: Falcon-H1).
    Attributes the stack's forward reads off its layers (e.g. an attention type) come from the layer it replaces."""

    def __init__(self, state: dict, original: nn.Module, tuple_length: int | None = None):
        super().__init__()
        self.__dict__["_state"], self.__dict__["_original"] = state, original
        self.__dict__["_tuple_length"] = tuple_length

    def forward(self, *args, **kwargs):
        n = self.__dict__["_tuple_length"]
        return self._state["h"] if n is None else (self._state["h"], *([None] * (n - 1)))

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)


class SplitTrunk:
    """A decoder trunk run as layers [0, k) (`lower`, no grad) then [k, n) (`upper`) on the cached state.

    `lower` runs the trunk's own forward and stops at the input of layer k (a pre-hook), so whatever the trunk does
    before its layers (position embeddings, embedding scaling, input projections) is included. `upper` runs the
    trunk's forward again with the cached state as `inputs_embeds`: the first k layers are replaced by stand-ins that
    return the cached state, so layer k receives exactly it, and the layer list keeps its length — families that
    pick each layer's attention mask / rotary table by its index (Gemma 2/3 sliding windows, Qwen2/3, SmolLM3) give
    the top layers their own. Whatever the trunk computed from `inputs_embeds` before its layers is discarded.
    `verify` checks the split against the full forward on the model at hand; where it differs, the cache is off.
    """

    def __init__(self, trunk: nn.Module, k: int):
        found = _layer_stack(trunk)
        if found is None:
            raise ValueError(f"{type(trunk).__name__} has no recognisable decoder-layer list "
                             f"({'/'.join(_LAYER_LISTS)}, directly or under {'/'.join(_STACK_HOLDERS)}).")
        self.trunk, self.k = trunk, k
        self.stack, self.layers_attr = found
        self.layer_output_tuple = None  # the length of what a layer returns where it is a tuple (seen by `lower`)

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.stack, self.layers_attr)

    @contextmanager
    def upper_only(self):
        """Inside, the trunk runs layers [k, n) + whatever follows them (final norm, …): feed the cached state as
        `inputs_embeds`, through the trunk or through the whole model (whose LM head then runs as usual)."""
        layers, state = self.layers, {}
        originals = [layers[i] for i in range(self.k)]

        def grab(module, args, kwargs):
            h = kwargs.get("inputs_embeds")
            if h is None:
                raise ValueError("Inside SplitTrunk.upper_only, pass the cached state as `inputs_embeds=`.")
            state["h"] = h

        handle = self.stack.register_forward_pre_hook(grab, with_kwargs=True)
        for i, layer in enumerate(originals):
            layers[i] = _Skip(state, layer, self.layer_output_tuple)
        # An input projection before the layers (OPT-350m's project_in: embedding width → hidden) would reject the
        # hidden-width cached state; its output is discarded anyway, so it steps aside.
        projections = {a: getattr(self.stack, a) for a in _INPUT_PROJECTIONS
                       if isinstance(getattr(self.stack, a, None), nn.Module)}
        for a in projections:
            setattr(self.stack, a, nn.Identity())
        try:
            yield
        finally:
            handle.remove()
            for i, layer in enumerate(originals):
                layers[i] = layer
            for a, module in projections.items():
                setattr(self.stack, a, module)

    @torch.no_grad()
    def lower(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """Hidden state entering layer k. [B, T] ids → [B, T, H]."""
        state = {}

        def stop(module, args, kwargs):
            state["h"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        def seen(module, args, output):
            self.layer_output_tuple = len(output) if isinstance(output, tuple) else None

        handle = self.layers[self.k].register_forward_pre_hook(stop, with_kwargs=True)
        below = self.layers[self.k - 1].register_forward_hook(seen) if self.k > 0 else None
        try:
            self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
            if below is not None:
                below.remove()
        if "h" not in state:
            raise RuntimeError(f"{type(self.trunk).__name__}'s forward never reached layer {self.k}.")
        return state["h"]

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
