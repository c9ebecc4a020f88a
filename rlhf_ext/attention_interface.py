"""transformers' attention interface: the "sdpa" attention function a model looks up at every forward, replaced for
one context and restored after. Two passes wrap it: `shared_prefix._attention_split` (a packed pass's attention split
back per row) and `ppo/cpu_attention.py` (the cheaper 16-bit backward on CPU); each wraps whatever is there, so they
nest."""

from __future__ import annotations

from contextlib import contextmanager

try:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:  # pragma: no cover - transformers without the attention interface
    ALL_ATTENTION_FUNCTIONS = None


def can_replace_sdpa() -> bool:
    """Whether this transformers has the attention interface `sdpa_replaced` edits (a per-process local mapping)."""
    return isinstance(getattr(ALL_ATTENTION_FUNCTIONS, "_local_mapping", None), dict)


@contextmanager
def sdpa_replaced(wrap):
    """transformers' "sdpa" attention function replaced by `wrap(the function there now)` for the context's duration,
    then the mapping restored as it was: a local override the caller had is kept, none is left behind."""
    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    had, saved = "sdpa" in local, local.get("sdpa")
    local["sdpa"] = wrap(ALL_ATTENTION_FUNCTIONS["sdpa"])
    try:
        yield
    finally:
        if had:
            local["sdpa"] = saved
        else:
            del local["sdpa"]
