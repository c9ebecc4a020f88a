"""Sampling on CPU without `torch.multinomial`: transformers' decoding loop, each token drawn by inverting the CDF.

`torch.multinomial(p, 1)` draws by racing one exponential variate per vocabulary entry: on a 2-core CPU 5.7 ms a
step for 8 rows × 49,152 tokens, 0.18 s of a 32-token rollout. Inverting the cumulative distribution — a float64
cumulative sum, one uniform per row, a binary search — draws from the same distribution in 0.29 ms; the benchmark
trainer's rollout took 0.17–0.20 s less in bf16 and 0.19–0.20 s less in fp32 (`benchmarks/sampling_draw.py`).
transformers lets a caller replace its decoding loop (`generate(custom_generate=callable)`), not the draw, so
`decode` is its `_sample` loop, trimmed to what `PolicyAndValue.generate` asks for (decoder-only,
ancestral sampling, no streamer) and built on its own helpers for the rest (prefill, cache, input preparation).
Those helpers are private and changed within transformers 5 (`_prefill`'s arguments, `next_sequence_length`), so
`decode` is offered only where they are the ones it was written against (`cpu_decoder`); elsewhere — and on GPU,
where multinomial is cheap — generate() runs transformers' own loop. Tested token for token against that loop with
the same draw (`tests/test_sampling.py`). In fp32, the loop's few-row matmuls run in the operand order this CPU
measured faster (`cpu_matmul.py`; the same product to rounding, `tests/test_cpu_matmul.py`). For the Llama family,
where packing pays, the steps after the prefill are `cpu_decode.LeanDecoder`'s: the model's math from packed copies
with the adapters folded in, without its module stack (the same function to rounding, `tests/test_cpu_decode.py`).
"""

from __future__ import annotations

import functools
import inspect

import torch

from .cpu_decode import LeanDecoder
from .cpu_matmul import few_row_linear


def forked_rng(device: torch.device):
    """A context whose random draws leave the run's streams (CPU, and `device`'s where it is a GPU) as they were:
    sampling done to check or to evaluate never changes what training samples next."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `probs` [B, V] (non-negative, rows need not sum to 1) → [B]: the first index whose
    cumulative sum exceeds u · total, u ~ U[0, 1), all in float64. A token of probability 0 is never drawn; invalid
    rows raise as torch.multinomial does."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    if not (bool(torch.isfinite(total).all()) and bool((total > 0).all()) and bool((probs >= 0).all())):
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0, or a row of zeros")
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator) * total
    picked = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    over = picked == probs.shape[-1]  # u · total rounded up to total: the last token of non-zero probability
    if bool(over.any()):
        picked[over] = probs.shape[-1] - 1 - (probs[over] > 0).flip(-1).int().argmax(-1)
    return picked


def decode(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus: bool = False,
           streamer=None, cpu_matmul_backend: str = "auto", **model_kwargs):
    """transformers 5's `GenerationMixin._sample` for a decoder-only model sampling ancestrally, with `draw` in
    place of `torch.multinomial` and the steps as `cpu_decode.LeanDecoder` runs them where it `fits`, else the
    model's with their matmuls as `cpu_matmul.few_row_linear` computes them (`cpu_matmul_backend`:
    `PPOConfig.cpu_matmul_backend`; "torch" turns both off); anything else (a streamer, synced GPUs, greedy
    decoding, a compiled forward) runs transformers' own loop."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput, GenerationMixin

    cfg = generation_config
    if (synced_gpus or streamer is not None or model.config.is_encoder_decoder or not cfg.do_sample
            or cfg.is_assistant or model._valid_auto_compile_criteria(model_kwargs, cfg)):
        return GenerationMixin._sample(model, input_ids, logits_processor, stopping_criteria, cfg,
                                       synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
    pad = cfg._pad_token_tensor
    pad = None if pad is None else pad.to(input_ids.device)
    pads_finished = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    scores = () if cfg.return_dict_in_generate and cfg.output_scores else None
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    steps = (cfg.max_new_tokens if cfg.max_new_tokens is not None else cfg.max_length - input_ids.shape[1]) - 1
    lean_dtype = LeanDecoder.fits(model, steps, input_ids.shape[0], cpu_matmul_backend)
    # the model's steps: their few-row products (packed where that pays); lean steps pack their own copies
    with few_row_linear(model, steps, input_ids.shape[0], "torch" if lean_dtype else cpu_matmul_backend):
        outputs = model._prefill(input_ids, cfg, model_kwargs, is_first_iteration=True)
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
        lean = lean_dtype and LeanDecoder.start(model, model_kwargs, steps, lean_dtype)  # None: the model's steps
        logits = outputs.logits[:, -1]
        del outputs
        while True:
            z = logits_processor(input_ids, logits.to(copy=True, dtype=torch.float32))
            del logits
            if scores is not None:
                scores += (z,)
            tokens = draw(torch.softmax(z, -1))
            if pads_finished:  # a finished sequence continues with padding
                tokens = tokens * unfinished + pad * (1 - unfinished)
            input_ids = torch.cat([input_ids, tokens[:, None]], -1)
            unfinished = unfinished & ~stopping_criteria(input_ids, scores)
            if unfinished.max() == 0:
                break
            if lean:
                logits = lean.step(tokens)
                continue
            inputs = model.prepare_inputs_for_generation(
                input_ids, next_sequence_length=1 if model_kwargs["use_cache"] else None, **model_kwargs)
            outputs = model(**inputs, return_dict=True)
            model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
            logits = outputs.logits[:, -1]
            del outputs
    if cfg.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores, cache=model_kwargs.get("cache"))
    return input_ids


@functools.cache
def _helpers_match() -> bool:
    """transformers' private generation helpers have the signatures `decode` was written against (5.2x)."""
    from transformers.generation.utils import GenerationMixin

    try:
        prefill = inspect.signature(GenerationMixin._prefill).parameters
        prepare = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
        inspect.signature(GenerationMixin._update_model_kwargs_for_generation)
        GenerationMixin._valid_auto_compile_criteria  # noqa: B018
    except (AttributeError, ValueError, TypeError):
        return False
    return "is_first_iteration" in prefill and "next_sequence_length" in prepare


def cpu_decoder(model, matmul_backend: str = "auto") -> dict:
    """{"custom_generate": decode, "cpu_matmul_backend": matmul_backend} for `generate` when the model runs on CPU
    and transformers' helpers are the ones `decode` calls; {} otherwise (transformers' own loop)."""
    if model.device.type == "cpu" and _helpers_match():
        return {"custom_generate": decode, "cpu_matmul_backend": matmul_backend}
    return {}
