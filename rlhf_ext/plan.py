"""`rlhf-ext plan`: how much GPU memory one PPO iteration of rlhf_ext needs, from the model's config alone.

    rlhf-ext plan --model Qwen2.5-7B-Instruct --load-in-4bit --gpu-memory 24 --batch 16 --prompt-length 512 \\
                  --completion-length 256 --minibatches 4 --gradient-checkpointing
    rlhf-ext plan --model gpt2 --gpu-memory 24 --completion-length 128            # largest batch that fits
    rlhf-ext plan --model ./my-model/ --json                                       # a folder, or its config.json

No weights are read: a local folder's (or a path's) config.json, `transformers.AutoConfig` for Hub ids (online
only), or a shape shipped in `rlhf_ext/plan_shapes/*.json`.

What the plan counts is what the trainer holds (ppo/trainer.py, ppo/policy.py, monitor/monitor.py), phase by
phase; every iteration is alike (the previous rollout is released before the next one is sampled). Notation: B prompts
per iteration, b = B / minibatches rows per training forward, P prompt and R completion tokens (T = P + R), V
vocabulary, H hidden, I MLP width, L layers (L_t of them trained: all, or the top `--lora-top-layers`), n_h / n_kv
attention / KV heads of size d, a = bytes of an activation (2 in bf16/fp16; 4 in fp32 *and on a 4-bit base*, whose
non-quantised parts PEFT's `prepare_model_for_kbit_training` upcasts to fp32, so the hidden states, the KV cache and
the logits are fp32 too). "logits" = one [B, R, V] fp32 tensor (4·B·R·V).

  generation     weights + trainable state + KV cache + prefill (nothing of the previous rollout is alive)
  reward scoring weights + … + K reward members scoring min(16, B) texts (× K in adapters mode, one mixed batch)
  reference pass the reference's logits at the response positions, z/T in fp32, and their full log-softmax [B, R, V]
  training step  saved activations of the training forward + ONE policy logits tensor (each step's are freed before
                 the next forward; with one minibatch the θ_old forward is epoch 1's and is freed by it) + the
                 backward's transients (the logits' gradient, twice its size at once)
  exact-KL check (hard controller) Σ_v p (log p − log p_ref) in float64, one sequence at a time: 5 × [R, V] float64
  monitor        between iterations, while this iteration's rollout is still alive: the reward-hacking monitor's
                 review queue samples, scores and measures the KL of ≤ `monitor_max_queue` (2) prompts

Each formula is a small function below, with its derivation in the docstring; `estimate()` puts them together and
returns bytes per component and per phase, `largest_batch()` searches the batch. The numbers were checked against
measured peaks on CPU (benchmarks/memory_plan_check.py) and, when a GPU is available, scripts/gpu_check.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GiB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# NF4 with double quantisation (rlhf_ext.models.quantization_config): 4 bits per weight + one uint8 absmax per
# 64-weight block + one fp32 absmax-of-absmax per 256 blocks (+ two small code books, ignored).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
NF4_CONSTANT_BYTES_PER_PARAM = NF4_BYTES_PER_PARAM - 0.5
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "tie_word_embeddings", "max_position_embeddings")
CUDA_CONTEXT_BYTES = int(0.5 * GiB)  # CUDA context + cuBLAS/cuDNN handles: outside torch's allocator
ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation: reserved ≈ 1.1 × allocated at the peak
REWARD_SCORING_BATCH = 16  # RewardEnsemble.score_completions(batch_size=16)
TARGET_ALIASES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
                  "down_proj": "down", "c_attn": "qkv", "c_fc": "up", "c_proj": "o"}
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")
PHASES = ("generation", "reward scoring", "reference pass", "training step", "exact-KL check", "monitor")
SHAPES_DIR = Path(__file__).resolve().parent / "plan_shapes"


class PlanError(ValueError):
    """A model the plan cannot read (unknown name, offline Hub id, malformed config)."""


# ------------------------------------------------------------------------------------------------------ shapes
def shipped_shapes() -> dict[str, dict]:
    """Name → shape of every `plan_shapes/*.json` (architecture fields + hub_id + source)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(SHAPES_DIR.glob("*.json"))}


def shape_from_config(cfg) -> dict:
    """The architecture fields the plan needs, from a config.json dict or a transformers config (GPT-2 names —
    n_embd, n_layer, n_head, n_inner, n_positions — included; multimodal configs via their text config)."""
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    cfg = dict(cfg)
    if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}

    def first(*names, default=None):
        return next((cfg[n] for n in names if cfg.get(n) is not None), default)

    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head")
    layers = first("num_hidden_layers", "n_layer")
    vocab = first("vocab_size")
    if None in (hidden, heads, layers, vocab):
        raise PlanError(f"The config lacks architecture fields (hidden_size / num_attention_heads / "
                        f"num_hidden_layers / vocab_size): found keys {sorted(cfg)[:20]}…")
    shape = {
        "model_type": cfg.get("model_type", "llama"),
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(first("intermediate_size", "n_inner", default=4 * hidden)),
        "num_hidden_layers": int(layers),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(first("num_key_value_heads", default=heads)),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True)),
        "max_position_embeddings": first("max_position_embeddings", "n_positions"),
    }
    for extra in ("head_dim", "name", "hub_id", "source", "attention_bias"):
        if cfg.get(extra) is not None:
            shape[extra] = cfg[extra]
    return shape


