"""Reward aggregation plugins and the reward pipeline (members → normalise → aggregate → shape).

Bradley–Terry rewards are shift-invariant, so each member is first normalised with statistics recorded on a
reference set at training time; only then do `min`, `uwo` and the ensemble variance mean anything.
`RewardPipeline` is used by our PPO trainer and is also a valid `reward_funcs` entry for TRL's
GRPOTrainer / RLOOTrainer.
"""

from __future__ import annotations

import math

import torch

from .registry import build, register
from .shaping import ResponseInfo, apply_shapers, build_shapers


class Aggregator:
    name = "base"

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        """r: [B, K] normalised member rewards → [B]."""
        raise NotImplementedError


@register("aggregation", "mean")
class Mean(Aggregator):
    def __call__(self, r):
        return r.mean(-1)


@register("aggregation", "min")
class WorstCase(Aggregator):
    """WCO (Coste et al. 2023): min_i r_i."""

    def __call__(self, r):
        return r.min(-1).values


@register("aggregation", "uwo")
class UncertaintyWeighted(Aggregator):
    """UWO (Coste et al. 2023): mean_i r_i − λ·var_i r_i."""

    def __init__(self, lam: float = 1.0):
        self.lam = lam

    def __call__(self, r):
        var = r.var(-1, unbiased=False) if r.shape[-1] > 1 else torch.zeros_like(r[..., 0])
        return r.mean(-1) - self.lam * var


