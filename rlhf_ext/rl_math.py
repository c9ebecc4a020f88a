"""RLHF math as small pure functions (CleanRL style: one line per equation, shapes in the docstring).

Conventions: `mask` is a float/bool tensor, 1 on real response tokens and 0 on padding. Every statistic is
a masked mean — nothing is ever averaged over padding (the negative-entropy bug of TRL #6121).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is 1. x, mask: same shape."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, reduce_sum=None) -> torch.Tensor:
    """(x − mean)/std over masked positions (unbiased variance); padding comes back as 0. x, mask: [B, T].

    `reduce_sum` (e.g. an all-reduce over processes) turns the local sums into global ones, so data-parallel
    processes whiten with the statistics of the whole batch."""
    m = mask.to(torch.float64)
    xd = x.double()
    # Two passes in float64: E[x²] − E[x]² cancels to noise when |mean| ≫ std (a judge scoring 1000 ± 0.1).
    first = torch.stack([(xd * m).sum(), m.sum()])
    if reduce_sum is not None:
        first = reduce_sum(first)
    n = first[1].clamp(min=1)
    mean = first[0] / n
    sq = ((xd - mean) ** 2 * m).sum()
    if reduce_sum is not None:
        sq = reduce_sum(sq.reshape(1))[0]
    var = sq / n * (n / (n - 1) if n > 1 else 1.0)
    return ((xd - mean) * torch.rsqrt(var + 1e-8) * m).to(x.dtype)


def full_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Exact KL(π‖π_ref) per state over the whole vocabulary. logp, ref_logp: [B, T, V] log-softmax → [B, T]."""
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens.

    rewards, values, mask: [B, T] (right-padded responses). Returns (advantages, returns), both [B, T], 0 on padding.
    δ_t = r_t + γ V_{t+1} − V_t ;  A_t = δ_t + γλ A_{t+1}  (V and A are 0 after the last real token).
    """
    mask = mask.to(values.dtype)
    values = values * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def policy_loss(logp, old_logp, advantages, mask, clip_eps: float):
    """Clipped surrogate. All [B, T]. Returns (loss, clipfrac, approx_kl) as masked means.

    ρ = exp(log π_θ − log π_old);  L = −E[min(ρA, clip(ρ, 1−ε, 1+ε)A)]
    """
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.max(pg1, pg2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg2 > pg1).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)  # k3 estimator of KL(π_old‖π_θ)
    return loss, clipfrac, approx_kl


def value_loss(values, old_values, returns, mask, clip_eps: float):
    """Clipped value loss ½·max((V−R)², (clip(V, V_old±ε_v) − R)²). All [B, T]. Returns (loss, clipfrac)."""
    v_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    vf1, vf2 = (values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf1, vf2), mask)
    with torch.no_grad():
        # |V − V_old| > ε too: in fp32 V_old + (V − V_old) is not always V, and rounding alone would count as a clip.
        clipped = (vf2 > vf1) & ((values - old_values).abs() > clip_eps)
        clipfrac = masked_mean(clipped.float(), mask)
    return loss, clipfrac


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley–Terry: −log σ(r_w − r_l − m), elementwise. r_*: [...]; margin broadcasts."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def scored_by_every_member(valid: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """valid [B] bool, norm [B, K] member rewards → [B] bool: the kept samples every member scored (a Python reward
    function's None, "not applicable", is a NaN column there) — the ones an ensemble spread is taken over."""
    return valid & torch.isfinite(norm).all(-1)


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Differentiable Pearson correlation of two 1-D tensors (0 when either is constant)."""
    x, y = x - x.mean(), y - y.mean()
    denom = (x.pow(2).sum() * y.pow(2).sum()).sqrt()
    return (x * y).sum() / denom if denom > 0 else x.sum() * 0


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token per row (works for left and right padding). [B, T] → [B]."""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return (positions * attention_mask.long()).argmax(-1)
