"""Sampling responses from the demo policy: model loading and a KV-cache sampling loop."""

from __future__ import annotations

import sys
from pathlib import Path


def _load_converted(name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_ext.models import resolve_model_path

    path = resolve_model_path(name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return tok, model, f"resolve_model_path({name!r})"


def _load_gguf_in_memory(name: str, embedded_models, package_file):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = package_file(*embedded_models[name.lower()]) if name.lower() in embedded_models else Path(name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return tok, model, f"GGUF loaded in memory: {gguf.name}"


def load_policy(name: str):
    """Tokenizer + fp32 causal LM. Uses `rlhf_ext.models.resolve_model_path`; if that (GGUF->safetensors
    conversion) fails, falls back to loading the embedded GGUF directly in memory (same dequantised weights)."""
    try:
        tok, model, source = _load_converted(name)
    except Exception as err:  # noqa: BLE001 - any failure of the converter: load the GGUF in memory instead
        from rlhf_ext.models import EMBEDDED_MODELS, _package_file

        if name.lower() not in EMBEDDED_MODELS and not name.endswith(".gguf"):
            raise
        print(f"[build_sentiment_data] resolve_model_path failed ({type(err).__name__}: {err}); "
              "loading the GGUF directly in memory instead.", file=sys.stderr)
        tok, model, source = _load_gguf_in_memory(name, EMBEDDED_MODELS, _package_file)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # pad == eos is fine: padding is found via attention masks only
    tok.padding_side = "left"
    return tok, model, source


def _sample(logits, temperature: float, top_p: float, top_k: int):
    """One ancestral-sampling step with the same semantics as HF `generate` (temperature -> top-k -> top-p)."""
    import torch

    logits = logits.float() / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = torch.sort(logits, descending=True, dim=-1)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    # inverse-CDF draw: same distribution as torch.multinomial, ~20x cheaper over a 49k vocabulary on CPU
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def _cache_rows(cache, fn):
    """Apply a batch-dimension op (repeat / select rows) to every layer of a StaticCache, in place."""
    for layer in cache.layers:
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)
        layer.batch_size = layer.keys.shape[0]



def _eos_id(tok) -> int:
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    if eos_id is None or eos_id == tok.unk_token_id:
        eos_id = tok.eos_token_id
    return eos_id


def _encode_chat(tok, prompts):
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _prefill(model, enc, k: int, max_new_tokens: int):
    """Run the prompts once, then repeat cache, logits, mask and positions for the k samples of each prompt."""
    from transformers import StaticCache

    attn = enc["attention_mask"]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    # Static (preallocated) cache: a DynamicCache re-concatenates every layer's keys/values each step,
    # which costs more than the matmuls on CPU at these batch sizes.
    cache = StaticCache(config=model.config, max_cache_len=attn.shape[1] + max_new_tokens)
    o = model(input_ids=enc["input_ids"], attention_mask=attn, position_ids=pos, past_key_values=cache,
              use_cache=True, logits_to_keep=1)
    logits = o.logits[:, -1]
    _cache_rows(cache, lambda t: t.repeat_interleave(k, 0))
    logits = logits.repeat_interleave(k, 0)
    attn = attn.repeat_interleave(k, 0)
    next_pos = pos[:, -1:].repeat_interleave(k, 0) + 1
    return cache, logits, attn, next_pos


def _sample_batch(model, enc, idx, eos_id: int, args):
    """Token ids per (prompt index, sample index), and the set of those that emitted `<|im_end|>`."""
    import torch

    k = args.samples_per_prompt
    with torch.no_grad():
        cache, logits, attn, next_pos = _prefill(model, enc, k, args.max_new_tokens)
        rows = [(i, j) for i in idx for j in range(k)]  # the (prompt, sample) each live row belongs to
        toks = {r: [] for r in rows}
        ended = set()
        for step in range(args.max_new_tokens):
            nxt = _sample(logits, args.temperature, args.top_p, args.top_k)
            for r, t in zip(rows, nxt.tolist()):
                if t == eos_id:
                    ended.add(r)
                else:
                    toks[r].append(t)
            keep = [n for n, r in enumerate(rows) if r not in ended]
            if not keep or step == args.max_new_tokens - 1:
                break
            if len(keep) < len(rows):  # drop finished rows from the batch (and the cache)
                sel = torch.tensor(keep)
                _cache_rows(cache, lambda t: t[sel])
                nxt, attn, next_pos = nxt[sel], attn[sel], next_pos[sel]
                rows = [rows[n] for n in keep]
            attn = torch.cat([attn, attn.new_ones(len(rows), 1)], dim=-1)
            o = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=next_pos, past_key_values=cache, use_cache=True)
            logits = o.logits[:, -1]
            next_pos = next_pos + 1
    return toks, ended


def generate(tok, model, prompts, args, seed_offset: int, bar):
    """Sample `args.samples_per_prompt` responses per prompt. Returns a list (per prompt) of lists of dicts.

    A plain KV-cache sampling loop rather than `model.generate`, for CPU speed only: each batch of prompts is
    prefilled once and its cache repeated for the k samples (generate would prefill every copy), and rows that
    have emitted `<|im_end|>` are dropped from the batch. Left padding + attention mask + mask-derived position
    ids, exactly as `generate` does; the sampling distribution is the same (temperature, top-k, top-p).
    """
    import torch

    eos_id = _eos_id(tok)
    k = args.samples_per_prompt
    per_batch = max(1, args.batch_size // k)  # prompts per batch; batch_size counts sequences
    out = [[None] * k for _ in prompts]
    for b, start in enumerate(range(0, len(prompts), per_batch)):
        idx = list(range(start, min(start + per_batch, len(prompts))))
        enc = _encode_chat(tok, [prompts[i] for i in idx])
        torch.manual_seed(args.seed * 1_000_003 + seed_offset + b)  # per batch: a batch's samples do not depend on earlier ones
        toks, ended = _sample_batch(model, enc, idx, eos_id, args)
        for (i, j), ids in toks.items():
            out[i][j] = {"text": tok.decode(ids, skip_special_tokens=True).strip(), "tokens": len(ids), "eos": (i, j) in ended}
        bar.update(len(idx) * k)
    return out