def load_shape(model: str) -> dict:
    """`model` → shape: an existing folder holding config.json or a config.json path; else a shipped name
    (case-insensitive; also a Hub id or the embedded default whose last part is one); else a Hub id through
    `AutoConfig` (network needed)."""
    shipped = shipped_shapes()
    path = Path(model).expanduser()
    by_key = {k.lower(): k for k in shipped}
    key = str(model).rstrip("/").split("/")[-1].lower()
    if key in by_key and not path.exists():
        return shape_from_config(shipped[by_key[key]])
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PlanError(f"{path} is a folder without config.json.")
        path = path / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path} is not valid JSON ({e}).") from None
        return {**shape_from_config(cfg), "name": cfg.get("_name_or_path") or path.parent.name, "source": str(path)}
    names = ", ".join(shipped)
    if str(model).startswith((".", "/", "~")) or str(model).endswith(".json"):
        raise PlanError(f"No model config at {model!r}. Pass a folder with config.json, a config.json, a Hub id, or "
                        f"one of the shipped shapes: {names}.")
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model)
    except Exception as e:  # noqa: BLE001 — offline, gated, misspelt: say which and what works offline
        raise PlanError(f"Could not read the config of {model!r} from the Hugging Face Hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]}). Offline, pass a local folder / config.json, or one of the "
                        f"shipped shapes: {names}.") from None
    return {**shape_from_config(cfg), "name": model, "source": f"AutoConfig.from_pretrained({model!r})"}


def _dims(shape: dict) -> tuple[int, int, int, int, int, int, int, int]:
    """(V, H, I, L, n_h, n_kv, d, d_q = n_h·d)."""
    H, nh = shape["hidden_size"], shape["num_attention_heads"]
    d = shape.get("head_dim") or H // nh
    return (shape["vocab_size"], H, shape["intermediate_size"], shape["num_hidden_layers"], nh,
            shape["num_key_value_heads"], d, nh * d)


def is_gpt2(shape: dict) -> bool:
    return shape.get("model_type") == "gpt2"


# --------------------------------------------------------------------------------------------------- weights
def parameter_counts(shape: dict) -> dict:
    """Parameters by kind.

    embeddings = V·H (+ n_positions·H learned positions for GPT-2); lm_head = V·H unless tied;
    linear (the decoder layers' matrices, what 4-bit quantises) = L·(H·d_q + 2·H·n_kv·d + d_q·H + m·H·I),
    m = 3 for gated MLPs (Llama, Mistral, Qwen2), 2 for GPT-2; other = norms (2·H per layer + H, doubled for
    LayerNorm's bias) + biases (Qwen2: q, k, v; GPT-2: every linear)."""
    V, H, I, L, nh, nkv, d, dq = _dims(shape)
    gpt2 = is_gpt2(shape)
    embeddings = V * H + (gpt2 and (shape.get("max_position_embeddings") or 1024) * H)
    lm_head = 0 if shape.get("tie_word_embeddings", True) else V * H
    linear = L * (H * dq + 2 * H * nkv * d + dq * H + (2 if gpt2 else 3) * H * I)
    norms = (2 * L + 1) * H * (2 if gpt2 else 1)
    if gpt2:
        biases = L * (3 * H + H + I + H)
    elif shape.get("model_type") == "qwen2" or shape.get("attention_bias"):
        biases = L * (dq + 2 * nkv * d)
    else:
        biases = 0
    other = norms + biases
    return {"embeddings": embeddings, "lm_head": lm_head, "linear": linear, "other": other,
            "total": embeddings + lm_head + linear + other}


def base_weight_bytes(shape: dict, dtype: str = "bf16", load_in_4bit: bool = False) -> dict:
    """Bytes of the frozen base.

    Without quantisation: every parameter × bytes(dtype).
    4-bit (bitsandbytes NF4, double quantisation): the decoder layers' linear weights take 0.5 B/param packed plus
    quant constants 1/64 + 4/16384 B/param (uint8 absmax per 64-block, fp32 absmax per 256 blocks) ≈ 0.516 B/param.
    Everything else — embeddings, the LM head (never quantised), norms, biases — is fp32 (4 B/param): PPOTrainer
    calls PEFT's `prepare_model_for_kbit_training`, which upcasts every non-4-bit bf16/fp16 parameter to fp32.
    → {"quantized": packed bytes, "quant_constants": …, "unquantized": …, "total": …}"""
    n = parameter_counts(shape)
    if not load_in_4bit:
        total = n["total"] * DTYPE_BYTES[dtype]
        return {"quantized": 0, "quant_constants": 0, "unquantized": total, "total": total}
    packed = n["linear"] * 0.5
    constants = n["linear"] * NF4_CONSTANT_BYTES_PER_PARAM
    rest = (n["total"] - n["linear"]) * 4
    return {"quantized": int(packed), "quant_constants": int(constants), "unquantized": rest,
            "total": int(packed + constants + rest)}


def normalize_targets(targets) -> tuple[str, ...]:
    """'q,k,v,o' / ['q_proj', 'v_proj'] / 'all-linear' → canonical short names."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out = []
    for t in targets:
        t = TARGET_ALIASES.get(t, t)
        if t == "all-linear":
            out += ["q", "k", "v", "o", "gate", "up", "down"]
        elif t == "qkv":
            out += ["q", "k", "v"]
        elif t in ALL_TARGETS:
            out.append(t)
        else:
            raise PlanError(f"Unknown LoRA target {t!r}; use a comma list of {', '.join(ALL_TARGETS)} "
                            f"(or q_proj, …, all-linear).")
    return tuple(dict.fromkeys(out))


def lora_modules(shape: dict, targets) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of the LoRA-wrapped modules of ONE decoder layer.

    Llama-like: q (H→d_q), k and v (H→n_kv·d), o (d_q→H), gate and up (H→I), down (I→H).
    GPT-2 fuses q, k, v into c_attn (H→3H): any of q/k/v adapts the whole of it; o = attn.c_proj, up = c_fc,
    down = mlp.c_proj; GPT-2 has no gate."""
    V, H, I, L, nh, nkv, d, dq = _dims(shape)
    targets = normalize_targets(targets)
    if is_gpt2(shape):
        dims = {"qkv": (H, 3 * H), "o": (H, H), "up": (H, I), "down": (I, H)}
        mods = (["qkv"] if {"q", "k", "v"} & set(targets) else []) + [t for t in ("o", "up", "down") if t in targets]
    else:
        dims = {"q": (H, dq), "k": (H, nkv * d), "v": (H, nkv * d), "o": (dq, H), "gate": (H, I), "up": (H, I),
                "down": (I, H)}
        mods = [t for t in ("q", "k", "v", "o", "gate", "up", "down") if t in targets]
    return [(m, *dims[m]) for m in mods]


