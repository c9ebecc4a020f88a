"""The memory plan's formulas: bytes of weights, trainable state, activations, caches, logits and scorers, one small
function each with its derivation in the docstring (notation: `rlhf_ext.plan`)."""

from __future__ import annotations

from dataclasses import dataclass

from .shapes import (DTYPE_BYTES, DTYPE_NAMES, NF4_CONSTANT_BYTES_PER_PARAM, GiB, PlanError, is_gpt2, load_shape,
                     model_dims)

CUDA_CONTEXT_BYTES = int(0.5 * GiB)  # CUDA context + cuBLAS/cuDNN handles: outside torch's allocator
ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation: reserved ≈ 1.1 × allocated at the peak
REWARD_SCORING_BATCH = 16  # RewardEnsemble.score_completions(batch_size=16), ExternalRewardModel(batch_size=16)
EXACT_KL_STATES = 16  # response states per float64 block of the exact KL (PolicyAndValue.sequence_kl reads it)
TARGET_ALIASES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
                  "down_proj": "down", "c_attn": "qkv", "c_fc": "up",
                  # PEFT matches a name's suffix: GPT-2's c_proj is attn.c_proj and mlp.c_proj
                  "c_proj": "o+down",
                  # fused projections as other families name them (PEFT's defaults: query_key_value for GPT-NeoX,
                  # qkv_proj for Phi-3, W_pack for Baichuan), counted as their parts
                  "query_key_value": "qkv", "qkv_proj": "qkv", "W_pack": "qkv", "Wqkv": "qkv",
                  "gate_up_proj": "gate+up", "dense": "o", "dense_h_to_4h": "up", "dense_4h_to_h": "down",
                  "fc1": "up", "fc2": "down"}
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")


# --------------------------------------------------------------------------------------------------- weights
def parameter_counts(shape: dict) -> dict:
    """Parameters by kind.

    embeddings = V·H (+ n_positions·H learned positions for GPT-2); lm_head = V·H unless tied;
    linear (the decoder layers' matrices, what 4-bit quantises) = L·(H·d_q + 2·H·n_kv·d + d_q·H + m·H·I),
    m = 3 for gated MLPs (Llama, Mistral, Qwen2), 2 for GPT-2; other = norms (2·H per layer + H, doubled for
    LayerNorm's bias) + biases (Qwen2: q, k, v; GPT-2: every linear). Shapes of other model types carry an exact
    count (`shapes.counted_parameters`: MoE experts, latent attention, recurrent layers), used as it is."""
    if "param_counts" in shape:
        return dict(shape["param_counts"])
    V, H, I, L, nh, nkv, d, dq = model_dims(shape)
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
    return {"embeddings": embeddings, "lm_head": lm_head, "linear": linear, "experts": 0, "other": other,
            "total": embeddings + lm_head + linear + other}


def base_weight_bytes(shape: dict, dtype: str = "bf16", load_in_4bit: bool = False) -> dict:
    """Bytes of the frozen base.

    Without quantisation: every parameter × bytes(dtype).
    4-bit (bitsandbytes NF4, double quantisation): the decoder layers' linear weights take 0.5 B/param packed plus
    quant constants 1/64 + 4/16384 B/param (uint8 absmax per 64-block, fp32 absmax per 256 blocks) ≈ 0.516 B/param.
    Everything else — embeddings, the LM head (never quantised), norms, biases, and an MoE's fused experts, which
    bitsandbytes 0.50 does not quantise under transformers 5 (bitsandbytes#1849) — is fp32 (4 B/param): PPOTrainer
    calls PEFT's `prepare_model_for_kbit_training`, which upcasts every non-4-bit bf16/fp16 parameter to fp32.
    → {"quantized": packed bytes, "quant_constants": …, "unquantized": …, "total": …}"""
    n = parameter_counts(shape)
    if not load_in_4bit:
        total = n["total"] * DTYPE_BYTES[dtype]
        return {"quantized": 0, "quant_constants": 0, "unquantized": total, "total": total}
    packed = n["linear"] * 0.5
    # a pre-quantised checkpoint saved without double quantisation keeps one fp32 absmax per 64-weight block
    single = not (shape.get("prequantized") or {}).get("double_quant", True)
    constants = n["linear"] * (4 / 64 if single else NF4_CONSTANT_BYTES_PER_PARAM)
    rest = (n["total"] - n["linear"]) * 4
    return {"quantized": int(packed), "quant_constants": int(constants), "unquantized": rest,
            "total": int(packed + constants + rest)}


