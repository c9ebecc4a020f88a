"""`RewardEnsemble`: K reward members on one base — trunk → pool → head, the one scoring path used by the reward
trainer (it is the trainer's model) and by everything that scores afterwards (PPO, benchmarks, the review page).

Members live in one of three layouts (`spec["mode"]`):
  "full"      no LoRA: the whole trunk trains; `heads["full"]` has K outputs;
  "heads"     one LoRA adapter, `heads[adapter]` has K outputs: one trunk pass scores every member;
  "adapters"  K LoRA adapters, each with a 1-output head: in training one pass per member, at inference one
              mixed-adapter batch (PEFT `adapter_names`, eval mode).
Hosted on the PPO policy's PeftModel (`load_reward_model(path, base_model=policy)`), the adapters are extra adapters
of the policy's base: no second copy of the model. The artifact format lives in `artifact.py`.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch
from torch import nn

from ..adapters import active_adapter, eval_mode
from ..data import chat_ids, cut_from_left, leading_special_count, model_pad_id, pad_ids
from ..grouped_kv import grouped_kv_attention
from ..models import activation_checkpointing_on, position_limit, trunk_of
from ..rl_math import last_token_index
from ..shared_prefix import cache_argument, leading_pads, shared_hidden, shared_length, sliding_window


def pool_last(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of the last attended token. hidden: [B, T, H], mask: [B, T] → [B, H]."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]


def pool_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean hidden state over attended tokens (padding side irrelevant). hidden: [B, T, H], mask: [B, T] → [B, H]."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def assistant_header_ids(tokenizer) -> list[int]:
    """The tokens a chat template puts before an assistant turn (`add_generation_prompt`), e.g. SmolLM2's
    `<|im_start|>assistant\\n`; [] without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    turn = [{"role": "user", "content": "x"}]
    without, with_ = (chat_ids(tokenizer, turn, generation_prompt=g) for g in (False, True))
    return list(with_[len(without):]) if with_[: len(without)] == without else []


def response_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, header: list[int]) -> torch.Tensor:
    """The attended tokens after the last assistant header in each row (the response and its end-of-turn tokens);
    a row without the header keeps all its attended tokens. [B, T] → [B, T] (mask's dtype)."""
    B, T = input_ids.shape
    L = len(header)
    if not L or T < L:
        return attention_mask
    windows = input_ids.unfold(1, L, 1)  # [B, T-L+1, L]
    hit = (windows == torch.tensor(header, device=input_ids.device)).all(-1) & attention_mask.unfold(1, L, 1).bool().all(-1)
    ends = torch.arange(L - 1, T, device=input_ids.device).expand(B, -1)
    last = torch.where(hit, ends, torch.full_like(ends, -1)).max(-1).values  # [B]; -1: no header in the row
    after = torch.arange(T, device=input_ids.device)[None, :] > last[:, None]
    return (attention_mask.bool() & after).to(attention_mask.dtype)


# "response" is the mean over the response: pool_mean over response_mask, applied by RewardEnsemble (needs the ids)
POOLING = {"last": pool_last, "mean": pool_mean, "response": pool_mean}
MODES = ("full", "heads", "adapters")


def replay_with_adapter_state(model: nn.Module, reentrant: bool) -> None:
    """After `activation_checkpointing_enable` on `model` (a transformers model, PEFT-wrapped or not): make every
    checkpointed layer's backward-pass recomputation run with the PEFT adapter state of its forward pass (see
    `_replay_with_adapter_state`). Needed wherever one forward runs under a non-default adapter and trains it
    (reward members in "adapters" mode, a separate PPO critic). Idempotent."""
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is not None:
            module._gradient_checkpointing_func = _replay_with_adapter_state(func, module, reentrant)


