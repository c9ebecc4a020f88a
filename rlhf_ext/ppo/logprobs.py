"""From the LM head's output to what PPO trains on — z = logits/T at the response states and the sampled tokens'
log-probs — with one hand-written backward that allocates one gradient buffer.

Autograd's own chain — slice the response positions, cast to fp32, divide by T, then `log_softmax → gather` (TRL's
`selective_log_softmax`) — builds the logits' gradient at the top of the backward, where every activation is still
alive, from several full-size buffers: the gather's zero-filled scatter, the per-row logsumexp gradients and their
sum, the division's, the cast's and the slice's zero-padded copy. Here the backward writes
(g_logp·(onehot(y) − softmax(z)) + g_z) / T straight into one buffer of the head's output shape and dtype, one
sequence at a time through an fp32 [R, V] temporary. The forward computes what the plain chain and TRL's
`selective_log_softmax` compute, the same way (bit-equal: tests/test_logprobs.py).
"""

from __future__ import annotations

import torch

# exp() of an fp32 argument below about −87.3 is denormal or 0, and torch's vectorised CPU exp falls back to a slow
# path there (measured 12–30× slower on such rows); in the gradient a probability below e^−87 ≈ 1.6e−38 is taken as
# e^−87 (the error, < 1.6e−38·|g| per entry, is at fp32's smallest normal number, 1.2e−38)
_EXP_FLOOR = -87.0


def token_logprobs(z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(z)[y] as TRL's selective_log_softmax computes it in fp32: z[y] − logsumexp(z), the logsumexp one
    sequence at a time. No gradient (`response_logprobs` is the differentiable one). z: [B, R, V], tokens: [B, R]
    → [B, R]."""
    return _logprobs(z.detach(), tokens)[0]


def _logprobs(z, tokens):
    lse = torch.stack([torch.logsumexp(row, dim=-1) for row in z])
    return z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse, lse


def _scaled(raw: torch.Tensor, start: int, stop: int, temperature: float) -> torch.Tensor:
    """raw[:, start:stop].float() / T; from 16-bit logits one sequence at a time, so no fp32 copy of the whole slice
    is alive beside the result."""
    if raw.dtype == torch.float32:
        return raw[:, start:stop] / temperature
    z = torch.empty(raw.shape[0], stop - start, raw.shape[-1], dtype=torch.float32, device=raw.device)
    for b in range(raw.shape[0]):
        torch.div(raw[b, start:stop].float(), temperature, out=z[b])
    return z


class _ResponseLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, raw, tokens, start: int, stop: int, temperature: float):
        z = _scaled(raw, start, stop, temperature)
        logp, lse = _logprobs(z, tokens)
        ctx.save_for_backward(z, tokens, lse)
        ctx.shape, ctx.dtype, ctx.span, ctx.temperature = raw.shape, raw.dtype, (start, stop), temperature
        ctx.set_materialize_grads(False)  # g_z is None unless something differentiates through z (an entropy bonus)
        return z, logp

    @staticmethod
    def backward(ctx, g_z, g_logp):
        z, tokens, lse = ctx.saved_tensors
        start, stop = ctx.span
        grad = torch.empty(ctx.shape, dtype=ctx.dtype, device=z.device)
        grad[:, :start].zero_()
        grad[:, stop:].zero_()
        for b in range(z.shape[0]):
            row = torch.zeros_like(z[b]) if g_logp is None else (
                # ∂ log softmax(z)[y] / ∂z = onehot(y) − softmax(z)
                torch.sub(z[b], lse[b, :, None]).clamp_(min=_EXP_FLOOR).exp_().mul_(-g_logp[b, :, None])
                .scatter_add_(-1, tokens[b, :, None], g_logp[b, :, None].to(z.dtype)))
            if g_z is not None:
                row.add_(g_z[b])
            grad[b, start:stop] = row.div_(ctx.temperature)  # ∂z/∂raw = 1/T
        return grad, None, None, None, None


def response_logits(raw: torch.Tensor, n_resp: int, temperature: float) -> torch.Tensor:
    """z alone, without gradient (sampling checks, the reference, KL measurements): raw[:, −R−1 : −1].float() / T."""
    with torch.no_grad():
        return _scaled(raw, raw.shape[1] - n_resp - 1, raw.shape[1] - 1, temperature)


def response_logprobs(raw: torch.Tensor, tokens: torch.Tensor, temperature: float):
    """The states that predict the response, as fp32 z = logits/T, and the log-probs of `tokens` under softmax(z).
    raw: [B, T', V] the LM head's output (any float dtype; T' = R + 1 with `logits_to_keep`), tokens: [B, R] →
    (z [B, R, V] fp32 = raw[:, −R−1 : −1].float() / T, logp [B, R])."""
    R = tokens.shape[1]
    start, stop = raw.shape[1] - R - 1, raw.shape[1] - 1
    if not (raw.requires_grad and torch.is_grad_enabled()):
        z = _scaled(raw, start, stop, temperature)
        return z, _logprobs(z, tokens)[0]
    return _ResponseLogProbs.apply(raw, tokens, start, stop, temperature)
