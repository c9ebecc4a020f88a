"""Grouped-query attention on CPU without repeated key/value heads.

transformers' SDPA attention hands `F.scaled_dot_product_attention` a grouped-query model's key/value heads as they
are (`enable_gqa=True`) only where no attention mask is given — CUDA's fast kernels cannot take both —, and otherwise
copies k and v once per query head of their group (`repeat_kv`) and differentiates through the copies. A padded
batch always has a mask. On CPU torch's kernels take both, so inside `grouped_kv_attention` transformers' test says
yes there for passes over more than one query: the same products (SmolLM2-135M's logits bit for bit in fp32 and bf16),
without the copies or their backward. The benchmark trainer's iteration on an AMD Zen 5: 3.89 / 4.30 s against 4.01 /
4.47 in bf16, update 2.33 / 2.66 against 2.47 / 2.74 (`python benchmarks/ppo_throughput.py --baseline --precision
fp32,bf16 --rounds 2 --other-tree`, README). Both trainers' passes run in it; PPO's passes all do (sampling's prefill
too), so they still compute one function.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext

import torch

from .models import activation_checkpointing_on

try:
    from transformers.integrations import sdpa_attention as _hf_sdpa
except ImportError:  # pragma: no cover - transformers without its SDPA integration module
    _hf_sdpa = None


def _hf_gqa_test():
    """transformers' test for handing SDPA the key/value heads unrepeated (`enable_gqa`, torch ≥ 2.5), where it has
    the signature this module wraps; None otherwise (then nothing is changed)."""
    from transformers.utils.import_utils import is_torch_greater_or_equal

    fn = getattr(_hf_sdpa, "use_gqa_in_sdpa", None)
    if not is_torch_greater_or_equal("2.5", accept_dev=True):
        return None
    try:
        return fn if list(inspect.signature(fn).parameters) == ["attention_mask", "key", "value"] else None
    except (TypeError, ValueError):
        return None


_HF_USE_GQA = _hf_gqa_test()
_grouped_depth = 0


def _use_gqa_on_cpu(attention_mask, key, value) -> bool:
    """transformers' answer, and yes on CPU for a masked pass over more than one query. transformers says no whenever
    there is a mask (CUDA's fast kernels cannot take both), and then copies k and v once per query head of their
    group (`repeat_kv`) and differentiates through the copies. Decoding (one query) is left to transformers, which
    folds the query heads into rows there: faster than SDPA's grouped kernel on CPU."""
    if (key.device.type == "cpu" and attention_mask is not None and attention_mask.dim() == 4
            and attention_mask.shape[-2] > 1 and key.shape[-1] == value.shape[-1]):
        return True
    return _HF_USE_GQA(attention_mask, key, value)


@contextmanager
def _grouped_kv():
    global _grouped_depth
    if _grouped_depth == 0:
        _hf_sdpa.use_gqa_in_sdpa = _use_gqa_on_cpu
    _grouped_depth += 1
    try:
        yield
    finally:
        _grouped_depth -= 1
        if _grouped_depth == 0:
            _hf_sdpa.use_gqa_in_sdpa = _HF_USE_GQA


def grouped_kv_attention(device: torch.device, model: torch.nn.Module | None = None):
    """The context a pass runs in: on CPU, transformers' SDPA attention gets grouped-query models' key/value heads as
    they are, with `enable_gqa=True`, instead of repeated copies (module docstring; `tests/test_grouped_kv.py`).
    Nothing elsewhere, and nothing under gradient checkpointing: the recomputation in the backward runs outside this
    context and must rebuild what the first forward saved."""
    if (device.type == "cpu" and _HF_USE_GQA is not None
            and not (model is not None and activation_checkpointing_on(model))):
        return _grouped_kv()
    return nullcontext()