def _replay_with_adapter_state(checkpoint_func, layer: nn.Module, reentrant: bool):
    """Wrap a layer's checkpoint function so the backward-pass recomputation sees the PEFT adapter state (active
    adapter, adapters disabled) of the forward pass, and, with reentrant checkpointing, so gradients reach the
    layer's adapters when its input needs no gradient (reentrant checkpointing returns a result without gradient
    then). Without the first part a member trained under `active_adapter(model, k)` would be recomputed with another
    adapter and receive wrong gradients, silently."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    inner = getattr(checkpoint_func, "__wrapped_checkpoint__", checkpoint_func)  # never wrap twice
    tuners = [m for m in layer.modules() if isinstance(m, BaseTunerLayer)]

    def checkpointed(function, *args, **kwargs):
        state = [(m, m._active_adapter, m._disable_adapters) for m in tuners]

        def replay(*a, **k):
            now = [(m, m._active_adapter, m._disable_adapters) for m in tuners]
            for m, active, disabled in state:
                m._active_adapter, m._disable_adapters = active, disabled
            try:
                return function(*a, **k)
            finally:
                for m, active, disabled in now:
                    m._active_adapter, m._disable_adapters = active, disabled

        if (reentrant and torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor)
                and args[0].is_floating_point() and not args[0].requires_grad):
            args = (args[0].detach().requires_grad_(True), *args[1:])
        return inner(replay, *args, **kwargs)

    checkpointed.__wrapped_checkpoint__ = inner
    return checkpointed


def _warn_once(owner, kind: str, message: str, stacklevel: int = 3) -> None:
    """`message` the first time `owner` meets a `kind` of problem: PPO scores every batch, and one warning says it."""
    seen = vars(owner).setdefault("_warned_once", set())
    if kind not in seen:
        seen.add(kind)
        warnings.warn(message, UserWarning, stacklevel=stacklevel)


def reward_input_ids(tokenizer, prompt, completion, chat_template_kwargs: dict | None = None,
                     add_eos: bool = True, tools=None) -> list[int]:
    """Token ids in exactly the format TRL's RewardTrainer trains on (chat template, or text + EOS).
    `chat_template_kwargs`: the template's extra arguments the policy's prompts were rendered with (as GRPO passes
    them when it renders text for a reward model), e.g. {"enable_thinking": False}. `add_eos=False`: plain text as
    the tokenizer encodes it, nothing appended (an encoder classifier's, see `closes_with_own_token`); a tokenizer
    without an EOS (BERT's WordPiece) never gets one appended. `tools`: the row's `tools` column (TRL's reward
    trainer renders it into the template)."""
    if isinstance(completion, list):  # conversational
        return chat_ids(tokenizer, (prompt or []) + completion, tools=tools, template_kwargs=chat_template_kwargs)
    text = (prompt or "") + completion
    eos = tokenizer.eos_token
    if add_eos and eos is not None and not text.endswith(eos):
        text += eos
    return tokenizer(text=text)["input_ids"]


def closes_with_own_token(tokenizer) -> bool:
    """Whether the tokenizer ends every text it encodes with a special token of its own (BERT's / DeBERTa's [SEP],
    RoBERTa's </s>): a classifier trained on its encodings never saw a textual EOS after it ([SEP] [SEP])."""
    probe = "hello"
    with_special = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    return (len(with_special) > len(plain) and with_special[-1] in set(tokenizer.all_special_ids)
            and with_special[len(with_special) - len(plain):] != plain)


class RewardEnsemble(nn.Module):
    """K reward members hosted on one base: `forward(input_ids, attention_mask)` → raw rewards [B, K].

    `mean`/`std` are the per-member normalisation statistics recorded at training time (BT rewards are
    shift-invariant, so raw member scores are not comparable until normalised). `prefix_cache` (a
    `prefix_cache.PrefixCache`) replaces the frozen lower layers by a per-text cache when set.
    """

    def __init__(self, model, tokenizer, spec: dict, heads: nn.ModuleDict, owns_base: bool = True, config=None):
        super().__init__()
        self._config = config  # the trainer's view of the config (num_labels=1), so the trunk's is never edited
        if spec["mode"] not in MODES:
            raise ValueError(f"Unknown reward ensemble mode {spec['mode']!r}; expected one of {MODES}.")
        if owns_base:
            self.model = model
        else:  # hosted on someone else's model (the PPO policy): keep it out of our parameters and state_dict
            self.__dict__["model"] = model
        self.tokenizer, self.spec, self.heads, self.owns_base = tokenizer, spec, heads, owns_base
        self.adapters = list(spec["adapters"])  # adapter names on the host model, in column order
        self.names = spec["members"]
        norm = spec.get("normalization") or {}
        K = len(self.names)
        self.register_buffer("mean", torch.tensor(norm.get("mean", [0.0] * K), dtype=torch.float), persistent=False)
        self.register_buffer("std", torch.tensor(norm.get("std", [1.0] * K), dtype=torch.float), persistent=False)
        self.max_length = spec.get("max_length")
        # the base's own positions: a model trained with max_length=None (or above them) on short pairs still cannot
        # score a longer text (a learned position table, GPT-2's or RoBERTa's, is indexed past its end)
        self.positions = position_limit(trunk_of(model))
        # padding is found by the attention mask, so any id the embedding has will do: a `[PAD]` added to the
        # tokenizer without resizing the model (TRL's PPO examples) must not reach it
        self.pad_id = model_pad_id(tokenizer, model) if tokenizer is not None else 0
        self.lead = leading_special_count(tokenizer) if tokenizer is not None else 0  # kept by a cut from the left
        self.pool = POOLING[spec.get("pooling", "last")]
        self.header = assistant_header_ids(tokenizer) if spec.get("pooling") == "response" else []
        if spec.get("pooling") == "response" and not self.header:
            raise ValueError("pooling='response' pools the tokens after the chat template's assistant header, and this "
                             "tokenizer has no chat template (or its template adds no header for a generation "
                             "prompt). Use pooling='mean' (every attended token) or 'last'.")
        self.prefix_cache = None
        # Scoring runs the prompt head a batch's rows share once (shared_prefix.py). Off unless whoever hosts the
        # ensemble verified sharing on this base (PPOTrainer: the policy's start-up check, same base and dtype).
        self.share_prefix = False
        self.model_tags = list(spec.get("tags") or [])  # what the trainers add for the model card (as transformers')

    @property
    def config(self):
        return self._config if self._config is not None else trunk_of(self.model).config

    def add_model_tags(self, tags):  # Trainer tags the model card of the model it trains
        tags = [tags] if isinstance(tags, str) else list(tags)
        self.model_tags = [*self.model_tags, *(t for t in tags if t not in self.model_tags)]
        trunk = trunk_of(self.model)
        if hasattr(trunk, "add_model_tags"):
            trunk.add_model_tags(tags)

    # -- activation (gradient) checkpointing: transformers' Trainer calls these on the model it trains -------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """Checkpoint the trunk's decoder layers. Arguments as `PreTrainedModel.activation_checkpointing_enable`
        (`every_n_layers`, `offload`, and any other keyword of the installed transformers), forwarded to the trunk;
        `activation_checkpointing_kwargs` go to `torch.utils.checkpoint.checkpoint` (`use_reentrant`, …).

        Each layer's recomputation in the backward pass runs with the adapter that was active in its forward pass
        (in "adapters" mode member k's layers are replayed with adapter k, not with whichever adapter is active
        when the backward runs), and with reentrant checkpointing a layer input that needs no gradient (the cached
        frozen prefix, a frozen embedding) is made to need one, so gradients reach the adapters inside."""
        trunk = trunk_of(self.model)
        enable = getattr(trunk, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)
        else:  # transformers before the activation_checkpointing_* names
            trunk.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)
        ckpt_kwargs = {"use_reentrant": False} if activation_checkpointing_kwargs is None else activation_checkpointing_kwargs
        reentrant = ckpt_kwargs.get("use_reentrant", True)  # torch.utils.checkpoint's default
        replay_with_adapter_state(trunk, reentrant)
        if reentrant and not getattr(trunk, "_require_grads_hooks", None) and not hasattr(trunk, "_require_grads_hook"):
            trunk.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """Deprecated transformers name of `activation_checkpointing_enable` (same arguments)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self):
        trunk = trunk_of(self.model)
        disable = getattr(trunk, "activation_checkpointing_disable", None) or trunk.gradient_checkpointing_disable
        disable()

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        return activation_checkpointing_on(trunk_of(self.model))

    is_gradient_checkpointing = is_activation_checkpointing

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """`PreTrainedModel.num_parameters` of the trunk (its LoRA layers included, 4-bit weights counted as
        transformers counts them) plus the score heads. Trainer's `floating_point_ops` reads it for the logged
        `total_flos` (6 × input tokens × non-embedding parameters, as for trl.RewardTrainer's model); without it
        every run logged `total_flos` 0."""
        trunk = trunk_of(self.model)
        if hasattr(trunk, "num_parameters"):
            n = trunk.num_parameters(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
        else:  # a trunk that is not a transformers model
            n = sum(p.numel() for p in trunk.parameters() if p.requires_grad or not only_trainable)
        return n + sum(p.numel() for p in self.heads.parameters() if p.requires_grad or not only_trainable)

    # -- the scoring path ---------------------------------------------------------------------------------------
    def hidden(self, input_ids, attention_mask, n_shared: int | None = None) -> torch.Tensor:
        """Final hidden states of the trunk with the currently active adapter. [B, T] → [B, T, H]. `n_shared`: the
        leading tokens to run once (None: `_n_shared`'s; 0 for a mixed-adapter batch, where PEFT gives each row its
        adapter and a shared pass has one row). On CPU grouped-query attention runs without repeated key/value
        heads (`grouped_kv.py`)."""
        with grouped_kv_attention(input_ids.device, self.model):
            if self.prefix_cache is not None:
                return self.prefix_cache(input_ids, attention_mask)
            trunk = trunk_of(self.model)
            n_shared = self._n_shared(input_ids, attention_mask) if n_shared is None else n_shared
            if n_shared:
                return shared_hidden(trunk, input_ids, attention_mask, n_shared, cache_argument(trunk))
            return trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def _n_shared(self, input_ids, attention_mask) -> int:
        """How many leading tokens a scoring pass runs once (`share_prefix`, `shared_prefix.py`): the rows'
        common head where sharing is on and pays, without gradients, and no attention window can cut; else 0."""
        if not self.share_prefix or torch.is_grad_enabled() or int(leading_pads(attention_mask).max()):
            return 0
        return shared_length(input_ids, attention_mask, 0, sliding_window(trunk_of(self.model)))

    def _member(self, adapter, input_ids, attention_mask, n_shared: int | None = None) -> torch.Tensor:
        ctx = nullcontext() if self.spec["mode"] == "full" else active_adapter(self.model, adapter)
        with ctx:
            h = self.hidden(input_ids, attention_mask, n_shared)
        return self._score(self.heads[adapter], self._pool(h, input_ids, attention_mask))

    @staticmethod
    def _score(head: nn.Linear, pooled: torch.Tensor) -> torch.Tensor:
        """The head on the pooled features (fp32, `_pool`). The heads are fp32 too, except where the trainer's engine
        cast the whole model to its training dtype (DeepSpeed's bf16/fp16, which runs no autocast): then the features
        go in at the heads' dtype."""
        return head(pooled if pooled.dtype == head.weight.dtype else pooled.to(head.weight.dtype))

    def _pool(self, hidden, input_ids, attention_mask) -> torch.Tensor:
        mask = attention_mask
        if self.header:
            mask = response_mask(input_ids, attention_mask, self.header)
            # a row whose assistant header was not found keeps every token (its header's last token merged with the
            # answer's first, e.g. "Assistant: " + "good" → "Ġgood"): say so once, or "response" pooling is silently
            # "mean" over the prompt too
            if bool((mask.sum(-1) == attention_mask.sum(-1)).any()):
                _warn_once(self, "header", f"pooling='response': the assistant header {self.header} was not found in "
                           f"some rows, which are pooled over all their tokens, prompt included. The chat template's "
                           f"header likely merges with the answer's first token when tokenized; use pooling='last' "
                           f"or 'mean', or a template whose header ends in a special token or newline.")
        return self.pool(hidden, mask).float()

    def forward(self, input_ids, attention_mask, **unused) -> torch.Tensor:
        """Raw member rewards. input_ids, attention_mask: [B, T] (any padding side) → [B, K]."""
        if self.spec["mode"] != "adapters":
            return self._member(self.adapters[0], input_ids, attention_mask)
        # PEFT mixes adapters in one batch in eval only; a shared head runs once per member, not once per mixed batch
        n_shared = self._n_shared(input_ids, attention_mask)
        if self.model.training or self.prefix_cache is not None or n_shared or self._dora():
            return torch.cat([self._member(a, input_ids, attention_mask, n_shared) for a in self.adapters], -1)
        K, B = len(self.adapters), input_ids.shape[0]
        ids, mask = input_ids.repeat(K, 1), attention_mask.repeat(K, 1)
        with self.model._enable_peft_forward_hooks(adapter_names=[a for a in self.adapters for _ in range(B)]):
            pooled = self._pool(self.hidden(ids, mask, n_shared=0), ids, mask)
        return torch.cat([self._score(self.heads[a], pooled[k * B : (k + 1) * B]) for k, a in enumerate(self.adapters)],
                         -1)

    def _dora(self) -> bool:
        """Does a member use DoRA? PEFT mixes DoRA adapters in no batch ("Cannot pass adapter_names when DoRA is
        enabled"): those members score one pass each."""
        configs = getattr(self.model, "peft_config", {})
        return any(getattr(configs.get(a), "use_dora", False) for a in self.adapters)

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`forward` in eval mode (no dropout), whatever mode the model was in. → [B, K]"""
        with eval_mode(self.model):
            return self(input_ids, attention_mask)

    def score_completions(self, prompts, completions, completion_ids=None, batch_size: int = 16, **kwargs):
        """Member interface of `RewardPipeline` (TRL's reward_funcs arguments) → raw rewards [B, K] on the CPU."""
        prompts = prompts if prompts is not None else [None] * len(completions)
        self._check_format(completions)
        template, tools = kwargs.get("chat_template_kwargs"), kwargs.get("tools") or [None] * len(completions)
        return self.score_sequences([reward_input_ids(self.tokenizer, p, c, template, tools=t)
                                     for p, c, t in zip(prompts, completions, tools)], batch_size)

    def _check_format(self, completions) -> None:
        """Once: completions of the other format than the pairs this model trained on (the artifact records it) — a
        model trained on chat-templated text scoring plain text, or the reverse, scores a format it never saw."""
        trained = self.spec.get("conversational")
        if trained is None or not completions:
            return
        given = isinstance(completions[0], list)
        if given != trained:
            kinds = {True: "conversational (chat messages, rendered with the chat template)", False: "plain text"}
            _warn_once(self, "format", f"This reward model was trained on {kinds[trained]} pairs but is scoring "
                       f"{kinds[given]} completions: it sees a format it never trained on. Give the prompts in the "
                       f"format of its training data (conversational prompts make conversational completions).",
                       stacklevel=4)

    def score_sequences(self, seqs: list[list[int]], batch_size: int = 16) -> torch.Tensor:
        """Raw rewards [B, K] (CPU) of token-id lists, in forwards of at most `batch_size` rows: in "adapters" mode
        each text is one row per member, so batch_size // K texts go through at a time (a 7B base with K=4 would
        otherwise run 64-row batches)."""
        limits = [n for n in (self.max_length, self.positions) if n]
        if limits:
            limit = min(limits)
            cut = sum(len(s) > limit for s in seqs)
            if cut:
                why, fix = (f"max_length ({limit}, what it trained on)", "or train the reward model with a larger "
                            "max_length") if limit == self.max_length else (
                            f"{limit} positions (its base's position table; it trained with max_length="
                            f"{self.max_length})", "or use a base with more positions")
                _warn_once(self, "cut", f"{cut} of {len(seqs)} sequences to score are longer than the reward model's "
                           f"{why}: each is scored on its last {limit} tokens (its BOS kept; its prompt's start, chat "
                           f"template and system turn cut). Shorten the prompts or max_completion_length, {fix}.")
            seqs = [cut_from_left(s, limit, self.lead) for s in seqs]
        device = next(self.heads.parameters()).device
        if self.spec["mode"] == "adapters":
            batch_size = max(1, batch_size // len(self.adapters))
        out = []
        for i in range(0, len(seqs), batch_size):
            ids, mask = pad_ids(seqs[i : i + batch_size], self.pad_id, device=device)
            out.append(self.score_ids(ids, mask))
        return torch.cat(out).cpu()

    def score_texts(self, prompts, completions, normalize: bool = False) -> torch.Tensor:
        r = self.score_completions(prompts, completions)
        return (r - self.mean) / self.std.clamp(min=1e-6) if normalize else r
