"""One precision context for every PPO pass, and what "exact" means in each precision.

PPO's ratios, the KL penalty and the hard-KL guard compare distributions computed by different passes: sampling
(`generate`, incremental with a KV cache), θ_old and the training forward, the reference (adapters off) and the
KL measurements. They must all run in the same precision context, or a policy that has not moved reads as moved
(under DDP, accelerate's autocast used to wrap the training forward only: KL 3.4e-4 at θ = θ₀ with bf16).
`PolicyAndValue` runs every pass under `autocast(dtype)` from here; the value head and the log-softmax stay fp32.

What cannot be made equal is incremental decoding against a full forward: the same math in a different order of
operations, so in bf16 they differ by rounding. Measured on SmolLM2-135M-Instruct (4 prompts × 32 sampled tokens,
`python benchmarks/sampling_precision.py`): mean per-token KL(generate ‖ training forward) 1e-11 in fp32,
1.1e-3 under bf16 autocast, 1.7e-3 with bf16 weights, 1.8e-3 on a 4-bit base with bf16 compute; a repetition
penalty of 1.1 (the kind of logits processing the start-up check exists to catch) reads 0.15. The tolerance is
therefore a property of the compute dtype (`SAMPLING_KL_TOLERANCE`), not one fp32 threshold for everyone.

Between passes that are the *same* full forward (the training pass at θ₀ against the reference) there is no
rounding excuse: the start-up check requires them to agree to `SAME_PASS_KL_TOLERANCE` in every precision.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

# Mean over sampled positions of KL(generate's distribution ‖ the training forward's), nats per token.
SAMPLING_KL_TOLERANCE = {
    torch.float32: 1e-5,  # measured 1e-11: anything above is logits processing, not rounding
    torch.bfloat16: 1e-2,  # measured 1.1e-3–1.8e-3 (SmolLM2); 8 bits of mantissa
    torch.float16: 2.5e-3,  # 11 bits of mantissa: a quarter of bf16's
}
# KL(training forward at θ₀ ‖ reference), nats per sequence: the same computation, so zero up to summation order.
SAME_PASS_KL_TOLERANCE = 1e-6


def autocast_dtype(mixed_precision: str | None) -> torch.dtype | None:
    """accelerate's / TrainingArguments' `mixed_precision` ("no", "bf16", "fp16") → the autocast dtype, or None."""
    if mixed_precision in (None, "no"):
        return None
    if mixed_precision == "bf16":
        return torch.bfloat16
    if mixed_precision == "fp16":
        raise ValueError(
            "PPOTrainer does not support fp16 mixed precision: fp16 training needs a loss scaler around every "
            "optimizer step, and the KL guard edits parameters between steps. Use bf16=True (any GPU since Ampere, "
            "and CPUs with AVX512-BF16) or full fp32 (bf16=False, fp16=False).")
    raise ValueError(f"Unknown mixed_precision {mixed_precision!r}; expected 'no' or 'bf16'.")


def compute_dtype(model, autocast: torch.dtype | None) -> torch.dtype:
    """The dtype the model's matmuls actually run in: the autocast dtype if any, else a 4-bit base's compute dtype,
    else the dtype of its floating-point weights (embeddings excluded: bitsandbytes keeps them in their own dtype)."""
    if autocast is not None:
        return autocast
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    qc = getattr(getattr(hf, "config", None), "quantization_config", None)
    qdtype = getattr(qc, "bnb_4bit_compute_dtype", None) if qc is not None and not isinstance(qc, dict) else (
        (qc or {}).get("bnb_4bit_compute_dtype"))
    if qdtype is not None:
        return getattr(torch, qdtype) if isinstance(qdtype, str) else qdtype
    emb = hf.get_input_embeddings().weight if hasattr(hf, "get_input_embeddings") else None
    for p in hf.parameters():
        if p.is_floating_point() and p is not emb:
            return p.dtype
    return torch.float32


def sampling_tolerance(dtype: torch.dtype) -> float:
    return SAMPLING_KL_TOLERANCE.get(dtype, SAMPLING_KL_TOLERANCE[torch.bfloat16])


def precision_context(device: torch.device | str, dtype: torch.dtype | None):
    """`torch.autocast(device type, dtype)` when `dtype` is set, else a no-op context."""
    if dtype is None:
        return nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type="cuda" if device_type == "cuda" else device_type, dtype=dtype)


def full_precision(device: torch.device | str):
    """Autocast off (value head, log-softmax and KL sums stay fp32 inside a bf16 context)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)