def decode_packed_bytes(shape: dict, weights: str) -> int:
    """On CPU, decoding's packed copies of the frozen plain linear weights (ppo/cpu_matmul.py), alive while a batch is
    sampled: the decoder layers' linears (GPT-2's are Conv1D, not packed) and the LM head (V·H, tied or not), in
    the weights' dtype; on a 4-bit base the LM head alone, fp32 (bitsandbytes' layers are not plain linears; the
    head is upcast by `prepare_model_for_kbit_training`); 0 for fp16, which it does not pack. An upper bound:
    decoding packs only where this CPU measured it paying, within 1/8 of the memory."""
    V, H, *_ = model_dims(shape)
    if weights == "nf4":
        return V * H * 4
    if weights not in ("fp32", "bf16"):
        return 0
    linear = 0 if is_gpt2(shape) else parameter_counts(shape)["linear"]
    return (linear + V * H) * DTYPE_BYTES[weights]


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
        elif "+" in t:
            out += t.split("+")
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
    V, H, I, L, nh, nkv, d, dq = model_dims(shape)
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
    V, H, *_ = model_dims(shape)
    layers = shape["num_hidden_layers"] if layers is None else layers
    per_layer = sum(r * (i + o) for _, i, o in lora_modules(shape, targets))
    head = r * (H + V) if "lm_head" in normalize_targets(targets) else 0
    return layers * per_layer + head


def trainable_bytes(n_trainable: int, n_guarded: int = 0, ddp: bool = False) -> dict:
    """Trained parameters (LoRA adapters + value head) in fp32: 4 B value + 4 B gradient + 8 B AdamW moments
    (exp_avg, exp_avg_sq) = 16 B/param. The hard KL guard keeps two fp32 copies of the policy adapter (the anchor
    θ_0 and the per-epoch snapshot): + 8 B per guarded param. Under DDP (`ddp`), the Reducer's gradient buckets
    (gradient_as_bucket_view off, accelerate's default): one more fp32 copy of every trained parameter, + 4 B."""
    buckets = 4 * n_trainable if ddp else 0
    return {"params": 4 * n_trainable, "grads": 4 * n_trainable, "adamw": 8 * n_trainable,
            "kl_guard": 8 * n_guarded, "ddp_buckets": buckets, "total": 16 * n_trainable + 8 * n_guarded + buckets}


# ------------------------------------------------------------------------------------------------------ precision
def weight_dtype(dtype, shape: dict | None = None) -> str:
    """The dtype the trainer loads the base in, by its own rule (`rlhf_ext.models._dtype`, reached through
    `PPOTrainer(model=<name>, args=PPOConfig(model_init_kwargs={"dtype": …}))`, `load_model(dtype=…)` or a recipe's
    `dtype:`):
      None (no dtype given) → float32 — from_pretrained's default, whatever dtype the checkpoint is stored in;
      "auto"               → the checkpoint's own dtype: the config's `torch_dtype` (`dtype` in transformers 5),
                             float32 when the config records none (GPT-2);
      "bfloat16" / "float32" / "float16" (also bf16 / fp32 / fp16, torch.bfloat16) → that dtype.
    → "fp32" | "bf16" | "fp16"."""
    if dtype is None:
        return "fp32"
    name = str(dtype).replace("torch.", "")
    if name == "auto":
        recorded = (shape or {}).get("torch_dtype") or (shape or {}).get("dtype")
        return DTYPE_NAMES.get(str(recorded).replace("torch.", ""), "fp32")
    if name not in DTYPE_NAMES:
        raise PlanError(f"dtype must be one of auto, float32, bfloat16, float16 (or fp32 / bf16 / fp16), "
                        f"got {dtype!r}.")
    return DTYPE_NAMES[name]


