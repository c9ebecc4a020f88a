"""Reward shaping plugins against length and repetition hacking.

A shaper maps sequence scores [B] to shaped scores [B] given the responses' lengths, EOS flags and token
ids. Additive shapers also work alone as TRL `reward_funcs` (see `as_reward_func`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..registry import build, register
from .contract import checked_output


@dataclass
class ResponseInfo:
    """What shapers may look at. lengths: [B] response tokens *excluding* a final EOS (the content the reader sees;
    an answer that ends properly is not charged for its stop token); has_eos: [B] bool; ids: B lists of token ids
    (EOS included when present); valid: [B] bool or None, the samples whose reward was kept (a dropped one's score
    reaches a shaper as 0: batch statistics must leave it out)."""

    lengths: torch.Tensor
    has_eos: torch.Tensor
    ids: list
    valid: torch.Tensor | None = None

    @classmethod
    def from_ids(cls, ids: list, eos_token_id: int | list | None = None):
        """`eos_token_id`: the stop id, or several (a chat model's turn end beside its tokenizer's EOS)."""
        ids = [list(map(int, x)) for x in ids]
        stop = set() if eos_token_id is None else set(eos_token_id) if isinstance(eos_token_id, (list, tuple, set)) \
            else {eos_token_id}
        has_eos = [len(x) > 0 and x[-1] in stop for x in ids]
        lengths = [len(x) - int(e) for x, e in zip(ids, has_eos)]
        return cls(torch.tensor(lengths, dtype=torch.float), torch.tensor(has_eos), ids)

    @property
    def content(self) -> list:
        return content_ids(self.ids, self.lengths)


def content_ids(ids: list, lengths) -> list:
    """Each response's tokens without its final EOS — what the reader sees, so an answer that ends properly and one
    cut off are charged alike. ids: B lists; lengths: [B] content lengths (tensor or numbers)."""
    lengths = lengths.tolist() if hasattr(lengths, "tolist") else lengths
    return [x[: int(L)] for x, L in zip(ids, lengths)]


class Shaper:
    name = "base"
    additive = True  # penalty independent of the score → usable alone as a TRL reward function

    def __call__(self, scores: torch.Tensor, info: ResponseInfo) -> torch.Tensor:
        """scores [B] → shaped scores [B] (a float tensor; checked by the reward pipeline)."""
        raise NotImplementedError(f"The shaper {self.name!r} must implement __call__(scores [B], info) -> [B].")

    def idle_within(self, max_completion_length: int) -> str | None:
        """Why this shaper can never charge a response of at most `max_completion_length` tokens (None: it can).
        The trainer warns at start-up: a length budget past the completion cap is a shaper silently switched off."""
        return None

    # A shaper that carries something between batches (debias's slope) overrides both: its state_dict() is saved with
    # each checkpoint (JSON: numbers, strings, lists, dicts) and handed back to load_state_dict() on resume.
    @property
    def stateful(self) -> bool:
        return type(self).state_dict is not Shaper.state_dict

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _charges(shaper: str, **values) -> None:
    """A shaper's charges and lengths are ≥ 0: a negative charge would pay for what the shaper exists to charge, and a
    negative length budget or target has no meaning."""
    bad = {k: v for k, v in values.items() if v < 0}
    if bad:
        raise ValueError(f"The {shaper!r} shaper's {', '.join(f'{k}={v}' for k, v in bad.items())} is negative (a "
                         f"negative charge would reward what the shaper charges); give a value ≥ 0 (a charge of 0 "
                         f"switches it off).")


@register("shaper", "linear")
class LinearLength(Shaper):
    """r − α·max(0, L − L₀): charge every token past a free budget L₀."""

    def __init__(self, alpha: float = 0.01, free_tokens: int = 0):
        _charges("linear", alpha=alpha, free_tokens=free_tokens)
        self.alpha, self.free_tokens = alpha, free_tokens

    def __call__(self, scores, info):
        return scores - self.alpha * (info.lengths - self.free_tokens).clamp(min=0)

    def idle_within(self, max_completion_length):
        if self.alpha > 0 and self.free_tokens >= max_completion_length:
            return f"free_tokens={self.free_tokens} is at least max_completion_length={max_completion_length}"
        return None


@register("shaper", "target")
class TargetLength(Shaper):
    """r − α·|L − L*|: pull lengths towards a target."""

    def __init__(self, alpha: float = 0.01, target_length: int = 32):
        _charges("target", alpha=alpha, target_length=target_length)
        self.alpha, self.target_length = alpha, target_length

    def __call__(self, scores, info):
        return scores - self.alpha * (info.lengths - self.target_length).abs()


@register("shaper", "overlong")
class Overlong(Shaper):
    """DAPO eq. 13: 0 if L ≤ L_max − L_c; ((L_max − L_c) − L)/L_c if L ≤ L_max; −1 beyond (times `coef`)."""

    def __init__(self, max_length: int = 48, cache_length: int = 16, coef: float = 1.0):
        if not 0 < cache_length <= max_length:
            raise ValueError(f"overlong needs 0 < cache_length ≤ max_length, got {cache_length}, {max_length}.")
        _charges("overlong", coef=coef)
        self.max_length, self.cache_length, self.coef = max_length, cache_length, coef

    def __call__(self, scores, info):
        L, soft = info.lengths, self.max_length - self.cache_length
        penalty = torch.where(L <= soft, torch.zeros_like(L), (soft - L) / self.cache_length)
        penalty = torch.where(L > self.max_length, torch.full_like(L, -1.0), penalty)
        return scores + self.coef * penalty

    def idle_within(self, max_completion_length):
        soft = self.max_length - self.cache_length
        if self.coef > 0 and soft >= max_completion_length:
            return (f"it charges past max_length - cache_length = {soft} tokens, and max_completion_length="
                    f"{max_completion_length} (DAPO's max_length is the completion cap: set max_length="
                    f"{max_completion_length})")
        return None


@register("shaper", "debias")
class LengthDebias(Shaper):
    """Remove the reward–length regression slope: r − b·(L − L̄), b = Cov(r, L)/Var(L).

    b is an exponential moving average over batches (`momentum`) so one odd batch cannot flip the sign.
    """

    additive = False

    def __init__(self, momentum: float = 0.9):
        self.momentum, self.slope, self.mean_length = momentum, None, None

    def __call__(self, scores, info):
        L = info.lengths.to(scores.dtype)
        keep = torch.ones_like(L, dtype=torch.bool) if info.valid is None else info.valid.to(torch.bool)
        r, Lk = scores[keep], L[keep]  # the regression over the samples whose reward was kept
        if Lk.numel() > 1 and Lk.var() > 0:
            b = ((r - r.mean()) * (Lk - Lk.mean())).mean() / Lk.var(unbiased=False)
            m = self.momentum if self.slope is not None else 0.0
            self.slope = float(m * (self.slope or 0.0) + (1 - m) * b)
            self.mean_length = float(m * (self.mean_length or 0.0) + (1 - m) * Lk.mean())
        if self.slope is None:
            return scores
        return scores - self.slope * (L - self.mean_length)

    def state_dict(self):
        return {"slope": self.slope, "mean_length": self.mean_length}

    def load_state_dict(self, state):
        self.slope, self.mean_length = state.get("slope"), state.get("mean_length")


@register("shaper", "missing_eos")
class MissingEOS(Shaper):
    """r − p for responses that hit the length limit without EOS (truncated answers)."""

    def __init__(self, penalty: float = 1.0):
        _charges("missing_eos", penalty=penalty)
        self.penalty = penalty

    def __call__(self, scores, info):
        return scores - self.penalty * (~info.has_eos).to(scores.dtype)


def ngrams(seq, n: int) -> list[tuple]:
    """The n-grams of a sequence (token ids or words), in order, repeats kept."""
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def repeated_ngram_fraction(ids: list, n: int = 3) -> float:
    """1 − unique/total n-grams: 0 for fresh text, → 1 for "The answer is yes. The answer is yes. …"."""
    grams = ngrams(ids, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


@register("shaper", "repetition")
class Repetition(Shaper):
    """r − α·(repeated n-gram fraction of the content: the final EOS left out)."""

    def __init__(self, alpha: float = 1.0, n: int = 3):
        _charges("repetition", alpha=alpha)
        if n < 1:
            raise ValueError(f"repetition needs n ≥ 1 (the n-gram length), got n={n}.")
        self.alpha, self.n = alpha, n

    def __call__(self, scores, info):
        frac = torch.tensor([repeated_ngram_fraction(x, self.n) for x in info.content], dtype=scores.dtype)
        return scores - self.alpha * frac


def shared_ngram_fractions(ids: list, n: int = 2) -> list[float]:
    """For each response, the share of its distinct n-grams that another response of the same batch also uses.

    ids: B lists of content token ids. [B] floats in [0, 1]: 0 for wording no other answer shares, 1 when every
    n-gram also appears elsewhere (every answer opening "What a wonderful …"); a response with no n-gram scores 0."""
    grams = [set(ngrams(x, n)) for x in ids]
    users: dict[tuple, int] = {}  # n-gram → how many responses use it
    for g in grams:
        for t in g:
            users[t] = users.get(t, 0) + 1
    return [sum(users[t] > 1 for t in g) / len(g) if g else 0.0 for g in grams]


@register("shaper", "batch_novelty")
class BatchNovelty(Shaper):
    """r − α·(share of the response's n-grams that other responses in the batch also use).

    Against the policy settling on one stock phrasing for every prompt, which a per-response repetition penalty
    cannot see: each answer may be fresh on its own while the corpus loses diversity (distinct-n falls). Only the
    content counts (the final EOS is left out); under DDP each process compares within its own batch."""

    def __init__(self, alpha: float = 0.5, n: int = 2):
        _charges("batch_novelty", alpha=alpha)
        if n < 1:
            raise ValueError(f"batch_novelty needs n ≥ 1 (the n-gram length), got n={n}.")
        self.alpha, self.n = alpha, n

    def __call__(self, scores, info):
        shared = torch.tensor(shared_ngram_fractions(info.content, self.n), dtype=scores.dtype)
        return scores - self.alpha * shared


def build_shapers(specs) -> list[Shaper]:
    """From config: a list of names or {"name": ..., **kwargs} dicts (YAML friendly)."""
    out = []
    for spec in specs or []:
        if isinstance(spec, str):
            spec = {"name": spec}
        spec = dict(spec)
        out.append(build("shaper", spec.pop("name"), **spec))
    return out


def reward_func_name(name):
    """A reward function's given name (None: its default), checked: TRL keys its metrics and completions column by it."""
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"name must be a non-empty string (TRL logs rewards/<name>/mean), got {name!r}.")
    return name


