"""Per-architecture defaults and start-up refusals: which modules the default LoRA adapts, and which models rlhf_ext
cannot train at all (refused before any work, naming the architecture and the fix).

Default LoRA targets come from PEFT's own table (`peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_
MAPPING`: query + value projections, `c_attn` for GPT-2, `query_key_value` for GPT-NeoX, …), so a model PEFT knows gets
what PEFT would pick. For a model type PEFT does not list (Phi-3, OLMo 2, SmolLM3, Qwen3-MoE in peft 0.21), the same
convention is applied to the attention projections found in the model's layer stack: query + value when they are
separate, the fused projection when they are not (`qkv_proj`, `Wqkv`, …), else every attention projection. Hybrid
stacks (Qwen3.5, LFM2, Granite 4) also adapt the fused input projection of their other layers' token mixer. The tested
architectures and what works on each: README "Supported architectures" (`python scripts/support_table.py`).
"""

from __future__ import annotations

import re
import warnings

from torch import nn

# Separate query/value projections as families name them, most common first; fused q/k/v projections.
_QUERY_VALUE = (("q_proj", "v_proj"), ("query", "value"), ("q", "v"), ("wq", "wv"))
_FUSED_QKV = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "W_pack", "qkv", "in_proj")
# The fused input projection of a token mixer that is not attention (linear attention: Qwen3-Next / Qwen3.5's Gated
# DeltaNet; short convolutions: LFM2; state-space layers), preferred in this order.
_MIXER_INPUT = ("in_proj_qkvz", "in_proj_qkv", "in_proj")
_ATTENTION = re.compile(r"(?:^|\.)(?:self_attn|self_attention|attention|attn|mixer)(?:\.|$)", re.I)
_STACK = r"\.(?:layers|h|blocks|block|layer)\.\d+"  # a decoder layer's name: `….layers.3`
_IN_LAYER_STACK = re.compile(_STACK + r"\.")
_LAYER = re.compile(rf"^(.*?{_STACK})\.")  # group 1: the layer's own name


class UnsupportedArchitectureError(ValueError):
    """A model rlhf_ext refuses at start-up; the message names the architecture and what to do instead."""


def _hf(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def architecture_name(model) -> str:
    """`Gemma3ForCausalLM (model_type 'gemma3_text')`: how refusals name a model."""
    hf = _hf(model)
    return f"{type(hf).__name__} (model_type {getattr(hf.config, 'model_type', '?')!r})"


def _lora_layer_types() -> tuple[type, ...]:
    """Module classes PEFT's LoRA can wrap as a projection (bitsandbytes' 4/8-bit linears subclass nn.Linear)."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def _leaf_names(model, types) -> dict[str, list[str]]:
    """Last name component → full names, for modules of `types`."""
    out: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, types) and name:
            out.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return out


def default_lora_target_modules(model) -> list[str]:
    """The LoRA `target_modules` rlhf_ext uses when none are given, for this model's architecture.

    PEFT's mapping for the model type (the text model's type for multimodal configs) when every name in it exists in
    the model; otherwise the attention projections of the layer stack: query + value (separate), the fused q/k/v
    projection, or all of them. In a hybrid stack, the layers without those (linear attention, convolutions) add
    their token mixer's fused input projection. In a multimodal model (Gemma 3 4B+, …) only the language model's
    modules: full names when the vision tower has modules of the same name. Raises `UnsupportedArchitectureError`
    naming the architecture when nothing fits — pass `target_modules` explicitly then."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    hf = _hf(model)
    cfg = hf.config
    types = [getattr(cfg, "model_type", None)]
    if hasattr(cfg, "get_text_config"):
        types.append(getattr(cfg.get_text_config(), "model_type", None))
    present = _leaf_names(hf, _lora_layer_types())
    for t in types:
        mapped = PEFT_DEFAULTS.get(t)
        if mapped and all(name in present for name in mapped):
            return _within_language_model(hf, list(mapped) + _mixer_inputs(present, list(mapped)), present)

    # Not in PEFT's table (or its names are not in this model): the attention projections inside the layer stack
    attention = {leaf: names for leaf, names in present.items()
                 if any(_IN_LAYER_STACK.search("." + n + ".") and _ATTENTION.search(n.rsplit(".", 1)[0]) for n in names)}
    chosen = next(([q, v] for q, v in _QUERY_VALUE if q in attention and v in attention), None)
    chosen = chosen or [f for f in _FUSED_QKV if f in attention][:1] or sorted(attention)
    if chosen:
        return _within_language_model(hf, chosen + _mixer_inputs(present, chosen), present)
    raise UnsupportedArchitectureError(
        f"rlhf_ext has no default LoRA target modules for {architecture_name(hf)}: PEFT's table has no entry for it "
        f"and no attention projection (nn.Linear / Conv1D under an attention module of the decoder layers) was found. "
        f"Pass `peft_config=LoraConfig(target_modules=[...])` naming the modules to adapt (e.g. "
        f"target_modules='all-linear')."
    )


def _mixer_inputs(present: dict[str, list[str]], chosen: list[str]) -> list[str]:
    """In a hybrid layer stack (Qwen3.5: three linear-attention layers to one attention layer; LFM2: convolutions),
    the layers without the `chosen` attention projections would get no adapter: their token mixer's fused input
    projection (`_MIXER_INPUT`) where every such layer has one, so each layer is adapted as attention layers are."""
    def layers(names):
        return {m.group(1) for n in names if (m := _LAYER.match("." + n))}  # "." + : a trunk's names start "layers."

    covered = layers(n for leaf in chosen for n in present[leaf])
    every = layers(n for names in present.values() for n in names)
    uncovered = every - covered
    if not covered or not uncovered:
        return []
    return next(([leaf] for leaf in _MIXER_INPUT if leaf in present and uncovered <= layers(present[leaf])), [])


