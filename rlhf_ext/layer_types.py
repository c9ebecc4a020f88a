"""Which decoder layers of a hybrid stack keep a running state instead of keys and values: one rule for the shared
prompt prefix (off where such a state would run through masked columns) and the memory plan (which models every layer
as attention). Torch-free: the plan reads configs only."""

from __future__ import annotations


def recurrent_layer_types(layer_types) -> list[str]:
    """The recurrent types among a config's `layer_types`: "linear_attention" (transformers' name for Qwen3.5's Gated
    DeltaNet and Granite 4's Mamba layers alike), LFM2's "conv", any other type that is not attention; sorted, once
    each. None or [] (a dense model): []."""
    return sorted({t for t in (layer_types or []) if t == "linear_attention" or "attention" not in t})
