"""Decoding steps on CPU without the model's module stack, for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3).

After the prompt is prefilled, a decoding step of transformers' forward runs ~6,000 tensor operations (views, casts,
PEFT's wrapper around every adapted layer, the cache's concatenations) for a few rows each: on a 2-core Zen 5 in
bf16, ~33 ms a token for 8 sequences of SmolLM2-135M with LoRA on q/v, of which ~11 ms are the products. Here a
step is the same math in ~25 operations a layer:

  * the linears of a layer that read one input run as one product from one packed copy (`cpu_matmul.
    packed_weight`): [q | k | v], [gate | up], o, down, and the LM head;
  * a LoRA adapter on such a linear is folded into that product: y = [x | x·Aᵀ] · [W | s·B]ᵀ, its A product one
    small matmul, its s·B extra columns of the packed weight (at θ₀, B = 0: nothing added to the base's sum);
  * keys and values go into buffers allocated once for the whole decode instead of a concatenation per step;
  * the rest is the model's own embedding, rotary embedding, activation and Qwen3's q/k norms, and its RMS norms and
    `apply_rotary_pos_emb` written with fewer operations (`F.rms_norm`; a roll for rotate_half), each used only where
    it gives the model's bits on a probe input.

Products run in the dtype the model's would (autocast's, else the weights'), from copies made for this decode and
dropped after it, as `cpu_matmul.few_row_linear` packs them. It is the same function up to rounding, not the same
bits: the LoRA term is accumulated with the base's in one fp32 sum instead of rounded apart, and products are
fused. Measured against transformers' own step (`tests/test_cpu_decode.py`): fp32 within 1e-4 in log-probability;
sampling against the training forward, which PPO's ratios and the KL guard use, is what the start-up check bounds
(`precision.SAMPLING_KL_TOLERANCE`) through this very path. Any other model, adapter type (DoRA, LoRA variants, a
4-bit base), attention implementation or cache (a sliding window's) runs transformers' steps.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from ..cpu_linear import onednn_product
from .cpu_matmul import PACKABLE, _pack_op, _packing_pays, packed_weight, within_memory_share

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")  # config.model_type
_ATTENTION = ("sdpa", "eager")  # the attention implementations a lean step reproduces up to rounding


def _adapted(module) -> tuple[torch.nn.Linear, list[tuple[torch.Tensor, torch.Tensor]]] | None:
    """(the plain linear a product reads, [(A [r, in], s·B [out, r]) of each active LoRA adapter]) of a linear or
    PEFT LoRA linear as its forward would run it now; None for anything a fold would not reproduce."""
    if type(module) is torch.nn.Linear:
        return module, []
    base = getattr(module, "base_layer", None)
    if type(base) is not torch.nn.Linear or not hasattr(module, "lora_A"):
        return None
    if module.disable_adapters or module.merged:  # the base alone (merged: the adapter is in its weight)
        return base, []
    parts = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        A, B, drop = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
        if (name in getattr(module, "lora_variant", {}) or type(A) is not torch.nn.Linear
                or type(B) is not torch.nn.Linear or B.bias is not None
                or (module.training and not isinstance(drop, torch.nn.Identity))):
            return None
        parts.append((A.weight, B.weight.float() * module.scaling[name]))
    return base, parts


class _Product:
    """Linears that read one input as one product from a packed copy. x [M, in] → their outputs [M, out_i]."""

    def __init__(self, modules, dtype: torch.dtype, rows: int):
        parts = [_adapted(m) for m in modules]
        self.splits = [base.weight.shape[0] for base, _ in parts]
        weight = torch.cat([base.weight.detach() for base, _ in parts]).to(dtype)
        adapters = [(i, A, sB) for i, (_, ads) in enumerate(parts) for A, sB in ads]
        self.A = None
        if adapters:
            A = torch.cat([A.detach() for _, A, _ in adapters]).to(dtype)  # [Σr, in]
            self.A = packed_weight(A, rows)  # packed too: unpacked, a few-row product by A took ~60 µs in bf16
            extra = torch.zeros(weight.shape[0], A.shape[0])
            starts = [sum(self.splits[:i]) for i in range(len(parts))]
            col = 0
            for i, _, sB in adapters:
                extra[starts[i]:starts[i] + self.splits[i], col:col + sB.shape[1]] = sB.detach()
                col += sB.shape[1]
            weight = torch.cat([weight, extra.to(dtype)], 1)
        biases = [base.bias for base, _ in parts]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else weight.new_zeros(n) for b, n in zip(biases, self.splits)]).to(dtype)
        self.dtype, self.weight = dtype, packed_weight(weight.contiguous(), rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[M, in] → [M, Σ out_i], the linears' outputs side by side (`splits`)."""
        x = x.to(self.dtype)
        if self.A is not None:
            x = torch.cat([x, onednn_product(x, self.A)], -1)
        return onednn_product(x, self.weight, self.bias)