def lora_parameter_count(shape: dict, r: int, targets, layers: int | None = None) -> int:
    """Σ over adapted layers and modules of r·(in + out) (LoRA A: in×r, B: r×out), + r·(H + V) for an `lm_head`
    target. `layers`: how many decoder layers carry LoRA (default all)."""
    V, H, *_ = _dims(shape)
    layers = shape["num_hidden_layers"] if layers is None else layers
    per_layer = sum(r * (i + o) for _, i, o in lora_modules(shape, targets))
    head = r * (H + V) if "lm_head" in normalize_targets(targets) else 0
    return layers * per_layer + head


def trainable_bytes(n_trainable: int, n_guarded: int = 0) -> dict:
    """Trained parameters (LoRA adapters + value head) in fp32: 4 B value + 4 B gradient + 8 B AdamW moments
    (exp_avg, exp_avg_sq) = 16 B/param. The hard KL guard keeps two fp32 copies of the policy adapter (the anchor
    θ_0 and the per-epoch snapshot): + 8 B per guarded param."""
    return {"params": 4 * n_trainable, "grads": 4 * n_trainable, "adamw": 8 * n_trainable,
            "kl_guard": 8 * n_guarded, "total": 16 * n_trainable + 8 * n_guarded}


# ------------------------------------------------------------------------------------------------ activations
def layer_activation_bytes_per_token(shape: dict, targets, r: int, a: int, seq_len: int) -> float:
    """Bytes autograd saves per token in one trained decoder layer of the training forward (frozen base, LoRA on
    `targets`, dropout off), measured op by op with `torch.autograd.graph.saved_tensors_hooks`:

    Llama-like:  2 RMSNorms keep their fp32 input           2·4·H
                 SDPA keeps q, k, v (repeated to n_h heads:   4·a·d_q + 4·n_h (log-sum-exp, fp32)
                 padding masks rule out native GQA) and out
                 its attention-mask bias, per query row      a·T
                 SiLU-gated MLP: gate, SiLU(gate), up        3·a·I
    GPT-2:       2 LayerNorms keep their input               2·a·H
                 fused qkv output + SDPA out                 4·a·H + 4·n_h + a·T
                 gelu_new (tanh form): x, tanh, 1+tanh, x/2  4·a·I
    LoRA:        each adapted module's lora_A keeps its input; when a = 4 inputs already kept count once (q/k/v
                 share the normed hidden state; o's input is SDPA's output, which the kernels return in
                 [B, T, n_h, d] layout so the transpose + contiguous is free); in bf16/fp16 PEFT casts the input to
                 the adapter's fp32 for each module separately (4·in each); lora_B keeps the rank-r middle (4·r)."""
    V, H, I, L, nh, nkv, d, dq = _dims(shape)
    mods = lora_modules(shape, targets)
    if is_gpt2(shape):
        base = 2 * a * H + 4 * a * H + 4 * nh + a * seq_len + 4 * a * I
        shared_inputs = {"qkv": "ln1", "o": "attn_out", "up": "ln2", "down": "mlp_mid"}
    else:
        base = 2 * 4 * H + 4 * a * dq + 4 * nh + a * seq_len + 3 * a * I
        shared_inputs = {"q": "ln1", "k": "ln1", "v": "ln1", "o": "attn_out", "gate": "ln2", "up": "ln2",
                         "down": "mlp_mid"}
    if a == 4:  # o's input is the SDPA output itself (the kernels return it [B, T, n_h, d]-contiguous)
        inputs = {shared_inputs[m]: 4 * i for m, i, _ in mods if shared_inputs[m] != "attn_out"}
        lora = sum(inputs.values())
    else:
        lora = sum(4 * i for _, i, _ in mods)
    lora += sum(4 * r for _ in mods)
    return base + lora


def training_activation_bytes(shape: dict, rows: int, seq_len: int, *, targets, r: int, a: int, trained_layers: int,
                              checkpointing: bool, critic: str = "shared") -> int:
    """Saved activations of one training forward over `rows` sequences of T = `seq_len` tokens.

    Without checkpointing: rows·T·(L_t · per-layer bytes + 4·H for the final norm).
    With gradient checkpointing (non-reentrant): each trained layer keeps only its input hidden state (a·H per
    token) plus, during the backward, one layer recomputed in full: rows·T·(L_t·a·H + per-layer + 4·H).
    Layers below the lowest adapted one save nothing (no parameter and no input there needs a gradient).
    A separate critic runs its own adapter through the trunk once more: × 2."""
    per_layer = layer_activation_bytes_per_token(shape, targets, r, a, seq_len)
    H = shape["hidden_size"]
    if checkpointing:
        per_token = trained_layers * a * H + per_layer + 4 * H
    else:
        per_token = trained_layers * per_layer + 4 * H
    return int(rows * seq_len * per_token * (2 if critic == "separate" else 1))


