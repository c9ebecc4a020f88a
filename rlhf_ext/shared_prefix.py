"""Shared prompt prefix: the tokens every sequence of a batch begins with run once per pass, not once per sequence.

Chat templates put the same header before every prompt (SmolLM2's and Qwen2.5's default system prompt), and
instruction datasets repeat a template; in the benchmark's batch (8 prompts of one template, 32-token responses)
31 of each 41-token prompt are the same. Every pass after sampling — the reference, θ_old and the training forward,
the critic, each KL measurement — would read those tokens B times. Here a pass reads them once:

  1. the trunk runs the shared L tokens as one sequence [1, L], keeping its keys and values (the model's cache);
  2. the cache is repeated to the batch, and the model runs each row's remainder [B, T'] on top of it.

Every query attends to the same tokens at the same positions as in the full pass, so the output is the full
pass's up to float rounding (batch-1 and batch-B matmuls round differently), and gradients reach the shared
tokens' activations through their keys and values. All passes of an iteration take the same path, so θ_old, the
training pass and the reference still compute one function (KL exactly 0 at θ₀).

Packed passes. Steps 1 and 2 are two passes through every layer, and the first, over L rows, runs its products at a
fraction of the machine's rate. For the architectures of PACKED_MODEL_TYPES with SDPA attention (`packs`) a pass
after sampling instead runs the head and the remainders as ONE sequence [1, L + B·T'] through the model's own
forward (`packed_forward`): every product once over all the token rows, and at each layer transformers' attention
function called twice — the head on itself, the remainders on the head's keys and values and their own, under the
mask the cached pass's remainders see. The keys, the masks and so the outputs are the cached pass's (tests: to
rounding, fp32 and bf16); on CPU in bf16 a SmolLM2-135M training forward + backward took 0.47 s against 0.53–0.55.
Sampling keeps the cache (`prefilled_prompts`): generate() decodes on it.

Layout. Row b of the batch [B, T] holds p_b left pads, the shared L tokens, its own prompt suffix and the response.
Its remainder is the column slice [p_min + L, T) — the same slice for every row, so responses stay right-aligned —
with the columns before p_b + L masked: they hold row b's pads and shared tokens, which the cache already holds. A
packed pass leaves every masked column out of its sequence (those, and the pads after a response that ended early)
and gathers the live ones back into that grid where attention needs it.
Position ids are the full pass's. A sliding window counts columns, and the masked columns moved, so sharing is
used only where the whole batch fits in the window (then no window ever cuts).

Reward scoring (`RewardEnsemble` hosted on the policy's base) reads right-padded rows and pools over any of their
columns: `shared_hidden` runs the head once the same way and puts its hidden states back in front of each row's.
"""

from __future__ import annotations

import inspect

import torch

from .attention_interface import can_replace_sdpa, sdpa_replaced
from .cpu_linear import row_bucket
from .layer_types import recurrent_layer_types
from .prefix_cache import positions

# Shared only where it pays: the extra batch-1 pass has a fixed cost (on CPU in bf16, SmolLM2-135M: 0.054 s for 31
# tokens, of which ~0.038 s is per pass, not per token — ~75 token rows' worth of the full pass), so a batch shares
# when its rows begin with at least MIN_SHARED_TOKENS common tokens and sharing saves at least MIN_SAVED_ROWS rows.
MIN_SHARED_TOKENS = 8
MIN_SAVED_ROWS = 64

# A packed pass leaves masked columns out where that drops at least this share of its rows: gathering the live ones
# back into the rows' grid for attention (index_select forward, index_add backward, every layer) made a bf16 training
# pass of ppo_throughput's benchmark 2–4 % slower where it dropped none (SmolLM2-135M on CPU).
MIN_LEFT_OUT = 0.125

# Architectures (config.model_type) whose passes run the shared head and the remainders as one packed sequence
# (`packed_forward`; tests/test_shared_prefix.py checks each against the cached pass); the others take the cache.
PACKED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "phi3", "olmo2", "smollm3"})


def worth_sharing(n_rows: int, n_shared: int) -> bool:
    """Whether running `n_shared` common tokens once instead of in each of `n_rows` rows pays for the extra pass."""
    return n_shared >= MIN_SHARED_TOKENS and (n_rows - 1) * n_shared >= MIN_SAVED_ROWS