@dataclass(frozen=True)
class Precision:
    """Bytes per element of what the passes hold, from the weights' dtype and autocast (see the module docstring).

    weights  "fp32" | "bf16" | "fp16" | "nf4" (4-bit base)
    autocast bf16 autocast around every PPO pass (PPOConfig bf16=True / accelerate mixed_precision bf16)
    a        a matmul's output: attention q/k/v/out, MLP, the model's logits, the V cache — 2 in bf16 compute
    h        the hidden state autocast does not cast: embedding output, residual stream, norm outputs, RoPE'd keys
             (the K cache; cos/sin take the hidden state's dtype), the frozen-prefix cache, a checkpointed layer's
             input — the weights' dtype
    scoring  reward members and separate reward / audit models score outside the precision context: weights' dtype
    weight_copies  autocast over fp32 (or fp16) weights casts every frozen weight at every matmul (its cache keeps
             only leaves that require grad); the training forward keeps the bf16 cast of each weight whose input
             needs a gradient (autograd saves it for the input gradient), and each no-grad forward holds one cast
             at a time."""

    weights: str
    autocast: bool
    a: int
    h: int

    @property
    def scoring(self) -> int:
        return self.h

    @property
    def casts(self) -> bool:
        """Autocast as the formulas model it: on a 4-bit base the fp32 upper bound is kept (not modelled)."""
        return self.autocast and self.weights != "nf4"

    @property
    def weight_copies(self) -> bool:
        return self.casts and self.weights in ("fp32", "fp16")

    @property
    def k_cache(self) -> int:
        """Bytes of a cached key: RoPE multiplies the (bf16) projection by cos/sin in the hidden state's dtype."""
        return self.h

    def describe(self) -> str:
        if self.weights == "nf4":
            return "4-bit NF4 base, fp32 activations (prepare_model_for_kbit_training)" + (
                "; bf16 autocast not modelled (upper bound)" if self.autocast else "")
        w = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}[self.weights]
        if not self.autocast:
            return f"{w} weights, {w} activations (no autocast)"
        if self.weight_copies:
            return (f"{w} weights + bf16 autocast: matmul outputs bf16, residual stream / norms / K cache {w}, "
                    f"bf16 casts of the trained layers' weights kept by the training forward")
        return f"{w} weights + bf16 autocast: bf16 activations, LoRA inputs cast back to bf16"


def precision_of(dtype=None, load_in_4bit: bool = False, bf16: bool = False, shape: dict | None = None) -> Precision:
    """`Precision` of a run: `dtype` with the trainer's semantics (`weight_dtype`), `bf16` = autocast on."""
    w = weight_dtype(dtype, shape)
    if load_in_4bit:
        return Precision("nf4", bool(bf16), 4, 4)
    h = DTYPE_BYTES[w]
    return Precision(w, bool(bf16), 2 if bf16 else h, h)


def _reward_artifact(model: str):
    """(shape, dtype) of the second model a reward artifact folder loads (`load_reward_model` without a shared
    base): "full" mode its trunk/, else its recorded base model; the dtype it records ("nf4" for a 4-bit base,
    None when none). None when `model` is not an artifact folder."""
    import json
    from pathlib import Path

    path = Path(model).expanduser()
    spec_file = path / "rlhf_ext_reward.json"
    if not spec_file.is_file():
        return None
    try:
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise PlanError(f"{spec_file} is not valid JSON ({e}).") from None
    if spec.get("mode") == "full":
        shape = load_shape(str(path / "trunk"))
    elif spec.get("base_model"):
        shape = load_shape(spec["base_model"])
    else:
        raise PlanError(f"{path} does not record its base model: pass that base as MODEL[@DTYPE].")
    return shape, ("nf4" if spec.get("load_in_4bit") else spec.get("dtype"))