def backward_transient_bytes(shape: dict, rows: int, seq_len: int, resp_len: int, *, a: int,
                             load_in_4bit: bool = False) -> int:
    """What the backward adds on top of the saved activations and the policy logits, at its worst: the larger of
    - the logits' gradient, twice its size at once: 8·rows·R·V. On CPU (and without TRL's triton kernel) it arrives
      in two [rows, R, V] fp32 halves, selective_log_softmax's gather and its per-row logsumexp (stacked by
      UnbindBackward from per-row gradients), summed into the logits' buffer; with the kernel it is one tensor, but
      the division by the temperature (z/T) then makes a second one while the first is alive. Measured on CPU (fp32,
      benchmarks/memory_plan_check.py): 2.0–2.1 × 4·rows·R·V above the logits themselves.
    - the top layer's MLP backward, whose input gradients (3 of width I; 4 for GPT-2's gelu) exist before the
      saved tensors they replace are released: m·a·I per token.
    Further down, each layer's transients are offset by the activations already released above it. On a 4-bit base,
    + the weight bitsandbytes dequantises to bf16 for the input gradient (2·H·I for the largest)."""
    H, I = shape["hidden_size"], shape["intermediate_size"]
    mlp = (4 if is_gpt2(shape) else 3) * a * I * rows * seq_len
    return int(max(8 * rows * resp_len * shape["vocab_size"], mlp) + (2 * H * I if load_in_4bit else 0))


def loss_transient_bytes(rows: int, resp_len: int, vocab: int) -> int:
    """Between the training forward and its backward, the PPO loss: TRL's `entropy_from_logits` (a statistic, no
    grad at ent_coef = 0) works through 128 rows of [rows·R, V] at a time — log_softmax, exp and their product, fp32:
    12·min(128, rows·R)·V. (selective_log_softmax's per-row logsumexp temporaries are smaller; TRL's triton kernel on
    GPU makes both [rows, R]-sized, so this is an upper bound there.)"""
    return int(12 * min(128, rows * resp_len) * vocab)


def inference_working_bytes(shape: dict, rows: int, seq_len: int, *, a: int, load_in_4bit: bool = False,
                            dtype: str = "bf16") -> int:
    """Largest transient of a no-grad forward over rows·T tokens (one layer at a time; nothing is kept):
    the embedding output (the model's forward keeps it as `inputs_embeds` to the end), residual and normed input
    (3·a·H) + the larger of the MLP (SiLU(gate), up, their product: 3·a·I; GPT-2 4·a·I)
    and the attention (q, k, v, RoPE'd q and k, k and v repeated, output and its contiguous copy:
    a·(6·d_q + 3·n_kv·d)), + PEFT's fp32 copy of the LoRA input in bf16 (4·H), + the attention mask: a bool and a
    converted a-byte bias [rows, T, T] (rows·T²·(1 + a)). On a 4-bit base, + the largest weight dequantised to bf16
    (2·H·I)."""
    V, H, I, L, nh, nkv, d, dq = _dims(shape)
    mlp = (4 if is_gpt2(shape) else 3) * I
    attn = 6 * dq + 3 * nkv * d
    per_token = a * (3 * H + max(mlp, attn)) + (4 * H if a != 4 else 0)
    dequant = 2 * H * I if load_in_4bit else 0
    return int(rows * seq_len * per_token + rows * seq_len * seq_len * (1 + a) + dequant)


def kv_cache_bytes(shape: dict, batch: int, seq_len: int, a: int) -> int:
    """KV cache at the end of sampling: 2 (K and V) · L · n_kv · d · (P + R) · B · a."""
    V, H, I, L, nh, nkv, d, dq = _dims(shape)
    return int(2 * L * nkv * d * seq_len * batch * a)


def logits_bytes(rows: int, resp_len: int, vocab: int) -> int:
    """One [rows, R, V] fp32 tensor: the policy's z/T at the response positions (`policy.py:_lm`, logits_to_keep =
    R + 1), or the reference's full log-softmax kept for the exact KL: 4·rows·R·V."""
    return int(4 * rows * resp_len * vocab)


def exact_kl_bytes(resp_len: int, vocab: int) -> int:
    """`PolicyAndValue.sequence_kl` works one sequence at a time in float64: log_softmax(z[b].double()),
    ref[b].double(), p = exp, log p − log p_ref and their product are alive together: 5 · 8·R·V = 40·R·V bytes,
    whatever the batch (the [B] result is negligible)."""
    return int(40 * resp_len * vocab)


def forward_logits_bytes(rows: int, resp_len: int, vocab: int, logit_bytes: int) -> int:
    """End of a forward that produces logits: the model's own [rows, R+1, V] logits (a bytes each), their fp32 copy
    (bf16 only) and z/T (fp32): rows·V·(a·(R+1) + 4·R·(2 if a = 2 else 1))."""
    return int(rows * vocab * (logit_bytes * (resp_len + 1) + 4 * resp_len * (2 if logit_bytes == 2 else 1)))


def reward_member_bytes(shape: dict, ensemble: int, mode: str, r: int, targets) -> int:
    """K reward members on the shared base: 'adapters' = K frozen LoRA adapters (fp32) + K one-output heads;
    'heads' = one adapter + a K-output head. Bytes = 4·(adapters·LoRA params + K·(H + 1))."""
    if ensemble <= 0:
        return 0
    adapters = ensemble if mode == "adapters" else 1
    return int(4 * (adapters * lora_parameter_count(shape, r, [t for t in normalize_targets(targets) if t != "lm_head"])
                    + ensemble * (shape["hidden_size"] + 1)))