_NORM_MATCHES: dict[tuple[type, torch.dtype], bool] = {}  # (norm class, dtype) → whether `_norm`'s form is its


def _norm(module, dtype: torch.dtype):
    """An RMS norm module's function as `F.rms_norm` computes it (4 operations where the module runs 8): used where
    it gives the module's output on a probe in `dtype` — checked once per norm class and dtype —, else the module."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(eps, float) or weight.ndim != 1:
        return module

    def norm(x):
        return weight * F.rms_norm(x.float(), weight.shape, eps=eps).to(x.dtype)

    key = (type(module), dtype)
    if key not in _NORM_MATCHES:
        probe = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(dtype)
        _NORM_MATCHES[key] = torch.equal(norm(probe), module(probe))
    return norm if _NORM_MATCHES[key] else module


@functools.cache
def _rotation(rotate, dtype: torch.dtype, d: int):
    """(cos, sin) → a function rotating [B, heads, d] by them as `rotate` (the model's `apply_rotary_pos_emb`)
    does: x·cos + rotate_half(x)·sin, with rotate_half(x)·sin computed as roll(x)·(sin with its first half negated)
    — the same products, so the same bits (checked on a probe once per function, dtype and width; where they
    differ, the model's function)."""
    def ours(cos, sin):
        signed = torch.cat([-sin[..., : d // 2], sin[..., d // 2:]], -1)
        return lambda x: x * cos + x.roll(d // 2, -1) * signed

    def models(cos, sin):
        return lambda x: rotate(x[:, :, None], x[:, :, None], cos, sin)[0][:, :, 0]

    g = torch.Generator().manual_seed(0)
    x, cos, sin = (torch.randn(2, 3, d, generator=g).to(dtype) for _ in range(3))
    same = torch.equal(ours(cos[:, :1], sin[:, :1])(x), models(cos[:, :1], sin[:, :1])(x))
    return ours if same else models


def _rotary_function(model):
    """The `apply_rotary_pos_emb` of `model`'s modeling module, or None."""
    return getattr(sys.modules[type(model).__module__], "apply_rotary_pos_emb", None)


def _layers_of(model):
    """(decoder, layers) where `model` is a causal LM of a supported family built as its library class is, else None."""
    cfg = getattr(model, "config", None)
    decoder = getattr(model, "model", None)
    if (getattr(cfg, "model_type", None) not in SUPPORTED or getattr(cfg, "_attn_implementation", None) not in _ATTENTION
            or getattr(cfg, "pretraining_tp", 1) != 1 or not hasattr(model, "lm_head")
            or not all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))):
        return None
    return decoder, list(decoder.layers)


def _linears(model, layers) -> list:
    """The linears a lean step computes: the LM head and each layer's seven."""
    return [model.lm_head] + [lin for layer in layers for lin in (
        layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]


class LeanDecoder:
    """The decoding steps after a prefill (`fits` decides, `start` takes over). `step(tokens)` → logits [B, V]."""

    def __init__(self, model, decoder, layers, dtype, keys, values, mask, position):
        B = mask.shape[0]
        self.decoder, self.layers = decoder, layers
        attn = layers[0].self_attn
        self.heads = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim  # H, kv, d
        self.products = [(_Product([a.q_proj, a.k_proj, a.v_proj], dtype, B), _Product([a.o_proj], dtype, B),
                          _Product([m.gate_proj, m.up_proj], dtype, B), _Product([m.down_proj], dtype, B))
                         for a, m in ((layer.self_attn, layer.mlp) for layer in layers)]
        self.head = _Product([model.lm_head], dtype, B)
        residual = decoder.embed_tokens.weight.dtype  # the residual stream's dtype, which the norms are given
        self.norms = [(_norm(layer.input_layernorm, residual), _norm(layer.post_attention_layernorm, residual))
                      for layer in layers]
        self.final_norm = _norm(decoder.norm, residual)
        self.rotation = _rotation(_rotary_function(model), torch.promote_types(dtype, residual), attn.head_dim)
        self.keys, self.values = keys, values  # per layer [B, kv heads, P + steps, d], the first P filled
        self.filled = mask.shape[1] - 1  # the prompt's columns; the mask's last one is the token to come
        self.mask = torch.ones(B, keys[0].shape[2], dtype=torch.bool)
        self.mask[:, :self.filled] = mask[:, :-1].bool()
        self.position = position  # [B] the next token's position id

    @staticmethod
    def fits(model, steps: int, rows: int, backend: str) -> torch.dtype | None:
        """Before the prefill: the dtype a lean decode of `steps` steps over `rows` sequences of `model` would compute
        in (autocast's, else the weights'), or None where it would not run — another family, a linear it would not
        reproduce, weights it cannot pack, copies that would pass 1/PACK_MEMORY_SHARE of the memory, a decode that
        packing does not repay (`cpu_matmul._packing_pays`), or `backend` "torch"."""
        found = _layers_of(model) if backend != "torch" and steps >= 1 and _pack_op() is not None else None
        if found is None or _rotary_function(model) is None:
            return None
        parts = [_adapted(m) for m in _linears(model, found[1])]
        weights = {base.weight.dtype for base, _ in parts} if None not in parts else set()
        if len(weights) != 1 or not weights <= set(PACKABLE) or any(b.weight.device.type != "cpu" for b, _ in parts):
            return None
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weights.pop()
        size = sum(base.weight.numel() for base, _ in parts) * torch.tensor([], dtype=dtype).element_size()
        if dtype not in PACKABLE or not within_memory_share(size) or not _packing_pays(
                dtype, steps, rows, backend):
            return None
        return dtype

    @classmethod
    def start(cls, model, model_kwargs: dict, steps: int, dtype: torch.dtype) -> "LeanDecoder | None":
        """After transformers' prefill and its first kwargs update (the cache holds the prompt, the mask has one
        column more), for a model `fits` accepted: a LeanDecoder computing in `dtype`, whose buffers take the
        cache's keys and values; None — nothing changed — where the cache is not a plain one per layer (a sliding
        window's keeps only its last keys)."""
        decoder, layers = _layers_of(model)
        cache, mask = model_kwargs.get("cache"), model_kwargs.get("attention_mask")
        cache_layers = getattr(cache, "layers", [])
        if mask is None and cache_layers and cache_layers[0].keys is not None:  # transformers drops an all-ones mask
            keys = cache_layers[0].keys
            mask = torch.ones(keys.shape[0], keys.shape[2] + 1, dtype=torch.long, device=keys.device)
        if (mask is None or mask.ndim != 2 or len(cache_layers) != len(layers)
                or any(type(c).__name__ != "DynamicLayer" or c.keys is None or c.keys.shape[2] != mask.shape[1] - 1
                       for c in cache_layers)):
            return None
        keys, values = [], []
        for c in cache_layers:
            k = c.keys.new_empty(*c.keys.shape[:2], mask.shape[1] + steps, c.keys.shape[3])
            v = c.values.new_empty(k.shape)
            k[:, :, :c.keys.shape[2]], v[:, :, :c.keys.shape[2]] = c.keys, c.values
            keys.append(k)
            values.append(v)
        position = model_kwargs["position_ids"][:, -1] if model_kwargs.get("position_ids") is not None else (
            mask.long().sum(1) - 1)
        model_kwargs["cache"] = None  # the buffers hold its keys and values now
        with torch.no_grad():
            return cls(model, decoder, layers, dtype, keys, values, mask, position)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The logits after `tokens` [B] are appended to every sequence: [B, V]."""
        (B, n), (H, kv, d) = (tokens.shape[0], self.filled), self.heads
        x = self.decoder.embed_tokens(tokens)  # [B, D]
        cos, sin = self.decoder.rotary_emb(x[:, None], self.position[:, None])  # [B, 1, d] each
        rotate = self.rotation(cos, sin)
        mask = self.mask[:, None, None, :n + 1]
        for layer, (qkv, out, gate_up, down), (norm1, norm2), keys, values in zip(
                self.layers, self.products, self.norms, self.keys, self.values):
            attn = layer.self_attn
            heads = qkv(norm1(x)).view(B, H + 2 * kv, d)  # q | k | v heads
            if hasattr(attn, "q_norm"):  # Qwen3: an RMS norm per head before the rotation
                q, k = rotate(attn.q_norm(heads[:, :H])), rotate(attn.k_norm(heads[:, H:H + kv]))
            else:
                qk = rotate(heads[:, :H + kv])
                q, k = qk[:, :H], qk[:, H:]
            keys[:, :, n], values[:, :, n] = k, heads[:, H + kv:]
            # a key/value head's query heads as rows of one attention (transformers' repeat_kv order: kv·g + j)
            a = F.scaled_dot_product_attention(q.reshape(B, kv, H // kv, d), keys[:, :, :n + 1],
                                               values[:, :, :n + 1], attn_mask=mask, scale=attn.scaling)
            x = x + out(a.reshape(B, H * d))
            g, u = gate_up(norm2(x)).chunk(2, -1)
            x = x + down(layer.mlp.act_fn(g) * u)
        self.filled, self.position = n + 1, self.position + 1
        return self.head(self.final_norm(x))