@dataclass
class ScoringModel:
    """A model that scores every rollout besides the policy's base: a reward model loaded as a separate model (a
    "full"-mode artifact, an artifact trained on another base, an ExternalRewardModel) or an audit model (a gold
    reward in `audit_funcs`). Loaded as a trunk (no LM head) in `dtype` (load_reward_model: the artifact's recorded
    dtype, float32 when none) or 4-bit ("nf4")."""

    name: str
    shape: dict
    dtype: str = "fp32"  # "fp32" | "bf16" | "fp16" | "nf4"
    role: str = "reward"  # "reward" | "audit"

    @classmethod
    def parse(cls, spec, role: str = "reward") -> "ScoringModel":
        """'MODEL[@DTYPE]' (a shipped shape, folder, config.json or Hub id; DTYPE float32 / bfloat16 / float16 /
        nf4), a dict {"shape" or "model", "dtype", "name"}, or a ScoringModel."""
        if isinstance(spec, ScoringModel):
            return spec
        if isinstance(spec, dict):
            shape = spec.get("shape") or load_shape(spec["model"])
            dtype = spec.get("dtype", "fp32")
            name = spec.get("name") or spec.get("model") or shape.get("name", shape.get("model_type"))
        else:
            model, _, dtype = str(spec).partition("@")
            artifact = _reward_artifact(model)
            if artifact is not None:  # a reward artifact: the trunk it loads, in the dtype / 4-bit it records
                shape, recorded = artifact
                dtype = dtype or recorded
            else:
                shape = load_shape(model)
            name, dtype = model, dtype or "fp32"
        four_bit = str(dtype).lower() in ("nf4", "4bit", "4-bit") or shape.get("prequantized")  # loads 4-bit as saved
        dtype = "nf4" if four_bit else weight_dtype(dtype, shape)
        return cls(name=name, shape=shape, dtype=dtype, role=role)

    @property
    def bytes_per_activation(self) -> int:
        return 4 if self.dtype == "nf4" else DTYPE_BYTES[self.dtype]

    def weight_bytes(self) -> int:
        """The trunk's weights: every parameter but an untied LM head (`load_model(kind="trunk")`)."""
        n = parameter_counts(self.shape)
        if self.dtype == "nf4":
            return base_weight_bytes(self.shape, load_in_4bit=True)["total"] - 4 * n["lm_head"]
        return (n["total"] - n["lm_head"]) * DTYPE_BYTES[self.dtype]

    def scoring_bytes(self, batch: int, seq_len: int) -> int:
        """Scoring texts of ≈ T tokens (in its own tokenizer) min(16, B) at a time, no grad: the working set of that
        forward + the final hidden states kept for pooling (rows·T·a·H)."""
        rows = min(REWARD_SCORING_BATCH, batch)
        a = self.bytes_per_activation
        return (inference_working_bytes(self.shape, rows, seq_len, a=a, load_in_4bit=self.dtype == "nf4")
                + int(rows * seq_len * a * self.shape["hidden_size"]))