def reward_scoring_bytes(shape: dict, batch: int, seq_len: int, ensemble: int, mode: str, *, a: int,
                         load_in_4bit: bool = False) -> int:
    """Scoring texts of ≈ P + R tokens with K members, no grad, in forwards of at most 16 rows
    (RewardEnsemble.score_completions): min(16, B) texts in 'heads' mode; in 'adapters' mode min(16 // K, B) texts
    × K members in one mixed-adapter batch (PEFT adapter_names); the working set of that forward + the final hidden
    states kept for pooling (rows·T·a·H)."""
    if ensemble <= 0:
        return 0
    if mode == "adapters":
        rows = min(max(1, REWARD_SCORING_BATCH // ensemble), batch) * ensemble
    else:
        rows = min(REWARD_SCORING_BATCH, batch)
    return (inference_working_bytes(shape, rows, seq_len, a=a, load_in_4bit=load_in_4bit)
            + int(rows * seq_len * a * shape["hidden_size"]))


def overhead_bytes(peak_allocated: int, device: str = "cuda") -> int:
    """GPU: CUDA context (≈ 0.5 GiB, outside torch's allocator) + caching-allocator slack (10 % of the allocated
    peak). CPU: 0 (the CPU check measures live tensors)."""
    return 0 if device == "cpu" else int(CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK * peak_allocated)


# --------------------------------------------------------------------------------------------------- the plan
def estimate(shape: dict, *, batch: int = 8, prompt_length: int = 256, completion_length: int = 48,
             minibatches: int = 1, ppo_epochs: int = 4, dtype: str = "bf16", load_in_4bit: bool = False,
             lora_r: int = 16, lora_targets=("q", "k", "v", "o"), lora_top_layers: int = 0,
             gradient_checkpointing: bool = False, critic: str = "shared", ensemble: int = 0,
             ensemble_mode: str = "heads", kl_controller: str = "hard", monitor_max_queue: int = 2,
             device: str = "cuda") -> dict:
    """Peak memory of a PPO iteration: bytes per component, per phase, the peak phase and the overhead.

    Each phase is the largest of its "moments" — what is alive at one point of PPOTrainer._iteration (or of the
    monitor's review queue after it), read off the code; `monitor_max_queue` = PPOConfig.monitor_max_queue (0: no
    monitor, or no detector with the 'queue' action).

    Returns {"components": {name: bytes}, "phases": {phase: {"total": bytes, "parts": {name: bytes}}},
    "peak_phase", "peak_allocated" (what torch allocates at the peak; compare with torch.cuda.max_memory_allocated
    or a CPU RSS delta), "overhead", "peak" (= peak_allocated + overhead: what the GPU must have), "params",
    "activations_checkpointing", "activations_no_checkpointing", "options"}."""
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}.")
    if critic not in ("shared", "separate"):
        raise PlanError(f"critic must be 'shared' or 'separate', got {critic!r}.")
    if ensemble_mode not in ("heads", "adapters"):
        raise PlanError(f"ensemble_mode must be 'heads' or 'adapters', got {ensemble_mode!r}.")
    if batch < 1 or minibatches < 1 or batch % minibatches:
        raise PlanError(f"batch ({batch}) must be a positive multiple of minibatches ({minibatches}).")
    targets = normalize_targets(lora_targets)
    V, H, I, L, nh, nkv, d, dq = _dims(shape)
    B, P, R, M, E = batch, prompt_length, completion_length, minibatches, ppo_epochs
    T = P + R
    b = B // M  # rows per training forward
    a = 4 if (load_in_4bit or dtype == "fp32") else 2  # activation / KV-cache / model-logit bytes
    exact = kl_controller == "hard"
    memo = M == 1
    top = lora_top_layers or 0
    if not 0 <= top <= L:
        raise PlanError(f"lora_top_layers={top} but the model has {L} layers.")
    L_t = top or L
    cache = bool(top) and not is_gpt2(shape)  # frozen-prefix cache: verified off for GPT-2 (position embeddings)

    # static: weights, trained state, reward members
    weights = base_weight_bytes(shape, dtype, load_in_4bit)
    n_policy = lora_parameter_count(shape, lora_r, targets, L_t)
    critic_targets = [t for t in targets if t != "lm_head"]  # the critic reads hidden states, never logits
    n_critic = lora_parameter_count(shape, lora_r, critic_targets, L_t) if critic == "separate" else 0
    n_value_head = H + 1
    trained = trainable_bytes(n_policy + n_critic + n_value_head, n_policy if exact else 0)
    rewards = reward_member_bytes(shape, ensemble, ensemble_mode, lora_r, targets)

    # per-rollout tensors
    logit = logits_bytes(B, R, V)  # one [B, R, V] fp32 policy logits tensor (z/T)
    ref_full = logit if exact else 0  # Rollout.ref_logprobs_full, alive from the reference pass to the next rollout
    h_low = B * T * H * a if cache else 0  # Rollout.h_low
    act = lambda rows: training_activation_bytes(shape, rows, T, targets=targets, r=lora_r, a=a,  # noqa: E731
                                                 trained_layers=L_t, checkpointing=gradient_checkpointing,
                                                 critic=critic)
    act_no_ckpt = training_activation_bytes(shape, b, T, targets=targets, r=lora_r, a=a, trained_layers=L_t,
                                            checkpointing=False, critic=critic)
    act_ckpt = training_activation_bytes(shape, b, T, targets=targets, r=lora_r, a=a, trained_layers=L_t,
                                         checkpointing=True, critic=critic)
    nograd = lambda rows, t: inference_working_bytes(shape, rows, t, a=a, load_in_4bit=load_in_4bit)  # noqa: E731
    fwd = lambda rows: forward_logits_bytes(rows, R, V, a)  # noqa: E731
    backward = lambda rows: backward_transient_bytes(shape, rows, T, R, a=a, load_in_4bit=load_in_4bit)  # noqa: E731
    gen_ws = lambda rows: max(nograd(rows, P), 2 * L * nkv * d * T * rows * a // L) + 16 * rows * V  # noqa: E731
    kv = kv_cache_bytes(shape, B, T, a)
    kl_tmp = exact_kl_bytes(R, V) if exact else 0

    phases: dict[str, dict] = {}

    def moment(phase, **parts):
        parts = {k: int(v) for k, v in parts.items() if v}
        total = sum(parts.values())
        if phase not in phases or total > phases[phase]["total"]:
            phases[phase] = {"total": total, "parts": parts}

    common = dict(base_weights=weights["total"], trainable=trained["total"], reward_members=rewards)
    # 1. sampling (`self.rollout = None` first: nothing of the previous rollout is alive): KV cache of B × (P + R)
    #    + the prefill's working set + per-step sampling logits (fp32, ×4 copies)
    moment("generation", **common, kv_cache=kv, working_set=gen_ws(B))
    # 2. rewards from members on the shared base (Python callables: nothing)
    moment("reward scoring", **common,
           reward_scoring=reward_scoring_bytes(shape, B, T, ensemble, ensemble_mode, a=a, load_in_4bit=load_in_4bit))
    # 3. reference pass (+ the frozen-prefix cache's lower pass): logits → z/T → full log-softmax (ref_logits is
    #    freed when _rollout returns)
    moment("reference pass", **common, prefix_cache=h_low, working_set=nograd(B, T))
    moment("reference pass", **common, prefix_cache=h_low, working_set=fwd(B))
    moment("reference pass", **common, prefix_cache=h_low, policy_logits=logit, reference_logsoftmax=ref_full)
    held = dict(**common, prefix_cache=h_low, reference_logsoftmax=ref_full)
    no_grad_forward = max(nograd(B, T), fwd(B))  # a no-grad full-batch forward of the policy, up to its logits
    if memo:
        # θ_old forward with gradients = epoch 1's training forward (memo; `del out` leaves the memo the only
        # holder, and epoch 1 takes it). After each epoch but the last, the forward that measures the KL is the next
        # epoch's, memoised the same way. Each step's logits are deleted before the next forward: one alive at a time.
        moment("training step", **held, activations=act(B), working_set=fwd(B))
        moment("training step", **held, activations=act(B), policy_logits=logit,
               working_set=loss_transient_bytes(B, R, V))
        moment("training step", **held, activations=act(B), policy_logits=logit, working_set=backward(B))
        if exact:  # kl/before_update on the θ_old forward, then after each epoch on the next epoch's forward
            moment("exact-KL check", **held, activations=act(B), policy_logits=logit, exact_kl=kl_tmp)
    else:
        # θ_old pass without gradients over the whole batch; `del out` frees its logits once old_logp (and
        # kl/before_update) are taken; then minibatches of b rows, each step's logits deleted before the next forward
        moment("training step", **held, working_set=no_grad_forward)
        mb_logit = logits_bytes(b, R, V)
        h_rows = b * T * H * a if cache else 0  # ro.h_low[idx]: the minibatch's rows of the prefix cache, copied
        moment("training step", **held, activations=act(b), working_set=fwd(b) + h_rows)
        moment("training step", **held, activations=act(b), policy_logits=mb_logit,
               working_set=loss_transient_bytes(b, R, V) + h_rows)
        moment("training step", **held, activations=act(b), policy_logits=mb_logit, working_set=backward(b) + h_rows)
        if exact:  # kl/before_update on `out`'s logits
            moment("exact-KL check", **held, policy_logits=logit, exact_kl=kl_tmp)
    if exact:  # after the last epoch (every epoch without the memo), and in the guard's backtracking: a no-grad
        # full-batch forward, then the KL on its logits
        moment("exact-KL check", **held, working_set=no_grad_forward)
        moment("exact-KL check", **held, policy_logits=logit, exact_kl=kl_tmp)
    # 6. between iterations the monitor's review queue (when a 'queue' detector fires): self.rollout (its reference
    #    log-softmax and prefix cache) is alive while q ≤ monitor_max_queue prompts are sampled from π_ref, scored,
    #    and their KL measured — the policy's and the reference's logits of q rows, then sequence_kl
    q = min(monitor_max_queue, B)
    if q > 0:
        rollout = dict(**common, prefix_cache=h_low, reference_logsoftmax=ref_full)
        h_q = q * T * H * a if cache else 0  # ro.h_low[rows], copied for each of the two forwards
        moment("monitor", **rollout, kv_cache=kv_cache_bytes(shape, q, T, a), working_set=gen_ws(q))
        moment("monitor", **rollout, working_set=reward_scoring_bytes(shape, q, T, ensemble, ensemble_mode, a=a,
                                                                       load_in_4bit=load_in_4bit))
        moment("monitor", **rollout, working_set=max(nograd(q, T), fwd(q)) + h_q)
        moment("monitor", **rollout, policy_logits=logits_bytes(q, R, V), working_set=fwd(q) + h_q)
        moment("monitor", **rollout, policy_logits=3 * logits_bytes(q, R, V))
        moment("monitor", **rollout, policy_logits=2 * logits_bytes(q, R, V), exact_kl=exact_kl_bytes(R, V))

    peak_phase = max(phases, key=lambda k: phases[k]["total"])
    peak_allocated = phases[peak_phase]["total"]
    overhead = overhead_bytes(peak_allocated, device)
    components = {
        "base_weights": weights["total"], "trainable": trained["total"], "reward_members": rewards,
        "activations": act(b), "kv_cache": kv,
        "reward_scoring": reward_scoring_bytes(shape, B, T, ensemble, ensemble_mode, a=a, load_in_4bit=load_in_4bit),
        "policy_logits": logit, "reference_logsoftmax": ref_full, "exact_kl": kl_tmp, "prefix_cache": h_low,
        "overhead": overhead,
    }
    return {
        "model": shape.get("name", shape.get("model_type")), "components": components, "phases": phases,
        "peak_phase": peak_phase, "peak_allocated": peak_allocated, "overhead": overhead,
        "peak": peak_allocated + overhead, "weights": weights, "trained": trained,
        "params": {**parameter_counts(shape), "lora_policy": n_policy, "lora_critic": n_critic,
                   "value_head": n_value_head},
        "activations_checkpointing": act_ckpt, "activations_no_checkpointing": act_no_ckpt,
        "activation_bytes": a,
        "options": dict(batch=B, prompt_length=P, completion_length=R, minibatches=M, ppo_epochs=E, dtype=dtype,
                        load_in_4bit=load_in_4bit, lora_r=lora_r, lora_targets=list(targets),
                        lora_top_layers=top, gradient_checkpointing=gradient_checkpointing, critic=critic,
                        ensemble=ensemble, ensemble_mode=ensemble_mode, kl_controller=kl_controller,
                        monitor_max_queue=monitor_max_queue, device=device),
    }


def largest_batch(shape: dict, memory_bytes: float, *, limit: int = 1 << 16, **options) -> int:
    """The largest batch (a multiple of `minibatches`) whose plan peak (overhead included) fits `memory_bytes`;
    0 when not even one minibatch fits. The peak grows with the batch, so: doubling, then bisection."""
    step = options.get("minibatches", 1)
    fits = lambda n: estimate(shape, **{**options, "batch": n * step})["peak"] <= memory_bytes  # noqa: E731
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi * step <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit // step + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step


# ------------------------------------------------------------------------------------------------------- CLI
def _gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def _fmt_params(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def format_plan(shape: dict, est: dict, gpu_bytes: float | None, best: int | None) -> str:
    o, c, w, p = est["options"], est["components"], est["weights"], est["params"]
    a = est["activation_bytes"]
    prec = f"4-bit NF4 (compute {o['dtype']})" if o["load_in_4bit"] else o["dtype"]
    layers = (f"top {o['lora_top_layers']} layers" if o["lora_top_layers"]
              else f"all {shape['num_hidden_layers']} layers")
    rewards = (f"{o['ensemble']} reward member(s), {o['ensemble_mode']} mode" if o["ensemble"]
               else "Python reward functions only")
    lines = [
        f"rlhf-ext plan — {est['model']} ({shape.get('model_type')}, {_fmt_params(p['total'])} params), {prec}, "
        f"{o['device']}",
        f"  batch {o['batch']} prompts × ({o['prompt_length']} prompt + {o['completion_length']} completion) tokens, "
        f"{o['minibatches']} minibatch(es), {o['ppo_epochs']} PPO epochs, LoRA r={o['lora_r']} on "
        f"{','.join(o['lora_targets'])} ({layers}), critic {o['critic']}, KL controller {o['kl_controller']}, "
        f"{rewards}, gradient checkpointing {'on' if o['gradient_checkpointing'] else 'off'}",
        "",
        f"{'component':46s} {'GiB':>8s} {'at peak':>8s}  notes",
    ]
    at_peak = est["phases"][est["peak_phase"]]["parts"]
    if o["load_in_4bit"]:
        wnote = (f"{_fmt_params(p['linear'])} 4-bit ({(w['quantized'] + w['quant_constants']) / GiB:.2f} GiB incl. "
                 f"{w['quant_constants'] / GiB:.2f} quant constants) + {_fmt_params(p['total'] - p['linear'])} fp32 "
                 f"({w['unquantized'] / GiB:.2f} GiB: embeddings, LM head, norms; upcast by "
                 f"prepare_model_for_kbit_training)")
    else:
        wnote = f"{_fmt_params(p['total'])} params × {DTYPE_BYTES[o['dtype']]} B"
    n_tr = p["lora_policy"] + p["lora_critic"] + p["value_head"]
    rows = [
        ("base weights", "base_weights", wnote),
        ("LoRA + value head + grads + AdamW (+ KL guard)", "trainable",
         f"{_fmt_params(n_tr)} trained params × 16 B"
         + (" + 2 fp32 copies of the policy adapter" if est["trained"]["kl_guard"] else "")),
        ("reward members (adapters/heads)", "reward_members", rewards),
        ("reward scoring (transient)", "reward_scoring", "no-grad mixed batch" if o["ensemble"] else "-"),
        ("KV cache (generation)", "kv_cache", f"B × (P+R) × {shape['num_hidden_layers']} layers × 2 × "
                                              f"{shape['num_key_value_heads']} KV heads, {a} B"),
        ("activations (training forward)", "activations",
         f"{'with' if o['gradient_checkpointing'] else 'without'} checkpointing; with: "
         f"{est['activations_checkpointing'] / GiB:.2f} GiB, without: "
         f"{est['activations_no_checkpointing'] / GiB:.2f} GiB"
         f" ({o['batch'] // o['minibatches']} rows)"),
        ("policy logits [B,R,V] fp32", "policy_logits", "z/T at the response positions; one alive at a time (b rows "
                                                         "in a minibatch step)"),
        ("reference log-softmax [B,R,V] fp32 (kept)", "reference_logsoftmax", "for the exact KL (hard controller)"),
        ("exact-KL float64 temporaries", "exact_kl", "5 × [R,V] float64, one sequence at a time "
                                                     "(PolicyAndValue.sequence_kl)"),
        ("frozen-prefix cache", "prefix_cache", "hidden state below the adapted layers, [B,P+R,H]"),
    ]
    for label, key, note in rows:
        held = at_peak.get(key, 0) if key != "policy_logits" else at_peak.get("policy_logits", 0)
        lines.append(f"{label:46s} {_gib(c[key])} {_gib(held) if held else '       -'}  {note}")
    ws = at_peak.get("working_set", 0)
    lines.append(f"{'working set (at the peak)':46s} {'':8s} {_gib(ws) if ws else '       -'}  "
                 f"transients of the peak moment: a forward's logits, the backward's logit gradient, …")
    oh = "CUDA context 0.5 GiB + 10 % allocator slack" if o["device"] != "cpu" else "CPU: none counted"
    lines.append(f"{'CUDA context + allocator overhead':46s} {_gib(est['overhead'])} {_gib(est['overhead'])}  {oh}")
    lines += ["", f"{'phase (incl. overhead)':22s} {'GiB':>8s}"]
    for ph in PHASES:
        if ph in est["phases"]:
            mark = "   <- peak" if ph == est["peak_phase"] else ""
            total = est["phases"][ph]["total"]
            lines.append(f"{ph:22s} {_gib(total + overhead_bytes(total, o['device']))}{mark}")
    lines.append("")
    lines.append(f"peak: {est['peak'] / GiB:.2f} GiB ({est['peak_allocated'] / GiB:.2f} GiB allocated by torch + "
                 f"{est['overhead'] / GiB:.2f} GiB overhead) in the {est['peak_phase']} phase")
    biggest = max(at_peak, key=at_peak.get)
    if biggest == "exact_kl":
        lines.append("note: the exact-KL check's float64 temporaries dominate — PolicyAndValue.sequence_kl holds 5 "
                     "float64 [R,V] tensors of one sequence; lower --completion-length, or use a controller other "
                     "than hard (no exact KL)")
    elif est["peak_phase"] == "exact-KL check" and o["minibatches"] > 1:
        lines.append("note: the exact-KL check is the peak — the full batch's [B,R,V] logits (no-grad θ_old pass, "
                     "KL measurements) outgrow a minibatch's training step; a controller other than hard avoids "
                     "the reference log-softmax and these measurements")
    elif est["peak_phase"] == "monitor":
        lines.append("note: the monitor's review queue is the peak (between iterations, with the rollout alive); "
                     "--monitor-max-queue 0 plans without it (PPOConfig.monitor_max_queue / monitor=False)")
    elif biggest == "activations" and not o["gradient_checkpointing"]:
        lines.append("note: activations dominate — --gradient-checkpointing, more --minibatches or --lora-top-layers "
                     "shrink them")
    if gpu_bytes:
        fit = "fits" if est["peak"] <= gpu_bytes else "does NOT fit"
        lines.append(f"on {gpu_bytes / GiB:.0f} GiB: {fit}; largest batch that fits: {best}"
                     + (" (not even one minibatch: lower the lengths, use --load-in-4bit / --gradient-checkpointing "
                        "/ --lora-top-layers, or more minibatches)" if best == 0 else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rlhf-ext plan", description="GPU memory plan for a PPO run (reads the model's "
                                 "config only).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="Hub id, local folder, path to config.json, or a shipped shape: "
                    + ", ".join(shipped_shapes()))
    ap.add_argument("--gpu-memory", type=float, default=24.0, help="GPU memory in GiB")
    ap.add_argument("--load-in-4bit", action="store_true", help="4-bit NF4 base (bitsandbytes)")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPE_BYTES), help="base / compute dtype")
    ap.add_argument("--batch", type=int, default=None, help="prompts per iteration (omit: the largest that fits)")
    ap.add_argument("--prompt-length", type=int, default=256, help="longest prompt, tokens")
    ap.add_argument("--completion-length", type=int, default=48, help="max_completion_length")
    ap.add_argument("--minibatches", type=int, default=1, help="num_mini_batches")
    ap.add_argument("--ppo-epochs", type=int, default=4, help="num_ppo_epochs")
    ap.add_argument("--ensemble", type=int, default=0, help="K reward members on the shared base (0: Python callables)")
    ap.add_argument("--ensemble-mode", default="heads", choices=["heads", "adapters"])
    ap.add_argument("--critic", default="shared", choices=["shared", "separate"])
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-targets", default="q,k,v,o", help="comma list of q,k,v,o,gate,up,down,lm_head")
    ap.add_argument("--lora-top-layers", type=int, default=0, help="LoRA on the top N layers only (0: all)")
    ap.add_argument("--kl-controller", default="hard", help="hard keeps the reference log-softmax and measures the "
                    "exact KL; other controllers do neither")
    ap.add_argument("--monitor-max-queue", type=int, default=2, help="PPOConfig.monitor_max_queue: prompts the "
                    "reward-hacking monitor samples and measures for its review queue (0: monitor off)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        shape = load_shape(args.model)
        options = dict(prompt_length=args.prompt_length, completion_length=args.completion_length,
                       minibatches=args.minibatches, ppo_epochs=args.ppo_epochs, dtype=args.dtype,
                       load_in_4bit=args.load_in_4bit, lora_r=args.lora_r, lora_targets=args.lora_targets,
                       lora_top_layers=args.lora_top_layers, gradient_checkpointing=args.gradient_checkpointing,
                       critic=args.critic, ensemble=args.ensemble, ensemble_mode=args.ensemble_mode,
                       kl_controller=args.kl_controller, monitor_max_queue=args.monitor_max_queue,
                       device=args.device)
        gpu = args.gpu_memory * GiB if args.gpu_memory else None
        best = largest_batch(shape, gpu, **options) if gpu else None
        batch = args.batch or max(best or 0, args.minibatches)
        est = estimate(shape, batch=batch, **options)
    except PlanError as e:
        print(f"rlhf-ext plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**est, "shape": shape, "gpu_memory_gib": args.gpu_memory, "largest_batch": best,
                          "fits": None if not gpu else est["peak"] <= gpu}, indent=2))
    else:
        print(format_plan(shape, est, gpu, best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