def _language_model_prefix(hf) -> str | None:
    """Name of the text model inside a multimodal model (`model.language_model` for Gemma 3 4B+), else None."""
    cfg = hf.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if text is cfg:
        return None
    return next((n for n, m in hf.named_modules() if n and getattr(m, "config", None) is text), None)


def _within_language_model(hf, leaves: list[str], present: dict[str, list[str]]) -> list[str]:
    """`leaves` as PEFT matches them (name suffixes), unless the model also has them outside its language model (a
    vision tower's q_proj, …): then the full names inside the language model. LoRA on a tower that text-only RLHF
    never runs would get no gradient (and trip the trainers' gradient check)."""
    prefix = _language_model_prefix(hf)
    if prefix is None:
        return leaves
    names = [n for leaf in leaves for n in present[leaf]]
    if all(n.startswith(prefix + ".") for n in names):
        return leaves
    return sorted(n for n in names if n.startswith(prefix + "."))


def check_supported(model) -> None:
    """Refuse, before any work, models rlhf_ext cannot train as a causal-LM policy or reward trunk."""
    hf = _hf(model)
    cfg = getattr(hf, "config", None)
    if cfg is None:
        raise UnsupportedArchitectureError(f"{type(hf).__name__} has no transformers config; rlhf_ext trains "
                                           f"transformers models (AutoModelForCausalLM or its trunk).")
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"{architecture_name(hf)} is an encoder-decoder model; rlhf_ext's PPO and reward models need a "
            f"decoder-only causal LM (AutoModelForCausalLM). Use a decoder-only checkpoint.")


def resolve_lora_config(peft_config, model, **defaults):
    """The LoRA config a trainer uses: a copy of `peft_config` (the caller's object is not changed: it may configure
    another trainer next) with its `target_modules` filled in when it has none, or a new `LoraConfig(**defaults)` on
    `default_lora_target_modules(model)`. Refuses unsupported architectures first."""
    import copy

    from peft import LoraConfig

    check_supported(model)
    if peft_config is None:
        return LoraConfig(**defaults, target_modules=default_lora_target_modules(model))
    refuse_unsupported_peft(peft_config)
    peft_config = copy.deepcopy(peft_config)
    if getattr(peft_config, "target_modules", "n/a") is None and not getattr(peft_config, "target_parameters", None):
        peft_config.target_modules = default_lora_target_modules(model)
    elif getattr(peft_config, "layers_to_transform", None) is None:
        hint = unadapted_layers_hint(model, getattr(peft_config, "target_modules", None))
        if hint:
            warnings.warn(hint, UserWarning, stacklevel=3)
    return peft_config


def refuse_unsupported_peft(peft_config) -> None:
    """PEFT configs a trainer here cannot train as their method intends, refused with the way on. AdaLoRA (a
    LoraConfig subclass) allocates its ranks through `update_and_allocate()` calls between steps that nothing here
    makes, and its zero-initialised singular values leave A and B without gradient at the first step. A LoRA `bias`
    other than "none" would train the base's biases, which the frozen reference shares: they stay frozen (said)."""
    from peft import AdaLoraConfig

    if isinstance(peft_config, AdaLoraConfig):
        raise ValueError("AdaLoraConfig is not supported: its rank allocation needs update_and_allocate() calls "
                         "between optimizer steps, which rlhf_ext's trainers do not make. Use a LoraConfig (e.g. "
                         f"r={peft_config.init_r}, the rank AdaLoRA starts from).")
    if getattr(peft_config, "bias", "none") != "none":
        warnings.warn(f"peft_config.bias={peft_config.bias!r}: the base model's biases stay frozen here — they are "
                      f"shared with the reference (adapters off), which must stay the base. Set bias='none' to "
                      f"silence this; for trainable biases on adapted layers, use lora_bias=True.", UserWarning,
                      stacklevel=4)


def unadapted_layers_hint(model, target_modules) -> str | None:
    """Where explicit `target_modules` (names, as recipes list them) leave a hybrid's non-attention layers without an
    adapter — `[q_proj, k_proj, v_proj, o_proj]` on Qwen3.5 adapts one layer in four —, what to add; else None."""
    if not isinstance(target_modules, (list, tuple, set)):
        return None  # "all-linear" or a regular expression: what it matches is the user's choice
    hf = _hf(model)
    present = _leaf_names(hf, _lora_layer_types())
    named = [t for t in target_modules if t in present]
    missing = _mixer_inputs(present, named) if named else []
    if not missing:
        return None
    return (f"LoRA target_modules {sorted(target_modules)} leave the layers of {architecture_name(hf)} whose token "
            f"mixer is not attention (linear attention, convolution or state space) without an adapter. Add "
            f"{missing[0]!r} to target_modules to adapt every layer, as rlhf_ext's default targets do (or leave "
            f"target_modules unset for those defaults); ignore this if it is intended.")


def final_hidden_size(model) -> int:
    """Width of the trunk's final hidden states — what the LM head, a value head or a reward head reads. That is
    `hidden_size` except where the trunk projects its output (OPT-350m: `project_out` to `word_embed_proj_dim`)."""
    hf = _hf(model)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    width = getattr(head, "in_features", None)
    if width:
        return int(width)
    for name, module in hf.named_modules():
        if name.rsplit(".", 1)[-1] == "project_out" and isinstance(module, nn.Linear):
            return int(module.out_features)
    return int(hf.config.get_text_config().hidden_size)