# ------------------------------------------------------------------------------------------------ activations
def layer_activation_bytes_per_token(shape: dict, targets, r: int, a: int, seq_len: int, *, h: int | None = None,
                                     autocast: bool = False, grouped_kv: bool = False) -> float:
    """Bytes autograd saves per token in one trained decoder layer of the training forward (frozen base, LoRA on
    `targets`, dropout off), measured op by op with `torch.autograd.graph.saved_tensors_hooks`:

    Llama-like:  2 RMSNorms keep their fp32 input           2·4·H
                 SDPA keeps q, k, v (repeated to n_h heads:   4·a·d_q + 4·n_h (log-sum-exp, fp32)
                 padding masks rule out native GQA) and out  (`grouped_kv`, on CPU: k and v at their n_kv heads,
                                                              2·a·d_q + 2·a·n_kv·d + 4·n_h; grouped_kv.py)
                 its attention-mask bias, per query row      a·T
                 SiLU-gated MLP: gate, SiLU(gate), up        3·a·I
    GPT-2:       2 LayerNorms keep their input (the residual) 2·h·H
                 fused qkv output + SDPA out                 4·a·H + 4·n_h + a·T
                 gelu_new (tanh form): x, tanh, 1+tanh, x/2  4·a·I
    LoRA:        each adapted module's lora_A keeps its input; without autocast, when a = 4 inputs already kept count
                 once (q/k/v share the normed hidden state; o's input is SDPA's output, which the kernels return in
                 [B, T, n_h, d] layout so the transpose + contiguous is free), and in bf16/fp16 PEFT casts the input
                 to the adapter's fp32 for each module separately (4·in each); lora_B keeps the rank-r middle (4·r).
                 Under autocast the rank-r middle is bf16 (a·r), and lora_A's input: over fp32 weights, the matmul
                 casts it to bf16 for each module (a·in each); over 16-bit weights it is the layer's own input (the
                 policy skips PEFT's fp32 cast, which autocast would undo: `PolicyAndValue.precision`), kept once
                 per shared input as without autocast.
    `h` (default a): bytes of the residual stream (the weights' dtype; fp32 under autocast over fp32 weights)."""
    V, H, I, L, nh, nkv, d, dq = model_dims(shape)
    h = a if h is None else h
    mods = lora_modules(shape, targets)
    if is_gpt2(shape):
        base = 2 * h * H + 4 * a * H + 4 * nh + a * seq_len + 4 * a * I
        shared_inputs = {"qkv": "ln1", "o": "attn_out", "up": "ln2", "down": "mlp_mid"}
    else:
        qkvo = 2 * a * dq + 2 * a * (nkv * d if grouped_kv else dq)
        base = 2 * 4 * H + qkvo + 4 * nh + a * seq_len + 3 * a * I
        shared_inputs = {"q": "ln1", "k": "ln1", "v": "ln1", "o": "attn_out", "gate": "ln2", "up": "ln2",
                         "down": "mlp_mid"}
    if autocast and h != a:
        return base + sum(a * (i + r) for _, i, _ in mods)
    if h == a and (a == 4 or autocast):  # o's input is SDPA's output itself ([B, T, n_h, d]-contiguous already)
        inputs = {shared_inputs[m]: a * i for m, i, _ in mods if shared_inputs[m] != "attn_out"}
        lora = sum(inputs.values())
    else:
        lora = sum(4 * i for _, i, _ in mods)
    lora += sum((a if autocast else 4) * r for _ in mods)
    return base + lora


def training_activation_bytes(shape: dict, rows: int, seq_len: int, *, targets, r: int, a: int, trained_layers: int,
                              checkpointing: bool, critic: str = "shared", h: int | None = None,
                              autocast: bool = False, grouped_kv: bool = False) -> int:
    """Saved activations of one training forward over `rows` sequences of T = `seq_len` tokens.

    Without checkpointing: rows·T·(L_t · per-layer bytes + 4·H for the final norm).
    With gradient checkpointing (non-reentrant): each trained layer keeps only its input hidden state (h·H per
    token) plus, during the backward, one layer recomputed in full: rows·T·(L_t·h·H + per-layer + 4·H).
    Layers below the lowest adapted one save nothing (no parameter and no input there needs a gradient).
    A separate critic runs its own adapter through the trunk once more: × 2."""
    per_layer = layer_activation_bytes_per_token(shape, targets, r, a, seq_len, h=h, autocast=autocast,
                                                 grouped_kv=grouped_kv and not checkpointing)
    H = shape["hidden_size"]
    h = a if h is None else h
    if checkpointing:
        per_token = trained_layers * h * H + per_layer + 4 * H
    else:
        per_token = trained_layers * per_layer + 4 * H
    return int(rows * seq_len * per_token * (2 if critic == "separate" else 1))


def _linear_weights(shape: dict) -> dict[str, int]:
    """Parameters of each linear module of one decoder layer (GPT-2: qkv fused; no gate)."""
    V, H, I, L, nh, nkv, d, dq = model_dims(shape)
    if is_gpt2(shape):
        return {"qkv": 3 * H * H, "o": H * H, "up": H * I, "down": I * H}
    return {"q": H * dq, "k": H * nkv * d, "v": H * nkv * d, "o": dq * H, "gate": H * I, "up": H * I, "down": I * H}