def shared_length(ids: torch.Tensor, mask: torch.Tensor, n_resp: int, window: int | None, new_tokens: int = 0) -> int:
    """How many leading tokens a pass over this batch runs once: the rows' common prompt head where sharing pays and
    the batch, with `new_tokens` still to be sampled, fits the model's attention `window` (None: none); else 0."""
    if window is not None and ids.shape[1] + new_tokens >= window:
        return 0
    n_shared = shared_prefix_length(ids, mask, n_resp)
    return n_shared if worth_sharing(ids.shape[0], n_shared) else 0


def leading_pads(mask: torch.Tensor) -> torch.Tensor:
    """Number of masked columns before each row's first token. [B, T] → [B]"""
    return (mask.cumsum(1) == 0).sum(1)


def shared_prefix_length(ids: torch.Tensor, mask: torch.Tensor, n_resp: int) -> int:
    """How many prompt tokens every row begins with (after its left pads). At most the shortest prompt − 1: the state
    that predicts the first response token must be in the remainder. ids, mask: [B, T], responses in the last n_resp
    columns → L"""
    pads = leading_pads(mask)
    longest = int((ids.shape[1] - n_resp - pads).min()) - 1
    if ids.shape[0] < 2 or longest <= 0:
        return 0
    cols = pads[:, None] + torch.arange(longest, device=ids.device)
    tokens = ids.gather(1, cols)
    same = (tokens == tokens[:1]).all(0) & mask.gather(1, cols).bool().all(0)
    return int(same.long().cumprod(0).sum())


def sliding_window(model) -> int | None:
    """The model's attention window in tokens, if any layer has one (Mistral, Gemma 2/3, …), else None."""
    cfg = model.config.get_text_config()
    return getattr(cfg, "sliding_window", None) or getattr(cfg, "attention_chunk_size", None) or None


def recurrent_layers(model) -> list[str]:
    """The model's layer types whose cache is a running state rather than keys and values (`layer_types.py`). Such a
    state would run through the masked columns between the shared head and a row's remainder (`split_batch`), so
    sharing is never exact there."""
    return recurrent_layer_types(getattr(model.config.get_text_config(), "layer_types", None))