@register("aggregation", "median")
class Median(Aggregator):
    def __call__(self, r):
        return r.median(-1).values if r.shape[-1] % 2 else r.sort(-1).values[..., r.shape[-1] // 2 - 1 : r.shape[-1] // 2 + 1].mean(-1)


@register("aggregation", "weighted")
class Weighted(Aggregator):
    def __init__(self, weights: list[float]):
        self.weights = torch.tensor(weights, dtype=torch.float)
        if (self.weights < 0).any() or self.weights.sum() <= 0:
            raise ValueError(f"weighted aggregation needs non-negative weights with a positive sum, got {weights}.")

    def __call__(self, r):
        if r.shape[-1] != len(self.weights):
            raise ValueError(f"weighted aggregation has {len(self.weights)} weights for {r.shape[-1]} members.")
        w = self.weights.to(r)
        return (r * w).sum(-1) / w.sum()


# ---------------------------------------------------------------------------------------------------- members
class CallableMember:
    """A Python reward function with TRL's signature: f(prompts, completions, completion_ids, **kw) → list[float]."""

    def __init__(self, fn, name: str | None = None, mean: float = 0.0, std: float = 1.0):
        self.fn, self.names = fn, [name or getattr(fn, "__name__", "callable")]
        self.mean, self.std = torch.tensor([mean]), torch.tensor([std])

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> torch.Tensor:
        out = self.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        return torch.tensor([math.nan if v is None else float(v) for v in out], dtype=torch.float).unsqueeze(-1)


def as_member(obj):
    """Wrap a reward source as a member: a RewardEnsemble / external model (has `score_completions`) or a callable."""
    if hasattr(obj, "score_completions"):
        return obj
    if callable(obj):
        return CallableMember(obj)
    raise TypeError(
        f"A reward member must be a reward-model artifact (rlhf_ext.load_reward_model), an ExternalRewardModel "
        f"or a callable with TRL's reward_funcs signature; got {type(obj).__name__}."
    )


class RewardPipeline:
    """members → per-member normalisation → aggregation → shapers.

    nonfinite: "drop" marks samples with a NaN/inf member reward invalid (they never reach the loss and are
    counted); "error" stops with a message naming the member.
    """

    def __init__(self, members, aggregation="mean", aggregation_kwargs=None, shapers=None, nonfinite="drop",
                 eos_token_id: int | None = None):
        if nonfinite not in ("drop", "error"):
            raise ValueError(f"nonfinite must be 'drop' or 'error', got {nonfinite!r}.")
        members = members if isinstance(members, (list, tuple)) else [members]
        if not members:
            raise ValueError("RewardPipeline needs at least one reward member.")
        self.members = [as_member(m) for m in members]
        self.aggregator = (build("aggregation", aggregation, **(aggregation_kwargs or {}))
                           if isinstance(aggregation, str) else aggregation)
        self.shapers = build_shapers(shapers) if shapers and not hasattr(shapers[0], "additive") else list(shapers or [])
        self.nonfinite, self.eos_token_id = nonfinite, eos_token_id
        self.member_names = [n for m in self.members for n in m.names]
        self.__name__ = f"rlhf_ext_{getattr(self.aggregator, 'name', 'agg')}"

    def score(self, prompts, completions, completion_ids, has_eos=None, **kwargs):
        """Returns (scores [B], valid [B] bool, raw [B, K], normalised [B, K])."""
        raw = torch.cat([m(prompts, completions, completion_ids, **kwargs).float() for m in self.members], -1)
        mean = torch.cat([m.mean for m in self.members]).float()
        std = torch.cat([m.std for m in self.members]).float().clamp(min=1e-6)
        norm = (raw - mean) / std
        valid = torch.isfinite(norm).all(-1)
        if not valid.all() and self.nonfinite == "error":
            bad = [n for n, ok in zip(self.member_names, torch.isfinite(norm).all(0)) if not ok]
            raise ValueError(
                f"Reward member(s) {bad} returned non-finite rewards for {int((~valid).sum())} sample(s). Fix the "
                f"reward function, or set `nonfinite_rewards: drop` to drop such samples and count them."
            )
        safe = torch.where(valid.unsqueeze(-1), norm, torch.zeros_like(norm))
        agg = self.aggregator(safe)
        info = ResponseInfo.from_ids(completion_ids, self.eos_token_id)
        if has_eos is not None:
            info.has_eos = torch.as_tensor(has_eos, dtype=torch.bool)
        scores = apply_shapers(self.shapers, agg, info)
        return torch.where(valid, scores, torch.zeros_like(scores)), valid, raw, norm

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs):
        """TRL `reward_funcs` signature. Dropped samples come back as None (TRL treats them as missing)."""
        scores, valid, _, _ = self.score(prompts, completions, completion_ids, **kwargs)
        return [float(s) if v else None for s, v in zip(scores, valid)]

    def state_dict(self):
        return {"shapers": [s.state_dict() for s in self.shapers]}

    def load_state_dict(self, state):
        for s, st in zip(self.shapers, state.get("shapers", [])):
            s.load_state_dict(st)


class ExternalRewardModel:
    """A full reward model with its own tokenizer (e.g. a Hub `AutoModelForSequenceClassification`).

    Completions are decoded text, re-rendered in this model's format and re-tokenised (its vocabulary may differ
    from the policy's).
    """

    def __init__(self, model, tokenizer, name: str = "external", mean: float = 0.0, std: float = 1.0,
                 batch_size: int = 16):
        from .models import ensure_pad_token

        self.model, self.tokenizer = model.eval(), ensure_pad_token(tokenizer)
        self.names, self.batch_size = [name], batch_size
        self.mean, self.std = torch.tensor([mean]), torch.tensor([std])

    @torch.no_grad()
    def score_completions(self, prompts, completions, completion_ids=None, **kwargs) -> torch.Tensor:
        from .reward_model import pad_ids, reward_input_ids

        prompts = prompts if prompts is not None else [None] * len(completions)
        seqs = [reward_input_ids(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(seqs), self.batch_size):
            ids, mask = pad_ids(seqs[i : i + self.batch_size], self.tokenizer.pad_token_id, device=device)
            out.append(self.model(input_ids=ids, attention_mask=mask).logits[:, :1].float().cpu())
        return torch.cat(out)

    __call__ = score_completions
