"""The reward pipeline: members → per-member normalisation → aggregation → shapers.

Bradley–Terry rewards are shift-invariant, so each reward-model member is normalised with statistics recorded on
a reference set at training time; Python callables and outside reward models (`ExternalRewardModel` without a given
mean/std) have no such record, so by default they are normalised with a running mean/std whenever they are mixed
with other members (see `callable_normalization`). Only after that do
`min`, `uwo` and the ensemble variance mean anything. `RewardPipeline` is used by our PPO trainer and is also a
valid `reward_funcs` entry for TRL's GRPOTrainer / RLOOTrainer.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import warnings
from collections.abc import Mapping
from contextlib import nullcontext

import torch
from transformers import TrainerCallback

from ..models import position_limit
from ..plugins.contract import checked_output
from ..plugins.shaping import ResponseInfo, build_shapers, reward_func_name
from ..registry import build, numbered
from ..rl_math import scored_by_every_member
from ..trainer_state import claim_checkpoint_key, save_with_checkpoint, saved_with_checkpoint

CALLABLE_NORMALIZATION = ("auto", "running", "none")
# A whole batch dropped stops the run only once this many samples in a row were dropped (and always when the batch
# alone is that large): a reward function that fails for everything, not one unlucky small batch — with 1 to 4
# prompts per iteration and a judge that sometimes returns None, a whole batch of None comes sooner or later.
MIN_DROPPED_IN_A_ROW = 16


def rendering_kwargs(chat_template_kwargs, columns: dict) -> dict:
    """What a reward model's `score_completions` renders prompt + completion with: the chat template's extra
    arguments, and the rows' `tools` where the data has that column (TRL's reward trainer renders it)."""
    tools = columns.get("tools")
    return {"chat_template_kwargs": chat_template_kwargs, **({"tools": tools} if tools is not None else {})}


def call_reward_function(fn, accepted: frozenset | None = None, **kwargs):
    """fn(**kwargs), keeping only the keywords it takes: all of them when it has `**kwargs` (TRL's reward signature),
    else the ones it names — so a function written for prompts/completions/completion_ids alone keeps working beside
    the dataset columns, `trainer_state`, `log_metric` and `log_extra` (`accepted`: `accepted_keywords(fn)`, computed
    once)."""
    accepted = accepted_keywords(fn) if accepted is None else accepted
    out = fn(**(kwargs if "**" in accepted else {k: v for k, v in kwargs.items() if k in accepted}))
    return _awaited(out) if inspect.isawaitable(out) else out


def _awaited(awaitable):
    """The result of an async reward function (an LLM judge, say; TRL's GRPO takes them too), run to completion on
    a fresh event loop in a worker thread: that works inside a running loop as well (a notebook's)."""
    from concurrent.futures import ThreadPoolExecutor

    async def wait():
        return await awaitable

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, wait()).result()


def accepted_keywords(fn) -> frozenset:
    """The keyword names `fn` takes, with "**" among them when it takes any (or its signature cannot be read)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or an extension callable: hand it everything
        return frozenset({"**"})
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return frozenset({"**"})
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


class RunningNormalization:
    """A member whose scale is not known in advance: with `normalize="running"` its scores are centred and scaled by
    the mean/std of every finite score it has returned so far (Welford; saved with the trainer's checkpoint);
    `"none"` passes them through."""

    normalize = "none"
    count, running_mean, m2 = 0, 0.0, 0.0

    def _observe(self, r: torch.Tensor) -> None:
        if self.normalize == "running":
            for v in r[torch.isfinite(r)].tolist():  # Welford: exact running mean and variance
                self.count += 1
                d = v - self.running_mean
                self.running_mean += d / self.count
                self.m2 += d * (v - self.running_mean)

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor([self.running_mean if self.normalize == "running" else 0.0], dtype=torch.float)

    @property
    def std(self) -> torch.Tensor:
        if self.normalize != "running" or self.count < 2:
            return torch.tensor([1.0], dtype=torch.float)
        return torch.tensor([max(math.sqrt(self.m2 / (self.count - 1)), 1e-6)], dtype=torch.float)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.running_mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.running_mean, self.m2 = state["count"], state["mean"], state["m2"]


class CallableMember(RunningNormalization):
    """A Python reward function with TRL's signature: f(prompts, completions, completion_ids, **kw) → list[float],
    normalised as `RunningNormalization` says."""

    def __init__(self, fn, name: str | None = None, normalize: str = "none"):
        if normalize not in ("running", "none"):
            raise ValueError(f"normalize must be 'running' or 'none', got {normalize!r}.")
        self.fn, self.names, self.normalize = fn, [name or getattr(fn, "__name__", "callable")], normalize
        self.accepted = accepted_keywords(fn)

    def score_completions(self, prompts, completions, completion_ids, **kwargs) -> torch.Tensor:
        """→ [B, 1] raw scores (NaN where the function returned None)."""
        out = call_reward_function(self.fn, self.accepted, prompts=prompts, completions=completions,
                                   completion_ids=completion_ids, **kwargs)
        n = len(completions)
        if isinstance(out, torch.Tensor):
            out = out.detach().flatten().tolist()
        elif getattr(out, "ndim", 0) > 1 and hasattr(out, "reshape"):  # a numpy column [B, 1], as a tensor's
            out = out.reshape(-1).tolist()
        if isinstance(out, Mapping):  # iterating it would read its keys as the scores (TRL's list() does)
            raise TypeError(f"Reward function {self.names[0]!r} returned a {type(out).__name__}; it must return a list "
                            f"of {n} floats in the order of the completions (None marks a missing score).")
        if not hasattr(out, "__len__") or isinstance(out, (str, bytes)):
            raise TypeError(f"Reward function {self.names[0]!r} returned {type(out).__name__} {out!r:.60}; it must "
                            f"return a list of {n} floats (one per completion; None marks a missing score).")
        if len(out) != n:
            raise ValueError(f"Reward function {self.names[0]!r} returned {len(out)} scores for {n} completions; it "
                             f"must return exactly one score per completion.")
        text = next((v for v in out if isinstance(v, (str, bytes))), None)
        if text is not None:  # float("0.5") would read it, as TRL (torch.tensor) would not: a judge's raw text, likely
            raise TypeError(f"Reward function {self.names[0]!r} returned text among its scores ({text!r:.40}); return "
                            f"numbers — parse a judge's answer with float() in the function — or None for a missing "
                            f"score.")
        try:
            vals = [math.nan if v is None else float(v) for v in out]
        except (TypeError, ValueError, OverflowError) as e:
            raise TypeError(f"Reward function {self.names[0]!r} returned a non-number among its scores ({e}); "
                            f"return floats, or None for a missing score.") from None
        r = torch.tensor(vals, dtype=torch.float).unsqueeze(-1)
        self.last_none = torch.tensor([v is None for v in out], dtype=torch.bool).unsqueeze(-1)  # "not applicable"
        self._observe(r)
        return r

    __call__ = score_completions


def _over_members(aggregator, cols: torch.Tensor):
    """The aggregation for samples only the members `cols` ([K] bool) scored (a Python function's None: not
    applicable), or None where the aggregation cannot take fewer columns. `mean` and `weighted` are TRL's nansum on
    the scale of a sample every member scored (Σ over the members that scored wᵢrᵢ / Σ over all |wᵢ|; mean: wᵢ = 1):
    a member's weight means the same on every sample, and a sample only zero-weighted members scored gets 0. `min`,
    `uwo`, `median` and a plugin with `missing_members = True` are handed those columns; any other plugin, written for
    K columns, gets None (its samples are dropped, said by the pipeline)."""
    from ..plugins.aggregation import Mean, Weighted

    if isinstance(aggregator, Weighted):
        w, total = aggregator.weights[cols], aggregator.weights.abs().sum()
        return lambda r: (r * w.to(r)).sum(-1) / total.to(r)
    if isinstance(aggregator, Mean):
        k = len(cols)
        return lambda r: r.sum(-1) / k
    return aggregator if getattr(aggregator, "missing_members", False) else None


def as_member(obj, normalize: str = "none"):
    """Wrap a reward source as a member: a RewardEnsemble / external model (has `score_completions`) or a callable.
    `normalize` applies to the members whose scale is unknown: callables, and external models without mean/std."""
    if hasattr(obj, "score_completions"):
        if isinstance(obj, ExternalRewardModel) and obj.fixed is None:
            obj.normalize = normalize
        return obj
    if callable(obj):
        return CallableMember(obj, normalize=normalize)
    raise TypeError(
        f"A reward member must be a reward-model artifact (rlhf_ext.load_reward_model), an ExternalRewardModel "
        f"or a callable with TRL's reward_funcs signature; got {type(obj).__name__}."
    )


class RewardPipeline:
    """members → per-member normalisation → aggregation → shapers.

    A Python function's None is "not applicable" (TRL's reward_funcs contract): the sample is scored by the members
    that did score it (the aggregation over those; `weighted` with their weights). A sample no member scored, or one
    with a NaN / inf member reward, is non-finite.
    nonfinite: "drop" marks non-finite samples invalid (they never reach the loss; a warning with counts on the
    first occurrence; a whole batch dropped trains on nothing, an error once `MIN_DROPPED_IN_A_ROW` samples in a row
    — or a whole batch of at least that many — are dropped); "error" stops at once, naming the member.
    callable_normalization: "auto" (running mean/std for Python callables when there is more than one member
    column, raw scores when a callable is the only reward), "running" or "none".
    name: its `__name__`, which TRL's GRPOTrainer / RLOOTrainer key its metrics and completions column by (default
    `rlhf_ext_<aggregation>`: give two pipelines in one trainer distinct names, or their metrics are averaged
    together).

    As a TRL `reward_funcs` entry it returns None for a dropped sample, and logs through TRL's `log_metric`
    `rewards/dropped_nonfinite` (samples dropped in the batch), `rewards/<member>_raw` (each member's raw mean over the
    samples kept) and, with more than one member column, `rewards/ensemble_std` (the members' disagreement). Its
    running statistics survive a TRL resume with `callbacks=[pipeline.callback()]`.
    """

    def __init__(self, members, aggregation="mean", aggregation_kwargs=None, shapers=None, nonfinite="drop",
                 eos_token_id: int | list[int] | None = None, callable_normalization: str = "auto", name: str | None = None):
        if nonfinite not in ("drop", "error"):
            raise ValueError(f"nonfinite must be 'drop' or 'error', got {nonfinite!r}.")
        if callable_normalization not in CALLABLE_NORMALIZATION:
            raise ValueError(f"callable_normalization must be one of {CALLABLE_NORMALIZATION}, got "
                             f"{callable_normalization!r}.")
        members = members if isinstance(members, (list, tuple)) else [members]
        if not members:
            raise ValueError("RewardPipeline needs at least one reward member.")
        columns = sum(len(getattr(m, "names", [None])) for m in members)
        norm = {"auto": "running" if columns > 1 else "none"}.get(callable_normalization, callable_normalization)
        self.members = [as_member(m, norm) for m in members]
        self.aggregator = (build("aggregation", aggregation, **(aggregation_kwargs or {}))
                           if isinstance(aggregation, str) else aggregation)
        self.shapers = build_shapers(shapers) if shapers and not hasattr(shapers[0], "additive") else list(shapers or [])
        self.nonfinite, self.eos_token_id = nonfinite, eos_token_id
        # the chat template's extra arguments the policy's prompts were rendered with (PPOConfig.chat_template_kwargs):
        # reward models render prompt + completion with them too
        self.chat_template_kwargs = None
        # a repeated name (two artifacts' "member_0") numbered from its second occurrence: each member keeps its own
        # metric (`rewards/<name>_raw`) instead of one overwriting the other's
        self.member_names = list(numbered([n for m in self.members for n in m.names], lambda n: n))
        weights = getattr(self.aggregator, "weights", None)
        if weights is not None and len(weights) != len(self.member_names):
            raise ValueError(f"aggregation weights: {len(weights)} given for {len(self.member_names)} member columns "
                             f"({', '.join(self.member_names)}). Give one weight per column, in that order: a reward "
                             f"model trained with ensemble_size K contributes K columns.")
        self.dropped_total, self._warned, self._warned_eos, self._warned_whole = 0, False, False, False
        self.dropped_in_a_row = 0  # samples dropped since the last one kept (the whole-batch rule)
        # what made samples non-finite last, and its fix: the trainer's error when a whole global batch is dropped
        self.last_nonfinite = ("the reward functions returned non-finite rewards", "Check the reward function")
        # a batch that is one process's share of the trainer's (PPOTrainer under DDP): a share with every sample
        # dropped is not the end of the run, the trainer decides on the whole batch
        self.batch_is_a_share = False
        # the context reward *models* score in (PPOTrainer: the policy's precision, which a member on its base shares);
        # Python functions are called outside it, as TRL's GRPOTrainer calls them
        self.model_precision = nullcontext
        self.__name__ = reward_func_name(name) or f"rlhf_ext_{getattr(self.aggregator, 'name', 'agg')}"

    def _member_scores(self, m, prompts, completions, completion_ids, kwargs) -> torch.Tensor:
        if isinstance(m, CallableMember):
            return m.score_completions(prompts, completions, completion_ids, **kwargs).float()
        with self.model_precision():
            return m.score_completions(prompts, completions, completion_ids,
                                       **rendering_kwargs(self.chat_template_kwargs, kwargs)).float()

    def score(self, prompts, completions, completion_ids, has_eos=None, **kwargs):
        """Returns (scores [B], valid [B] bool, raw [B, K], normalised [B, K])."""
        return self._score(prompts, completions, completion_ids, has_eos, kwargs, _DROPPED_BY_PPO)

    def _score(self, prompts, completions, completion_ids, has_eos, kwargs, fate, whole_batch_may_drop=False):
        """`score`, with `fate`: what becomes of a dropped sample where the caller uses the result (for the warning);
        `whole_batch_may_drop`: every sample dropped is the caller's to handle (TRL leaves them out)."""
        # keywords (dataset columns, trainer_state, log_metric) go to Python functions; reward models score text
        parts = [self._member_scores(m, prompts, completions, completion_ids, kwargs) for m in self.members]
        raw = torch.cat(parts, -1)
        # None from a Python function is "not applicable" (TRL's reward_funcs contract): with other members the sample
        # is scored by those that did score it; NaN / inf is a broken score and drops the sample
        absent = torch.cat([m.last_none if isinstance(m, CallableMember) and m.last_none.shape == x.shape
                            else torch.zeros_like(x, dtype=torch.bool) for m, x in zip(self.members, parts)], -1)
        mean = torch.cat([m.mean for m in self.members]).float()
        std = torch.cat([m.std for m in self.members]).float().clamp(min=1e-6)
        norm = (raw - mean) / std
        finite = torch.isfinite(norm)
        valid = (finite | absent).all(-1) & finite.any(-1)
        if not valid.all():
            # on the dropped samples: a NaN / inf, or a None where every member said None (one beside another's
            # score or NaN is "not applicable", not the cause)
            blamed = ~valid.unsqueeze(-1) & ~finite & (~absent | absent.all(-1, keepdim=True))
            bad = [n for n, hit in zip(self.member_names, blamed.any(0)) if hit]
            self._handle_nonfinite(~valid, valid, f"Reward member(s) {bad} returned non-finite rewards",
                                   "Fix the reward function", fate, whole_batch_may_drop)
        present = finite & valid.unsqueeze(-1)
        safe = torch.where(present, norm, torch.zeros_like(norm))
        scores, valid = self._plugin_step(self.aggregator, "aggregation", safe, valid, fate, whole_batch_may_drop,
                                          present=present)
        if self.eos_token_id is None and self.shapers and has_eos is None and not self._warned_eos:
            self._warned_eos = True
            warnings.warn("RewardPipeline has shapers but no eos_token_id, so no completion counts as ended: "
                          "missing_eos charges every one and the length shapers count a final EOS as content. Pass "
                          "eos_token_id=rlhf_ext.data.stop_token_ids(tokenizer, model).", UserWarning, stacklevel=4)
        info = ResponseInfo.from_ids(completion_ids, self.eos_token_id)
        if has_eos is not None:
            info.has_eos = torch.as_tensor(has_eos, dtype=torch.bool)
        for shaper in self.shapers:
            info.valid = valid
            scores, valid = self._plugin_step(shaper, "shaper", scores, valid, fate, whole_batch_may_drop, info)
        self.dropped_in_a_row = 0 if valid.any() else self.dropped_in_a_row + len(valid)
        if not valid.any() and not (self.batch_is_a_share or whole_batch_may_drop) and not self._warned_whole:
            self._warned_whole = True
            warnings.warn(f"Every sample of this batch ({len(valid)}) was dropped (non-finite rewards): it trains on "
                          f"nothing. The run stops once {MIN_DROPPED_IN_A_ROW} samples in a row are dropped. This "
                          f"warning is shown once; rewards/dropped_nonfinite counts them.", stacklevel=4)
        return scores, valid, raw, norm

    def _plugin_step(self, plugin, point, x, valid, fate, whole_batch_may_drop, *more, present=None):
        """The aggregation (x = normalised members [B, K]) or a shaper (x = scores [B]): its output checked (one float
        per sample), and a sample it makes non-finite dropped like a member's NaN (`nonfinite_rewards`) — one NaN
        would otherwise make every PPO step of the batch NaN. Dropped samples go on as 0. `present` [B, K]: the
        members that scored each sample (a Python function's None: not applicable), which the aggregation sees."""
        name = getattr(plugin, "name", type(plugin).__name__)
        if present is None or present[valid].all():
            out = checked_output(plugin(x, *more), valid.float(), point, name, "one score per sample")
        else:  # some samples scored by some members only: aggregated over those, one pattern of members at a time
            out = torch.zeros(len(x), dtype=torch.float)
            refused = torch.zeros_like(valid)
            for cols in torch.unique(present[valid], dim=0):
                rows = valid & (present == cols).all(-1)
                agg = plugin if cols.all() else _over_members(plugin, cols)
                if agg is None:
                    refused |= rows
                    continue
                out[rows] = checked_output(agg(x[rows][:, cols]), valid[rows].float(), point, name,
                                           "one score per sample")
            if refused.any():
                self._handle_nonfinite(refused, valid & ~refused, f"The {point} {name!r} takes every member's column "
                                       f"(set `missing_members = True` on {type(plugin).__name__} to be handed [B, k] "
                                       f"columns of the members that scored instead), and a member returned None (not "
                                       f"applicable)", "Score every sample in the reward functions", fate,
                                       whole_batch_may_drop)
                valid = valid & ~refused
        ok = torch.isfinite(out)
        if not (ok | ~valid).all():
            self._handle_nonfinite(valid & ~ok, valid & ok, f"The {point} {name!r} returned non-finite "
                                   f"scores", f"Fix the {point}", fate, whole_batch_may_drop)
            valid = valid & ok
        return torch.where(valid, out, torch.zeros_like(out)), valid

    def _handle_nonfinite(self, dropped, valid, what, fix, fate=None, whole_batch_may_drop=False):
        """`dropped`: the samples `what` makes non-finite (newly); `valid`: those left. `fate`: a str, or a function
        giving it, saying what the caller does with the dropped samples (PPOTrainer's by default); the warning must
        not promise a drop that the caller does not make."""
        n_bad, B = int(dropped.sum()), len(valid)
        self.last_nonfinite = (what, fix)
        if self.nonfinite == "error":
            raise ValueError(f"{what} (NaN, inf or None) for {n_bad} of {B} sample(s). {fix}, or set "
                             f"`nonfinite_rewards: drop` to drop "
                             f"such samples and count them.")
        in_a_row = self.dropped_in_a_row + B  # with this batch's
        if not valid.any() and not (self.batch_is_a_share or whole_batch_may_drop) and in_a_row >= MIN_DROPPED_IN_A_ROW:
            before = f" and the {in_a_row - B} before it" if in_a_row > B else ""
            raise ValueError(f"Every sample of the batch ({B}){before} got a non-finite reward ({what} for {n_bad}): "
                             f"nothing is left to train on. {fix} (it returns NaN/inf/None for everything).")
        self.dropped_total += n_bad
        if not self._warned:
            self._warned = True
            fate = fate or _DROPPED_BY_PPO
            warnings.warn(f"{what} for {n_bad} of {B} samples; {fate() if callable(fate) else fate} This warning is "
                          f"shown once.", stacklevel=4)

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs):
        """TRL `reward_funcs` signature. Dropped samples come back as None: TRL leaves a completion out only when
        every reward function returns None for it (see `_fate_in_trainer`). With TRL's `log_metric`, logs the
        pipeline's metrics (see the class docstring)."""
        has_eos, log_metric = kwargs.pop("has_eos", None), kwargs.get("log_metric")
        trainer = getattr(log_metric, "__self__", None)  # TRL passes its bound `_log_metric`
        # PPOTrainer sets what it needs on its own pipeline; one nested in it as a member must not overwrite its metrics
        in_ppo = isinstance(getattr(trainer, "rewards", None), RewardPipeline)
        in_trl = trainer is not None and not in_ppo
        if in_trl:
            self._follow_trainer(trainer)
        # an evaluation batch (TRL's own test: the model in eval mode) must leave the running statistics and the
        # shapers' state as training left them — a resumed run would otherwise normalise otherwise
        training = not in_trl or getattr(getattr(trainer, "model", None), "training", True)
        before = None if training else self.state_dict()
        try:
            scores, valid, raw, norm = self._score(prompts, completions, completion_ids, has_eos, kwargs,
                                                   lambda: _fate_in_trainer(trainer), whole_batch_may_drop=True)
        finally:
            if before is not None:
                self._set_state(before)
        if callable(log_metric) and not in_ppo:
            self._log_metrics(log_metric, valid, raw, norm)
        return [float(s) if v else None for s, v in zip(scores, valid)]

    def _follow_trainer(self, trainer) -> None:
        """Under TRL's GRPOTrainer / RLOOTrainer, what the trainer knows and the pipeline was not given: where its
        completions stop (the tokenizer's EOS and the model's generation_config ids) and the chat template's
        arguments the prompts were rendered with (reward models render prompt + completion with them too)."""
        if self.eos_token_id is None:
            from ..data import stop_token_ids

            tokenizer = getattr(trainer, "processing_class", None)
            tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's
            self.eos_token_id = stop_token_ids(tokenizer, getattr(trainer, "model", None)) or None
        if self.chat_template_kwargs is None:
            kwargs = getattr(trainer, "chat_template_kwargs", None) or getattr(getattr(trainer, "args", None),
                                                                               "chat_template_kwargs", None)
            self.chat_template_kwargs = dict(kwargs) if kwargs else None

    def _log_metrics(self, log_metric, valid, raw, norm) -> None:
        """PPOTrainer's reward metrics, through TRL's `log_metric` (which averages them over the logging window and
        the processes): samples dropped in this batch, each member's raw mean over the samples kept (a dropped
        sample's NaN would make it NaN), the members' disagreement on the samples kept."""
        log_metric("rewards/dropped_nonfinite", float((~valid).sum()))
        if not valid.any():
            return
        for j, name in enumerate(self.member_names):
            scored = valid & torch.isfinite(raw[:, j])  # a member's None (not applicable) is no score
            if scored.any():
                log_metric(f"rewards/{name}_raw", float(raw[scored, j].mean()))
        full = scored_by_every_member(valid, norm)
        if norm.shape[1] > 1 and full.any():
            log_metric("rewards/ensemble_std", float(norm[full].std(-1).mean()))

    def callback(self) -> "RewardPipelineStateCallback":
        """A callback for TRL's GRPOTrainer / RLOOTrainer (any transformers Trainer) that saves this pipeline's running
        statistics with each checkpoint and restores them on `resume_from_checkpoint`:
        `GRPOTrainer(..., reward_funcs=[pipeline], callbacks=[pipeline.callback()])`."""
        return RewardPipelineStateCallback(self)

    def _stateful(self) -> dict[str, dict]:
        """What carries state between batches, keyed by name ("debias", a callable's name; "linear#2" for the second
        of a name): members with a running normalisation, shapers with a state (debias's slope)."""
        return {"members": numbered([m for m in self.members if isinstance(m, RunningNormalization)
                                     and m.normalize == "running"], lambda m: m.names[0]),
                "shapers": numbered([s for s in self.shapers if s.stateful], lambda s: s.name)}

    def state_dict(self):
        return {kind: {key: part.state_dict() for key, part in parts.items()}
                for kind, parts in self._stateful().items()}

    def _set_state(self, state) -> None:
        """Put back a `state_dict()` of this very pipeline (same parts)."""
        for kind, parts in self._stateful().items():
            for key, part in parts.items():
                if key in state.get(kind, {}):
                    part.load_state_dict(state[kind][key])

    def load_state_dict(self, state):
        """Restore by name, so that a resume with members or shapers added, removed or reordered gives each its own
        state (by position, a debias shaper's slope landed in whatever shaper came first). What cannot be matched is
        named in one warning: state in `state` that nothing here takes, and parts here that `state` has none for."""
        lost, fresh = [], []
        for kind, parts in self._stateful().items():
            saved = _keyed_state(state.get(kind), parts, self.members if kind == "members" else self.shapers)
            for key, part in parts.items():
                if key in saved:
                    part.load_state_dict(saved[key])
                else:
                    fresh.append(f"{kind[:-1]} {key!r}")
            lost += [f"{kind[:-1]} {key!r}" for key, st in saved.items()
                     if key not in parts and not _carries_nothing(st)]
        if lost or fresh:
            warnings.warn(
                "Reward pipeline state restored by name; "
                + "; ".join(filter(None, [
                    lost and f"not restored (not in this pipeline): {', '.join(lost)}",
                    fresh and f"starting from scratch (none saved under that name): {', '.join(fresh)}"]))
                + ". Expected when reward members or shapers were changed on purpose; if one was only renamed, give it "
                  "its earlier name to keep its running statistics.", UserWarning, stacklevel=2)


def _keyed_state(saved, parts: dict, everything: list) -> dict:
    """A saved member/shaper state as {name: state}. Checkpoints written before states were keyed by name hold a
    list, one entry per member (None for those without state) or per shaper, in the order of the pipeline that
    saved it (`everything`: this pipeline's, in its order). An entry is matched by position only when that pipeline
    had as many as this one and the state has the keys of the stateful part at its position; the rest keep a
    positional name, to be reported as not restored where they carry something."""
    if saved is None:
        return {}
    if isinstance(saved, dict):
        return saved
    ours, out = {id(p): key for key, p in parts.items()}, {}
    for i, st in enumerate(saved):
        if st is None:  # a member without state
            continue
        part = everything[i] if len(saved) == len(everything) else None
        if id(part) in ours and set(st) == set(part.state_dict()):
            out[ours[id(part)]] = st
        else:
            out[f"#{i + 1} of {len(saved)} in an older checkpoint"] = st
    return out


def _carries_nothing(state) -> bool:
    """A state as a part starts with (debias before its first slope, a callable before its first score): losing it
    loses nothing."""
    return not state or all(v in (None, 0) for v in state.values())


_DROPPED_BY_PPO = "they are dropped from the loss (nonfinite_rewards='drop') and counted in rewards/dropped_nonfinite."
_SHAPERS_INSIDE = ("When members can return None, put shapers inside the pipeline "
                   "(`RewardPipeline(..., shapers=[...])`) rather than beside it (`as_reward_func`), so that nothing "
                   "scores a dropped sample.")


def _fate_in_trainer(trainer) -> str:
    """What becomes of a sample the pipeline returns None for, called as a reward function by `trainer` (the owner
    of the `log_metric` it was passed; None when unknown). TRL's GRPO / RLOO nansum the reward functions' rows, so
    only a row that is None everywhere is left out (advantage 0, outside its group's baseline)."""
    if isinstance(getattr(trainer, "rewards", None), RewardPipeline):  # a member of PPOTrainer's own pipeline
        return _DROPPED_BY_PPO
    names = getattr(trainer, "reward_func_names", None)
    if names is None:
        return ("they come back as None (nonfinite_rewards='drop'). TRL's GRPOTrainer / RLOOTrainer leave a "
                "completion out only when every reward function returns None for it: beside another reward "
                f"function it is trained on with the others' rewards. {_SHAPERS_INSIDE}")
    if len(names) == 1:
        return ("they come back as None, and TRL leaves a completion that every reward function returned None for "
                "out of training (advantage 0): dropped, and counted in rewards/dropped_nonfinite.")
    return (f"they come back as None, but {type(trainer).__name__} has other reward functions beside this pipeline "
            f"(its reward functions: {names}): TRL sums their rewards and trains on these samples anyway, this "
            f"pipeline's share counted as 0 — they are NOT dropped. {_SHAPERS_INSIDE}")


class RewardPipelineStateCallback(TrainerCallback):
    """Saves a `RewardPipeline`'s state (callables' running mean/std, shapers' state such as debias's slope) with
    each checkpoint of a transformers / TRL Trainer, and restores it on `resume_from_checkpoint`, so a resumed
    GRPO / RLOO run normalises as the uninterrupted one would. Get it from `pipeline.callback()`.

    It lives in trainer_state.json under the pipeline's name (`name=`: two pipelines need distinct names). Under
    DDP each process scores its own share; the main process's statistics are saved and every process resumes from
    them (PPOTrainer keeps one state per process)."""

    def __init__(self, pipeline: RewardPipeline):
        self.pipeline = pipeline
        self.key = f"rlhf_ext.RewardPipeline/{pipeline.__name__}"

    def on_train_begin(self, args, state, control, **kwargs):
        claim_checkpoint_key(state, self.key, f"Two reward pipelines named {self.pipeline.__name__!r} save their state "
                                              f"with the checkpoint, the second over the first: give them distinct "
                                              f"names, RewardPipeline(..., name=...).")
        saved = saved_with_checkpoint(state, self.key)
        if saved is not None:
            self.pipeline.load_state_dict(saved)
        elif state.global_step > 0 and any(self.pipeline._stateful().values()):
            warnings.warn(f"Resuming at step {state.global_step} from a checkpoint without the state of reward "
                          f"pipeline {self.pipeline.__name__!r} (saved without its callback, or under another name): "
                          f"its running statistics go on from what this process holds.", UserWarning, stacklevel=2)
        save_with_checkpoint(state, self.key, self.pipeline.state_dict())

    def on_step_end(self, args, state, control, **kwargs):
        # before the step's checkpoint is written (transformers saves after on_step_end and the log)
        save_with_checkpoint(state, self.key, self.pipeline.state_dict())


class ExternalRewardModel(RunningNormalization):
    """A full reward model with its own tokenizer (e.g. a Hub `AutoModelForSequenceClassification`).

    Completions are decoded text, re-rendered in this model's format and re-tokenised (its vocabulary may differ
    from the policy's): chat messages with its chat template; text as its tokenizer encodes it — an encoder's
    (BERT, RoBERTa, DeBERTa: it closes every text with its own [SEP] / </s>) gets `tokenizer(prompt + completion)`,
    a causal classifier's gets the EOS appended, as trl.RewardTrainer trains it. A text longer than the model's
    positions (its tokenizer's `model_max_length`, its position table) is cut from the left, its leading special
    tokens ([CLS], <s>) kept: the completion's end is scored.

    `label`: for a classifier with more than one output (a sentiment model's NEGATIVE / POSITIVE), the output that is
    the reward — its index or its `config.id2label` name (e.g. `label="POSITIVE"`); required there.
    `mean`, `std`: its scores' scale where it is known (they are normalised with it). Without them it is normalised
    as the pipeline's Python callables are (`callable_normalization`: a running mean/std when it is mixed with other
    members), so that `min` / `uwo` / `weighted` compare it with the rest like with like.
    """

    def __init__(self, model, tokenizer, name: str = "external", mean: float | None = None, std: float | None = None,
                 batch_size: int = 16, label: int | str | None = None):
        from ..models import ensure_pad_token

        from ..data import leading_special_count, model_pad_id
        from .ensemble import closes_with_own_token

        rows = model.get_input_embeddings().weight.shape[0]
        _check_own_tokenizer(tokenizer, rows, name)
        self.model, self.tokenizer = model.eval(), ensure_pad_token(tokenizer)
        self.names, self.batch_size = [name], batch_size
        # its scale, when known (`mean` / `std`); else normalised as the pipeline's callables are (`as_member`)
        self.fixed = None if mean is None and std is None else (0.0 if mean is None else mean, 1.0 if std is None else std)
        cfg = getattr(model, "config", None)
        self.column = _label_column(cfg, label, name)
        # an encoder's tokenizer closes the text itself: an EOS appended as text would make it [SEP] [SEP]
        self.add_eos = not closes_with_own_token(self.tokenizer)
        self.lead, self.max_length = leading_special_count(self.tokenizer), position_limit(model, self.tokenizer)
        # Sequence-classification models pool at the last token that is not `config.pad_token_id`, so padding must
        # carry that id; a tokenizer pad outside the embedding (`[PAD]` added without resizing) must never be used.
        own = getattr(cfg, "pad_token_id", None)
        self.pad_id = own if own is not None and 0 <= own < rows else model_pad_id(self.tokenizer, model)
        if cfg is not None and own is None:
            cfg.pad_token_id = self.pad_id  # transformers' pooling refuses batches without one

    def input_ids(self, prompts, completions, chat_template_kwargs: dict | None = None, tools=None) -> list[list[int]]:
        """The token ids each prompt + completion is scored on (before a cut to the model's positions)."""
        from .ensemble import reward_input_ids

        prompts = prompts if prompts is not None else [None] * len(completions)
        return [reward_input_ids(self.tokenizer, p, c, chat_template_kwargs, add_eos=self.add_eos, tools=t)
                for p, c, t in zip(prompts, completions, tools or [None] * len(completions))]

    def _fit(self, seqs: list[list[int]]) -> list[list[int]]:
        """Each sequence within the model's positions, cut from the left past its leading special tokens (as
        `RewardEnsemble.score_sequences` cuts to its max_length); said once."""
        from ..data import cut_from_left
        from .ensemble import _warn_once

        L = self.max_length
        cut = 0 if L is None else sum(len(s) > L for s in seqs)
        if not cut:
            return seqs
        _warn_once(self, "cut", f"{cut} of {len(seqs)} texts to score are longer than the reward model's {L} positions "
                   f"(its tokenizer's model_max_length, its position table): each is scored on its last {L} tokens "
                   f"(its leading special tokens kept; the prompt's start cut). Shorten the prompts or "
                   f"max_completion_length to score whole texts.", stacklevel=5)
        return [cut_from_left(s, L, self.lead) for s in seqs]

    @torch.no_grad()
    def score_completions(self, prompts, completions, completion_ids=None, **kwargs) -> torch.Tensor:
        from ..data import pad_ids

        seqs = self._fit(self.input_ids(prompts, completions, kwargs.get("chat_template_kwargs"), kwargs.get("tools")))
        device = next(self.model.parameters()).device
        out, col = [], self.column
        for i in range(0, len(seqs), self.batch_size):
            ids, mask = pad_ids(seqs[i : i + self.batch_size], self.pad_id, device=device)
            out.append(self.model(input_ids=ids, attention_mask=mask).logits[:, col : col + 1].float().cpu())
        r = torch.cat(out)
        self._observe(r)
        return r

    __call__ = score_completions

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor([self.fixed[0]], dtype=torch.float) if self.fixed else super().mean

    @property
    def std(self) -> torch.Tensor:
        return torch.tensor([self.fixed[1]], dtype=torch.float) if self.fixed else super().std


_PROBE_TEXT = "the reward model reads this answer"


def _check_own_tokenizer(tokenizer, rows: int, name: str) -> None:
    """Refuse a tokenizer that cannot be the model's: one that encodes text to nothing, or whose vocabulary is far
    smaller than the embedding table. transformers 5 loads an empty tokenizer from a folder without tokenizer files
    (a model saved with `model.save_pretrained()` alone) instead of raising: every text would score the same."""
    size = len(tokenizer)
    ids = tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if ids and 2 * size >= rows:  # embeddings are padded (to multiples of 64/128), never to twice the vocabulary
        return
    why = "it encodes text to no tokens at all" if not ids else \
        f"it has {size} tokens while the model's embedding has {rows} rows"
    raise ValueError(
        f"The tokenizer given to reward model {name!r} is not this model's tokenizer: {why}. A folder saved with "
        f"model.save_pretrained() alone has no tokenizer files, and transformers 5 then loads an empty tokenizer. "
        f"Save the model's tokenizer into its folder (tokenizer.save_pretrained(folder)), or pass it: "
        f"PPOTrainer(..., reward_processing_classes=[its_tokenizer]) (one entry per reward_funcs entry, None for the "
        f"others), or ExternalRewardModel(model, its_tokenizer).")


def _label_column(config, label, name: str) -> int:
    """The logits column that is the reward: 0 for a one-output model; `label` (an index or an id2label name, exact
    or case-insensitive) for a classifier with more, where the first column is often the NEGATIVE label."""
    n = int(getattr(config, "num_labels", 1) or 1)
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    labels = [id2label.get(i, f"LABEL_{i}") for i in range(n)]
    if label is None:
        if n == 1:
            return 0
        raise ValueError(
            f"Reward model {name!r} is a classifier with {n} labels ({', '.join(labels)}), so which output is the "
            f"reward is not known (the first is often the negative one). Pass ExternalRewardModel(model, tokenizer, "
            f"label=...), the label's index or name, e.g. label={labels[-1]!r}.")
    if isinstance(label, int) and not isinstance(label, bool):
        if not 0 <= label < n:
            raise ValueError(f"label {label} is out of range: reward model {name!r} has {n} labels ({', '.join(labels)}); "
                             f"pass an index from 0 to {n - 1} or a label's name.")
        return label
    if not isinstance(label, str):
        raise TypeError(f"label must be an output index (int) or a label name (str), got {type(label).__name__}.")
    found = [i for i, s in enumerate(labels) if s == label] or \
        [i for i, s in enumerate(labels) if s.lower() == label.lower()]
    if len(found) != 1:
        raise ValueError(f"label {label!r} is not one of reward model {name!r}'s labels ({', '.join(labels)}); pass "
                         f"one of them or its index.")
    return found[0]