def autocast_weight_copy_bytes(shape: dict, *, targets, trained_layers: int, checkpointing: bool,
                               critic: str = "shared") -> int:
    """Under bf16 autocast over fp32 weights, the bf16 casts of frozen weights the training forward keeps: autograd
    saves a matmul's (cast) weight to compute its input's gradient, and autocast casts a frozen weight anew at every
    use (its cache holds only leaves that require grad). Measured with saved_tensors_hooks (tests/test_plan.py).

    Without checkpointing: 2 B × every linear weight of the trained layers whose input needs a gradient — in the
    lowest trained layer, the modules up to the first adapted one read an input that needs none (the embedding
    output or the frozen-prefix cache: q/k/v's normed input always; o's input too when none of q/k/v is adapted; …)
    — and the LM head (V·H, tied or not). A separate critic's pass through the trained layers casts and keeps them
    again (× 2, LM head once). With gradient checkpointing, one layer's casts at a time (the layer recomputed in the backward;
    `enable_input_require_grads` makes every input need a gradient) + the LM head's."""
    V, H, *_ = model_dims(shape)
    weights = _linear_weights(shape)
    per_layer = sum(weights.values())
    if checkpointing:
        return 2 * (per_layer + V * H)
    order = [["qkv"], ["o"], ["up"], ["down"]] if is_gpt2(shape) else [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]
    adapted = {m for m, _, _ in lora_modules(shape, targets)}
    skipped = 0
    for group in order:  # the lowest trained layer: inputs up to and including the first adapted group's need none
        skipped += sum(weights[m] for m in group)
        if adapted & set(group):
            break
    layers = trained_layers * per_layer - skipped if adapted else 0
    return 2 * (layers * (2 if critic == "separate" else 1) + V * H)


def backward_transient_bytes(shape: dict, rows: int, seq_len: int, resp_len: int, *, a: int,
                             load_in_4bit: bool = False) -> int:
    """What the backward adds on top of the saved activations and the policy logits, at its worst: the larger of
    - the logits' gradient (`ppo/logprobs.py`): one buffer of the head's output shape and dtype, [rows, R+1, V] of
      a bytes, filled one sequence at a time through an fp32 [R, V] temporary: a·rows·(R+1)·V + 4·R·V. (Autograd's
      own chain — TRL's selective_log_softmax, the division by T, the fp32 cast and the slice — held two fp32
      [rows, R, V] buffers at once, 8·rows·R·V.)
    - the top layer's MLP backward, whose input gradients (3 of width I; 4 for GPT-2's gelu) exist before the
      saved tensors they replace are released: m·a·I per token.
    Further down, each layer's transients are offset by the activations already released above it. On a 4-bit base,
    + the weight bitsandbytes dequantises to bf16 for the input gradient (2·H·I for the largest)."""
    H, I = shape["hidden_size"], shape["intermediate_size"]
    mlp = (4 if is_gpt2(shape) else 3) * a * I * rows * seq_len
    V, R = shape["vocab_size"], resp_len
    logits_grad = a * rows * (R + 1) * V + 4 * R * V
    return int(max(logits_grad, mlp) + (2 * H * I if load_in_4bit else 0))


def loss_transient_bytes(rows: int, resp_len: int, vocab: int) -> int:
    """Between the training forward and its backward, the PPO loss: TRL's `entropy_from_logits` (a statistic, no
    grad at ent_coef = 0) works through 128 rows of [rows·R, V] at a time — log_softmax, exp and their product, fp32:
    12·min(128, rows·R)·V, an upper bound: the trainer now asks for 16 rows at a time, after the backward when
    the entropy is only a statistic. (The log-probs' per-sequence logsumexp temporaries, `ppo/logprobs.py`, are
    smaller.)"""
    return int(12 * min(128, rows * resp_len) * vocab)