def _warn_if_other_stop(completion_ids, stop: list[int], tokenizer, warned: list) -> None:
    """Said once: completions end with a special token other than the stop ids — a chat model's turn end, most
    likely, which `as_reward_func(..., model=policy)` would count as the end."""
    special = set(tokenizer.all_special_ids) - set(stop)
    ends = {int(c[-1]) for c in completion_ids if len(c)} & special
    if ends:
        warned.append(True)
        names = ", ".join(sorted(tokenizer.convert_ids_to_tokens(sorted(ends))))
        warnings.warn(f"Completions end with {names}, a special token that is not the tokenizer's EOS "
                      f"({tokenizer.eos_token!r}): this reward function counts it as content and the answer as "
                      f"unfinished. If the model stops there (its generation_config.eos_token_id), pass the policy: "
                      f"as_reward_func(shaper, tokenizer, model=model).", stacklevel=3)


def as_reward_func(shaper: Shaper, tokenizer=None, name: str | None = None, model=None):
    """Wrap an additive shaper as a TRL reward function: returns only its penalty term for each completion.

    name: its `__name__`, which TRL keys its metrics and completions column by (default `shaper_<shaper name>`:
    give two penalties from one shaper distinct names, or TRL averages their metrics together). Beside a
    `RewardPipeline` whose members can return None, put the shaper in the pipeline's `shapers=` instead: TRL trains
    on a sample any reward function scores, so this penalty would be trained on where the pipeline dropped it.
    model: the policy (or anything with its `generation_config`): a completion ends at the tokenizer's EOS or at any
    id of `generation_config.eos_token_id` — chat models stop at a turn end (`<|eot_id|>`, `<end_of_turn>`,
    `<|im_end|>`) that is not their tokenizer's EOS, as TRL's trainers do. Without it, only the tokenizer's EOS.
    """
    from ..data import stop_token_ids

    reward_func_name(name)
    if not shaper.additive:
        raise ValueError(
            f"Shaper {shaper.name!r} depends on the reward itself; wrap your reward in `RewardPipeline(..., "
            f"shapers=[...])` instead of passing it alone as a reward function."
        )

    def reward_func(prompts=None, completions=None, completion_ids=None, **kwargs):
        if completion_ids is None:
            raise ValueError("This reward function needs `completion_ids` (TRL passes them to reward functions).")
        info = ResponseInfo.from_ids(completion_ids, stop)
        if model is None and tokenizer is not None and not warned:
            _warn_if_other_stop(completion_ids, stop, tokenizer, warned)
        zero = torch.zeros(len(completion_ids), dtype=torch.float)
        return checked_output(shaper(zero, info), zero, "shaper", shaper.name, "one score per completion").tolist()

    stop, warned = stop_token_ids(tokenizer, model), []

    reward_func.__name__ = name or f"shaper_{shaper.name}"
    return reward_func
