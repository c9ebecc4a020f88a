"""One precision context for every PPO pass, and what "exact" means in each precision.

PPO's ratios, the KL penalty and the hard-KL guard compare distributions computed by different passes: sampling
(`generate`, incremental with a KV cache), θ_old and the training forward, the reference (adapters off) and the
KL measurements. They must all run in the same precision context, or a policy that has not moved reads as moved
(under DDP, accelerate's autocast used to wrap the training forward only: KL 3.4e-4 at θ = θ₀ with bf16).
`PolicyAndValue` runs every pass under `autocast(dtype)` from here; the value head and the log-softmax stay fp32.

What cannot be made equal is incremental decoding against a full forward: the same math in a different order of
operations, so in bf16 they differ by rounding. Measured on SmolLM2-135M-Instruct (4 prompts × 32 sampled tokens,
`python benchmarks/sampling_precision.py`): mean per-token KL(generate ‖ training forward) 1e-11 in fp32,
1.1e-3 under bf16 autocast, 1.7e-3 with bf16 weights, 1.8e-3 on a 4-bit base with bf16 compute, 1.5e-5–3.5e-5 in
fp16 (autocast, weights, 4-bit compute: three more bits of mantissa than bf16); a repetition
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
    torch.float16: 1e-3,  # measured 1.5e-5–3.5e-5 (fp16 autocast, fp16 weights, 4-bit with fp16 compute); a 5 %
    # temperature mismatch (0.006) is caught here, where bf16's rounding hides it
}
# KL(training forward at θ₀ ‖ reference), nats per sequence: the same computation, so zero up to summation order.
SAME_PASS_KL_TOLERANCE = 1e-6


def autocast_dtype(mixed_precision: str | None) -> torch.dtype | None:
    """accelerate's / TrainingArguments' `mixed_precision` ("no", "bf16", "fp16") → the autocast dtype, or None."""
    if mixed_precision in (None, "no"):
        return None
    if mixed_precision == "bf16":
        return torch.bfloat16
    if mixed_precision == "fp16":  # GPUs before Ampere (T4, V100, RTX 20xx): with a loss scaler (`loss_scaler`)
        return torch.float16
    raise ValueError(f"Unknown mixed_precision {mixed_precision!r}; expected 'no', 'bf16' or 'fp16'.")


def loss_scaler(accelerator, dtype: torch.dtype | None):
    """The gradient scaler of every optimizer step where the passes compute in fp16 (`dtype`: `compute_dtype`).
    fp16's smallest normal number is 6e-5, and a LoRA adapter's gradients pass through fp16 activations' gradients far
    below it — unscaled they flush to zero. accelerate
    makes a scaler on CUDA and none on CPU; the PPO trainer scales explicitly, with this one, everywhere (and takes it
    from accelerate, so that `accelerator.backward` does not scale a second time). bf16 has fp32's exponent range and
    needs none."""
    if dtype != torch.float16:
        return None
    scaler = accelerator.scaler or torch.amp.GradScaler(accelerator.device.type)
    accelerator.scaler = None
    return scaler


def is_bf16_gpu() -> bool:
    """A CUDA GPU that computes in bf16 natively (Ampere and later). torch's `is_bf16_supported()` also answers True
    on a T4 or V100, which only emulate it — slowly: `bf16=None` must not pick it there."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


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