def inference_working_bytes(shape: dict, rows: int, seq_len: int, *, a: int, load_in_4bit: bool = False,
                            dtype: str = "bf16", h: int | None = None, autocast: bool = False,
                            weight_cast: bool = False) -> int:
    """Largest transient of a no-grad forward over rows·T tokens (one layer at a time; nothing is kept):
    the embedding output (the model's forward keeps it as `inputs_embeds` to the end), residual and normed input
    (3·h·H) + the larger of the MLP (SiLU(gate), up, their product: 3·a·I; GPT-2 4·a·I)
    and the attention (q, k, v, RoPE'd q and k, k and v repeated, output and its contiguous copy:
    a·(6·d_q + 3·n_kv·d); the RoPE'd q and k take the hidden state's dtype: + (h − a)·(d_q + n_kv·d)), + PEFT's fp32
    copy of the LoRA input when the hidden state is 16-bit without autocast (4·H; under autocast the policy skips it,
    `PolicyAndValue.precision`), or under autocast over fp32 weights the bf16 casts of the input for lora_A and for
    the base layer (2·a·H), + the attention mask: a bool and a
    converted a-byte bias [rows, T, T] (rows·T²·(1 + a)). On a 4-bit base, + the largest weight dequantised to bf16
    (2·H·I); under autocast over fp32 weights (`weight_cast`), + its bf16 cast (2·H·I)."""
    V, H, I, L, nh, nkv, d, dq = model_dims(shape)
    h = a if h is None else h
    mlp = (4 if is_gpt2(shape) else 3) * I
    attn = 6 * dq + 3 * nkv * d
    rope = 0 if is_gpt2(shape) else (h - a) * (dq + nkv * d)
    lora = (2 * a * H if h != a else 0) if autocast else (4 * H if h != 4 else 0)
    per_token = 3 * h * H + max(a * mlp, a * attn + rope) + lora
    dequant = 2 * H * I if (load_in_4bit or weight_cast) else 0
    return int(rows * seq_len * per_token + rows * seq_len * seq_len * (1 + a) + dequant)


def kv_cache_bytes(shape: dict, batch: int, seq_len: int, a: int, k_bytes: int | None = None) -> int:
    """KV cache at the end of sampling: L · n_kv · d · (P + R) · B · (k + a) — values of a bytes, keys of k (default
    a; the hidden state's dtype after RoPE under autocast over fp32 weights)."""
    V, H, I, L, nh, nkv, d, dq = model_dims(shape)
    k = a if k_bytes is None else k_bytes
    return int(L * nkv * d * seq_len * batch * (k + a))


def logits_bytes(rows: int, resp_len: int, vocab: int) -> int:
    """One [rows, R, V] fp32 tensor: the policy's z/T at the response positions (`policy.py:_lm`, logits_to_keep =
    R + 1), or the reference's z kept for the exact KL: 4·rows·R·V."""
    return int(4 * rows * resp_len * vocab)


def exact_kl_bytes(resp_len: int, vocab: int) -> int:
    """`PolicyAndValue.sequence_kl` works EXACT_KL_STATES (16) response states of one sequence at a time in float64:
    log_softmax(z.double()), ref.double(), p = exp, log p − log p_ref and their product are alive together:
    5 · 8·min(R, 16)·V = 40·min(R, 16)·V bytes, whatever the batch (the [B] result is negligible)."""
    return int(40 * min(resp_len, EXACT_KL_STATES) * vocab)


def forward_logits_bytes(rows: int, resp_len: int, vocab: int, logit_bytes: int, head_cast: int = 0) -> int:
    """End of a forward that produces logits: the model's own [rows, R+1, V] logits (a bytes each), z/T (fp32) and
    one sequence's fp32 [R, V] temporary (`ppo/logprobs.py` makes z from 16-bit logits and the logsumexp one
    sequence at a time): rows·V·(a·(R+1) + 4·R) + 4·R·V; or, if larger, the logits beside the LM head's bf16 cast
    (`head_cast`: 2·V·H under autocast over fp32 weights), freed before z/T is made."""
    full = rows * vocab * (logit_bytes * (resp_len + 1) + 4 * resp_len) + 4 * resp_len * vocab
    return int(max(full, rows * vocab * logit_bytes * (resp_len + 1) + head_cast))


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
    states kept for pooling (rows·T·a·H). Outside the PPO passes' precision context: `a` is the weights' dtype."""
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