def cache_argument(model) -> str:
    """What the model's forward calls its key/value cache: `cache` (transformers ≥ 5.2x) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def split_batch(ids: torch.Tensor, mask: torch.Tensor, n_shared: int):
    """→ (shared ids [1, L], remainder ids [B, T'], attention mask over shared + remainder [B, L + T'], remainder
    position ids [B, T']) with T' = T − p_min − L."""
    pads = leading_pads(mask)
    first, start = int(pads[0]), int(pads.min()) + n_shared
    rest_mask = mask[:, start:].clone()
    held = torch.arange(rest_mask.shape[1], device=mask.device)[None] < (pads - int(pads.min()))[:, None]
    rest_mask[held] = 0  # this row's pads and shared tokens: in the cache already
    full_mask = torch.cat([mask.new_ones(mask.shape[0], n_shared), rest_mask], 1)
    return ids[:1, first:first + n_shared], ids[:, start:], full_mask, positions(mask)[:, start:]


def shared_pass(trunk, shared: torch.Tensor, n_rows: int):
    """The shared tokens [1, L] run once through `trunk` → (their key/value cache repeated to `n_rows` rows, their
    last hidden states [1, L, H]). Differentiable: the rows' gradients sum into the shared pass."""
    out = trunk(input_ids=shared, attention_mask=torch.ones_like(shared),
                position_ids=torch.arange(shared.shape[1], device=shared.device)[None], use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    cache.batch_repeat_interleave(n_rows)
    return cache, out.last_hidden_state


def shared_cache(trunk, shared: torch.Tensor, n_rows: int):
    """The key/value cache of the shared tokens [1, L] (`shared_pass`), repeated to `n_rows` rows."""
    return shared_pass(trunk, shared, n_rows)[0]


def packs(model) -> bool:
    """Whether passes over `model` (a causal LM, its trunk or their PEFT wrapper) run the shared head and the rows'
    remainders as one sequence (`packed_forward`): an architecture of PACKED_MODEL_TYPES with SDPA attention, and
    transformers' attention interface to route it through."""
    cfg = model.config.get_text_config()
    return (cfg.model_type in PACKED_MODEL_TYPES and getattr(cfg, "_attn_implementation", None) == "sdpa"
            and can_replace_sdpa())


def _attention_split(n_shared: int, rows: int, cols: int, rows_mask: torch.Tensor, grid: torch.Tensor | None = None,
                     live: torch.Tensor | None = None):
    """For one packed pass (a context): transformers' "sdpa" attention function (what the model looks up at each
    layer, with whatever wraps it now: `cpu_attention.py`'s routing) called twice per layer — the shared head causally
    on itself, the rows' remainders [rows, heads, cols, D] on the head's keys and values followed by their own under
    `rows_mask` — the mask and keys the cached pass's remainders see. Where the packed sequence holds only the live
    columns (`packed_forward`), `grid` [rows·cols] gives each remainder column's position in it and `live` the
    columns it holds: a masked column reads the sequence's first token (a key no query sees, a query whose output is
    not read back), so its gradients are zero. The mapping is restored after."""
    L, B, T = n_shared, rows, cols

    def per_row(x):  # [1, heads, L + B·T or L + live, D] → the remainders' [B, heads, T, D]
        return _per_column(x[0], L, grid, dim=1).unflatten(1, (B, T)).transpose(0, 1)

    def packed(out):  # the remainders' [B, T, heads, D] → the packed sequence's [1, B·T or live, heads, D]
        out = out.reshape(B * T, *out.shape[2:])
        return (out if live is None else out.index_select(0, live))[None]

    def split(inner):
        def attention(module, q, k, v, attention_mask, **kwargs):
            head = inner(module, q[:, :, :L], k[:, :, :L], v[:, :, :L], None, **kwargs)[0]  # [1, L, heads, D]
            k_rows = torch.cat([k[:, :, :L].expand(B, -1, -1, -1), per_row(k)], 2)
            v_rows = torch.cat([v[:, :, :L].expand(B, -1, -1, -1), per_row(v)], 2)
            out = inner(module, per_row(q), k_rows, v_rows, rows_mask, **kwargs)[0]  # [B, T, heads, D]
            return torch.cat([head, packed(out)], 1), None

        return attention

    return sdpa_replaced(split)


def packed_forward(model, ids, mask, n_shared: int, logits_to_keep: int = 0):
    """`model` (a causal LM or its trunk, `packs(model)`) on a batch whose rows share their first `n_shared` tokens,
    as ONE sequence [1, L + n]: the shared head, then each row's remainder (`split_batch`) — without its masked
    columns (its left pads and shared tokens, whatever follows an ended response) where that drops MIN_LEFT_OUT of
    the rows or more, n then rounded up to `row_bucket`'s sizes with masked ones —, each token at its full pass
    position. Every product of the model then runs once over the batch's live token rows, where the cached pass
    runs the head as a batch of its own (a second pass through every layer: ~38 ms of a 250 ms bf16 SmolLM2-135M
    forward on CPU) and every masked column too; attention is split back per row (`_attention_split`), so each query
    attends to what the cached pass's does. → the model's output with `logits` [B, logits_to_keep or T', V] and
    `last_hidden_state` [B, T', H] per row — at masked columns the first token's, never what the cached pass computed
    there; every consumer masks them — and `head_hidden_state` [1, L, H] (where the model returns hidden states)."""
    shared, rest, full_mask, rest_pos = split_batch(ids, mask, n_shared)
    B, T = rest.shape
    L, dev = n_shared, ids.device
    live_cols = full_mask[:, L:].reshape(-1).bool()  # [B·T']
    live = grid = None
    # the sequence holds the live columns, and as many masked ones as round its length up to `row_bucket`'s sizes (a
    # CPU's oneDNN keeps compiled kernels for every product shape it meets, and live counts change with each batch),
    # where that leaves out at least MIN_LEFT_OUT of the columns: the gathers cost a few % of a pass
    n_live = int(live_cols.sum())
    extra = min(row_bucket(L + n_live), L + B * T) - L - n_live
    if B * T - n_live - extra >= MIN_LEFT_OUT * (L + B * T):
        live_cols = live_cols.clone()
        live_cols[(~live_cols).nonzero().squeeze(1)[:extra]] = True
        live = live_cols.nonzero().squeeze(1)
        grid = torch.zeros(B * T, dtype=torch.long, device=dev)
        grid[live] = L + torch.arange(live.numel(), device=dev)
    keep = slice(None) if live is None else live
    flat = torch.cat([shared[0], rest.reshape(-1)[keep]])[None]
    pos = torch.cat([torch.arange(L, device=dev), rest_pos.reshape(-1)[keep]])[None]
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    rows_mask = torch.cat([full_mask[:, None, :L].bool().expand(B, T, L), full_mask[:, None, L:].bool() & causal],
                          -1)[:, None]  # [B, 1, T', L + T']
    kw = {}
    if logits_to_keep:  # the head on each row's last positions only
        kept = (T * torch.arange(B, device=dev)[:, None] + torch.arange(T - logits_to_keep, T, device=dev)).reshape(-1)
        kw["logits_to_keep"] = L + kept if grid is None else grid[kept]
    with _attention_split(L, B, T, rows_mask, grid, live):
        out = model(input_ids=flat, attention_mask=None, position_ids=pos, use_cache=False, **kw)
    if getattr(out, "logits", None) is not None:
        # a view of the head's output: indexing out its batch dimension would give the backward a zero-filled copy
        # of the logits' size (select's gradient: 26 MB a bf16 training pass of the benchmark, 52 MB in fp32)
        logits = out.logits if logits_to_keep else _per_column(out.logits[0], L, grid)
        out.logits = logits.reshape(B, -1, logits.shape[-1])
    if getattr(out, "last_hidden_state", None) is not None:
        h = out.last_hidden_state
        out.head_hidden_state = h[:, :L]
        out.last_hidden_state = _per_column(h[0], L, grid).reshape(B, T, h.shape[-1])
    return out


def _per_column(x: torch.Tensor, n_shared: int, grid: torch.Tensor | None, dim: int = 0) -> torch.Tensor:
    """The packed sequence's L + n positions along `dim` of `x` → each remainder column's, B·T' of them
    (`packed_forward`'s `grid`; without it, the remainders are the sequence after the head, a view)."""
    return x.narrow(dim, n_shared, x.shape[dim] - n_shared) if grid is None else x.index_select(dim, grid)


def shared_forward(model, trunk, ids, mask, n_shared: int, cache_kw: str, **kwargs):
    """`model` (a causal LM or its trunk) on a left-padded batch whose rows share their first `n_shared` tokens:
    as one packed sequence where `packs(trunk)` (`packed_forward`), else the shared tokens through `trunk` once and
    the remainders through `model` on the repeated cache. The output has the full pass's last positions (all of
    them from T − T' on)."""
    if packs(trunk) and (model is trunk or kwargs.get("logits_to_keep")):  # (an LM head on every position: cached)
        return packed_forward(model, ids, mask, n_shared, kwargs.pop("logits_to_keep", 0))
    shared, rest, full_mask, rest_pos = split_batch(ids, mask, n_shared)
    cache = shared_cache(trunk, shared, ids.shape[0])
    return model(input_ids=rest, attention_mask=full_mask, position_ids=rest_pos, use_cache=True,
                 **{cache_kw: cache}, **kwargs)


def prefilled_prompts(trunk, ids, mask, n_shared: int):
    """For `generate`: left-padded prompts [B, T] whose rows share their first `n_shared` tokens, laid out as the
    shared tokens followed by the remainder columns (`split_batch`) → (input ids [B, L + T'], attention mask
    [B, L + T'], the cache of the shared tokens). With that cache, generate's prefill runs only the remainders: each
    prompt token at its full-pass position (the mask's running count), attending to the same tokens."""
    shared, rest, full_mask, _ = split_batch(ids, mask, n_shared)
    B = ids.shape[0]
    return torch.cat([shared.expand(B, -1), rest], 1), full_mask, shared_cache(trunk, shared, B)


def shared_hidden(trunk, ids, mask, n_shared: int, cache_kw: str) -> torch.Tensor:
    """`trunk`'s last hidden states [B, T, H] of a right-padded batch (every row starts at column 0, as a reward
    model scores) whose rows share their first `n_shared` tokens: those run once, the rest of each row on their
    repeated cache, and the shared states are put back in front, so any pooling reads the columns it would have."""
    if int(leading_pads(mask).max()):
        raise ValueError("shared_hidden takes right-padded rows (every row's first token in column 0).")
    if packs(trunk):
        out = packed_forward(trunk, ids, mask, n_shared)
        return torch.cat([out.head_hidden_state.expand(ids.shape[0], -1, -1), out.last_hidden_state], 1)
    shared, rest, full_mask, rest_pos = split_batch(ids, mask, n_shared)
    cache, h_shared = shared_pass(trunk, shared, ids.shape[0])
    h_rest = trunk(input_ids=rest, attention_mask=full_mask, position_ids=rest_pos, use_cache=True,
                   **{cache_kw: cache}).last_hidden_state
    return torch.cat([h_shared.expand(ids.shape[0], -1, -1), h_rest], 1)
