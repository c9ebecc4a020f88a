"""How much GPU memory one PPO iteration of rlhf_ext needs, from the model's config alone (`rlhf-ext plan`: its
command line, table and notes are in plan_cli.py).

    rlhf-ext plan --model Qwen2.5-7B-Instruct --load-in-4bit --dtype bfloat16 --bf16 --gpu-memory 24 --batch 16 \\
                  --prompt-length 512 --completion-length 256 --minibatches 4 --gradient-checkpointing
    rlhf-ext plan --model gpt2 --gpu-memory 24 --completion-length 128            # largest batch that fits
    rlhf-ext plan --model ./my-model/ --dtype auto --bf16 --json                   # a folder, or its config.json
    rlhf-ext plan --model SmolLM2-1.7B-Instruct --dtype bfloat16 --bf16 --num-processes 8 \\
                  --separate-reward-model Qwen2.5-7B-Instruct@bfloat16 --audit-model SmolLM2-135M-Instruct

No weights are read: a local folder's (or a path's) config.json, `transformers.AutoConfig` for Hub ids (online
only), or a shape shipped in `rlhf_ext/plan_shapes/*.json`.

What the plan counts is what the trainer holds (ppo/trainer.py, ppo/policy.py, monitor/monitor.py), phase by
phase; every iteration is alike (the previous rollout is released before the next one is sampled). Notation: B prompts
per iteration, b = B / minibatches rows per training forward, P prompt and R completion tokens (T = P + R), V
vocabulary, H hidden, I MLP width, L layers (L_t of them trained: all, or the top `--lora-top-layers`), n_h / n_kv
attention / KV heads of size d. "logits" = one [B, R, V] fp32 tensor (4·B·R·V).

Precision — two settings, as in the trainer (`Precision` below):
  --dtype   the dtype the base is LOADED in, with the trainer's semantics (`model_init_kwargs={"dtype": …}`,
            `load_model(dtype=…)`, a recipe's `dtype:`): omitted → float32 (rlhf_ext.models loads float32 when no
            dtype is given, whatever the checkpoint holds), "auto" → the checkpoint's own dtype (the config's
            torch_dtype; float32 when it records none), or bfloat16 / float32 / float16.
  --bf16    `PPOConfig(bf16=True)` (or accelerate's mixed_precision bf16): every PPO pass under torch.autocast(bf16).
            Matmul outputs (attention, MLP, model logits, V cache: `a` bytes below) are then bf16 even over fp32
            weights, while what autocast does not cast — embeddings, residual stream, norm outputs, RoPE'd keys —
            keeps the weights' dtype (`h` bytes); over fp32 weights the training forward also keeps a bf16 cast of
            every frozen weight it needs for the input gradient. Reward members and separate reward / audit models
            score outside that context (PPOTrainer._rollout), in their weights' dtype.
  On a 4-bit base everything is counted fp32 (a = h = 4), as before: PEFT's `prepare_model_for_kbit_training`
  upcasts the non-quantised parts to fp32, so the hidden states, the KV cache and the logits are fp32 too (an upper
  bound under --bf16, not validated there).

Per process. Under DDP (`accelerate launch`, `--num-processes N`) every process holds the whole plan — its own base,
adapters, optimizer state, reward and audit models — for its own batch: the plan is per GPU, the global batch is
batch × N, and each process adds DDP's gradient buckets (one fp32 copy of the trained parameters).

  generation     weights + trainable state + KV cache + prefill (nothing of the previous rollout is alive)
  reward scoring weights + … + K reward members scoring min(16, B) texts (× K in adapters mode, one mixed batch),
                 then each separate reward model and each audit model scoring the B texts 16 at a time
  reference pass the reference's logits at the response positions, z/T in fp32, and their full log-softmax [B, R, V]
  training step  saved activations of the training forward + ONE policy logits tensor (each step's are freed before
                 the next forward; with one minibatch the θ_old forward is epoch 1's and is freed by it) + the
                 backward's transients (the logits' gradient, twice its size at once)
  exact-KL check (hard controller) Σ_v p (log p − log p_ref) in float64, one sequence at a time: 5 × [R, V] float64
  monitor        between iterations, while this iteration's rollout is still alive: the reward-hacking monitor's
                 review queue samples, scores (rewards and audits) and measures the KL of ≤ `monitor_max_queue` (2)
                 prompts

Each formula is a small function below, with its derivation in the docstring; `estimate()` builds the static
components (`_static`) and each phase's moments (one function per phase, named after the pass it models), and
returns bytes per component and per phase; `largest_batch()` searches the batch. The numbers were checked against
measured peaks on CPU in fp32, bf16 weights and bf16 autocast (benchmarks/memory_plan_check.py) and, when a GPU is
available, scripts/gpu_check.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# --dtype / model_init_kwargs["dtype"] / ModelConfig.dtype spellings → the plan's short names
DTYPE_NAMES = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16"}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
# NF4 with double quantisation (rlhf_ext.models.quantization_config): 4 bits per weight + one uint8 absmax per
# 64-weight block + one fp32 absmax-of-absmax per 256 blocks (+ two small code books, ignored).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
NF4_CONSTANT_BYTES_PER_PARAM = NF4_BYTES_PER_PARAM - 0.5
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "tie_word_embeddings", "max_position_embeddings")
CUDA_CONTEXT_BYTES = int(0.5 * GiB)  # CUDA context + cuBLAS/cuDNN handles: outside torch's allocator
ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation: reserved ≈ 1.1 × allocated at the peak
REWARD_SCORING_BATCH = 16  # RewardEnsemble.score_completions(batch_size=16), ExternalRewardModel(batch_size=16)
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
    for extra in ("torch_dtype", "dtype"):  # the checkpoint's dtype: what --dtype auto loads
        if cfg.get(extra) is not None:
            shape["torch_dtype"] = str(cfg[extra]).replace("torch.", "")
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
            shape, name, dtype = load_shape(model), model, dtype or "fp32"
        dtype = "nf4" if str(dtype).lower() in ("nf4", "4bit", "4-bit") else weight_dtype(dtype, shape)
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
                                     autocast: bool = False) -> float:
    """Bytes autograd saves per token in one trained decoder layer of the training forward (frozen base, LoRA on
    `targets`, dropout off), measured op by op with `torch.autograd.graph.saved_tensors_hooks`:

    Llama-like:  2 RMSNorms keep their fp32 input           2·4·H
                 SDPA keeps q, k, v (repeated to n_h heads:   4·a·d_q + 4·n_h (log-sum-exp, fp32)
                 padding masks rule out native GQA) and out
                 its attention-mask bias, per query row      a·T
                 SiLU-gated MLP: gate, SiLU(gate), up        3·a·I
    GPT-2:       2 LayerNorms keep their input (the residual) 2·h·H
                 fused qkv output + SDPA out                 4·a·H + 4·n_h + a·T
                 gelu_new (tanh form): x, tanh, 1+tanh, x/2  4·a·I
    LoRA:        each adapted module's lora_A keeps its input; without autocast, when a = 4 inputs already kept count
                 once (q/k/v share the normed hidden state; o's input is SDPA's output, which the kernels return in
                 [B, T, n_h, d] layout so the transpose + contiguous is free), and in bf16/fp16 PEFT casts the input
                 to the adapter's fp32 for each module separately (4·in each); lora_B keeps the rank-r middle (4·r).
                 Under autocast lora_A's matmul casts its input to bf16 for each module (a·in each) and the rank-r
                 middle is bf16 (a·r).
    `h` (default a): bytes of the residual stream (the weights' dtype; fp32 under autocast over fp32 weights)."""
    V, H, I, L, nh, nkv, d, dq = _dims(shape)
    h = a if h is None else h
    mods = lora_modules(shape, targets)
    if is_gpt2(shape):
        base = 2 * h * H + 4 * a * H + 4 * nh + a * seq_len + 4 * a * I
        shared_inputs = {"qkv": "ln1", "o": "attn_out", "up": "ln2", "down": "mlp_mid"}
    else:
        base = 2 * 4 * H + 4 * a * dq + 4 * nh + a * seq_len + 3 * a * I
        shared_inputs = {"q": "ln1", "k": "ln1", "v": "ln1", "o": "attn_out", "gate": "ln2", "up": "ln2",
                         "down": "mlp_mid"}
    if autocast:
        return base + sum(a * (i + r) for _, i, _ in mods)
    if a == 4:  # o's input is the SDPA output itself (the kernels return it [B, T, n_h, d]-contiguous)
        inputs = {shared_inputs[m]: 4 * i for m, i, _ in mods if shared_inputs[m] != "attn_out"}
        lora = sum(inputs.values())
    else:
        lora = sum(4 * i for _, i, _ in mods)
    lora += sum(4 * r for _ in mods)
    return base + lora


def training_activation_bytes(shape: dict, rows: int, seq_len: int, *, targets, r: int, a: int, trained_layers: int,
                              checkpointing: bool, critic: str = "shared", h: int | None = None,
                              autocast: bool = False) -> int:
    """Saved activations of one training forward over `rows` sequences of T = `seq_len` tokens.

    Without checkpointing: rows·T·(L_t · per-layer bytes + 4·H for the final norm).
    With gradient checkpointing (non-reentrant): each trained layer keeps only its input hidden state (h·H per
    token) plus, during the backward, one layer recomputed in full: rows·T·(L_t·h·H + per-layer + 4·H).
    Layers below the lowest adapted one save nothing (no parameter and no input there needs a gradient).
    A separate critic runs its own adapter through the trunk once more: × 2."""
    per_layer = layer_activation_bytes_per_token(shape, targets, r, a, seq_len, h=h, autocast=autocast)
    H = shape["hidden_size"]
    h = a if h is None else h
    if checkpointing:
        per_token = trained_layers * h * H + per_layer + 4 * H
    else:
        per_token = trained_layers * per_layer + 4 * H
    return int(rows * seq_len * per_token * (2 if critic == "separate" else 1))


def _linear_weights(shape: dict) -> dict[str, int]:
    """Parameters of each linear module of one decoder layer (GPT-2: qkv fused; no gate)."""
    V, H, I, L, nh, nkv, d, dq = _dims(shape)
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
    V, H, *_ = _dims(shape)
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
    - the logits' gradient, twice its size at once: 8·rows·R·V. On CPU (and without TRL's triton kernel) it arrives
      in two [rows, R, V] fp32 halves, selective_log_softmax's gather and its per-row logsumexp (stacked by
      UnbindBackward from per-row gradients), summed into the logits' buffer; with the kernel it is one tensor, but
      the division by the temperature (z/T) then makes a second one while the first is alive. Measured on CPU (fp32,
      benchmarks/memory_plan_check.py): 2.0–2.1 × 4·rows·R·V above the logits themselves. (A hand-written
      one-buffer backward for the log-probs was tried and measured no lower in the trainer: 822.9 against 824.1 MiB
      for smollm2-135m in bf16, 1224.8 against 1225.2 in fp32.)
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
                            dtype: str = "bf16", h: int | None = None, autocast: bool = False,
                            weight_cast: bool = False) -> int:
    """Largest transient of a no-grad forward over rows·T tokens (one layer at a time; nothing is kept):
    the embedding output (the model's forward keeps it as `inputs_embeds` to the end), residual and normed input
    (3·h·H) + the larger of the MLP (SiLU(gate), up, their product: 3·a·I; GPT-2 4·a·I)
    and the attention (q, k, v, RoPE'd q and k, k and v repeated, output and its contiguous copy:
    a·(6·d_q + 3·n_kv·d); the RoPE'd q and k take the hidden state's dtype: + (h − a)·(d_q + n_kv·d)), + PEFT's fp32
    copy of the LoRA input when the hidden state is 16-bit (4·H) and, under autocast, its cast back to bf16 for
    lora_A (a·H; + a·H more for the base layer's cast of an fp32 input), + the attention mask: a bool and a
    converted a-byte bias [rows, T, T] (rows·T²·(1 + a)). On a 4-bit base, + the largest weight dequantised to bf16
    (2·H·I); under autocast over fp32 weights (`weight_cast`), + its bf16 cast (2·H·I)."""
    V, H, I, L, nh, nkv, d, dq = _dims(shape)
    h = a if h is None else h
    mlp = (4 if is_gpt2(shape) else 3) * I
    attn = 6 * dq + 3 * nkv * d
    rope = 0 if is_gpt2(shape) else (h - a) * (dq + nkv * d)
    lora = (4 * H if h != 4 else 0) + (a * H if autocast else 0) + (a * H if autocast and h != a else 0)
    per_token = 3 * h * H + max(a * mlp, a * attn + rope) + lora
    dequant = 2 * H * I if (load_in_4bit or weight_cast) else 0
    return int(rows * seq_len * per_token + rows * seq_len * seq_len * (1 + a) + dequant)


def kv_cache_bytes(shape: dict, batch: int, seq_len: int, a: int, k_bytes: int | None = None) -> int:
    """KV cache at the end of sampling: L · n_kv · d · (P + R) · B · (k + a) — values of a bytes, keys of k (default
    a; the hidden state's dtype after RoPE under autocast over fp32 weights)."""
    V, H, I, L, nh, nkv, d, dq = _dims(shape)
    k = a if k_bytes is None else k_bytes
    return int(L * nkv * d * seq_len * batch * (k + a))


def logits_bytes(rows: int, resp_len: int, vocab: int) -> int:
    """One [rows, R, V] fp32 tensor: the policy's z/T at the response positions (`policy.py:_lm`, logits_to_keep =
    R + 1), or the reference's full log-softmax kept for the exact KL: 4·rows·R·V."""
    return int(4 * rows * resp_len * vocab)


def exact_kl_bytes(resp_len: int, vocab: int) -> int:
    """`PolicyAndValue.sequence_kl` works one sequence at a time in float64: log_softmax(z[b].double()),
    ref[b].double(), p = exp, log p − log p_ref and their product are alive together: 5 · 8·R·V = 40·R·V bytes,
    whatever the batch (the [B] result is negligible)."""
    return int(40 * resp_len * vocab)


def forward_logits_bytes(rows: int, resp_len: int, vocab: int, logit_bytes: int, head_cast: int = 0) -> int:
    """End of a forward that produces logits: the model's own [rows, R+1, V] logits (a bytes each), their fp32 copy
    (bf16 only) and z/T (fp32): rows·V·(a·(R+1) + 4·R·(2 if a = 2 else 1)); or, if larger, the logits beside the LM
    head's bf16 cast (`head_cast`: 2·V·H under autocast over fp32 weights), freed before the fp32 copy."""
    full = rows * vocab * (logit_bytes * (resp_len + 1) + 4 * resp_len * (2 if logit_bytes == 2 else 1))
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


# --------------------------------------------------------------------------------------------------- the plan
@dataclass
class _Run:
    """One planned configuration: the sizes the phase builders read, and the working sets they share. Built by
    `estimate()` from its options; every `*_bytes` here is one of the formulas above with this run's arguments."""

    shape: dict
    B: int  # prompts per iteration (per process)
    P: int
    R: int
    M: int  # minibatches
    prec: Precision
    targets: tuple
    lora_r: int
    L_t: int  # trained layers
    checkpointing: bool
    critic: str
    ensemble: int
    ensemble_mode: str
    exact: bool  # hard controller: the reference log-softmax is kept and the exact KL measured
    cache: bool  # frozen-prefix cache
    monitor_max_queue: int
    scorers: list = field(default_factory=list)  # separate reward models, then audit models (ScoringModel)
    device: str = "cuda"

    @property
    def T(self) -> int:
        return self.P + self.R

    @property
    def b(self) -> int:  # rows per training forward
        return self.B // self.M

    @property
    def V(self) -> int:
        return self.shape["vocab_size"]

    @property
    def H(self) -> int:
        return self.shape["hidden_size"]

    @property
    def quantized(self) -> bool:
        return self.prec.weights == "nf4"

    # working sets and per-rollout tensors, by rows
    def activations(self, rows: int) -> int:
        return training_activation_bytes(self.shape, rows, self.T, targets=self.targets, r=self.lora_r, a=self.prec.a,
                                         trained_layers=self.L_t, checkpointing=self.checkpointing, critic=self.critic,
                                         h=self.prec.h, autocast=self.prec.casts)

    def weight_copies(self) -> int:
        if not self.prec.weight_copies:
            return 0
        return autocast_weight_copy_bytes(self.shape, targets=self.targets, trained_layers=self.L_t,
                                          checkpointing=self.checkpointing, critic=self.critic)

    def nograd(self, rows: int, seq_len: int) -> int:
        return inference_working_bytes(self.shape, rows, seq_len, a=self.prec.a, load_in_4bit=self.quantized,
                                       h=self.prec.h, autocast=self.prec.casts, weight_cast=self.prec.weight_copies)

    def head_transient(self, rows: int) -> int:
        """What the LM head's matmul adds beside its logits: under autocast over fp32 weights its bf16 cast
        (2·V·H). (Its input arrives contiguous — `policy._contiguous_input` — so torch's matmul folds the batch
        instead of expanding the weight per row, which on CPU in bf16 was a 2·rows·H·V copy.)"""
        return 2 * self.V * self.H if self.prec.weight_copies else 0

    def forward_logits(self, rows: int) -> int:
        return forward_logits_bytes(rows, self.R, self.V, self.prec.a, self.head_transient(rows))

    def no_grad_forward(self, rows: int) -> int:  # a no-grad forward of the policy, up to its logits
        return max(self.nograd(rows, self.T), self.forward_logits(rows))

    def backward(self, rows: int) -> int:
        """The backward's transients (`backward_transient_bytes`)."""
        return backward_transient_bytes(self.shape, rows, self.T, self.R, a=self.prec.a, load_in_4bit=self.quantized)

    def kv_cache(self, rows: int) -> int:
        return kv_cache_bytes(self.shape, rows, self.T, self.prec.a, k_bytes=self.prec.k_cache)

    def generation_working_set(self, rows: int) -> int:
        """The prefill's no-grad working set, or one layer's cache being extended by torch.cat (a copy), whichever
        is larger, + per-step sampling logits (fp32, ×4 copies) + what the LM head adds (`head_transient`)."""
        L = self.shape["num_hidden_layers"]
        return (max(self.nograd(rows, self.P), self.kv_cache(rows) // L) + 16 * rows * self.V
                + self.head_transient(rows))

    def member_scoring(self, rows: int) -> int:  # reward members on the shared base (weights' dtype)
        return reward_scoring_bytes(self.shape, rows, self.T, self.ensemble, self.ensemble_mode, a=self.prec.scoring,
                                    load_in_4bit=self.quantized)

    def logits(self, rows: int) -> int:
        return logits_bytes(rows, self.R, self.V)

    def prefix_cache(self, rows: int) -> int:  # Rollout.h_low (or its rows), the hidden state's dtype
        return rows * self.T * self.H * self.prec.h if self.cache else 0

    def exact_kl(self) -> int:
        return exact_kl_bytes(self.R, self.V) if self.exact else 0

    def reference_logsoftmax(self) -> int:  # Rollout.ref_logprobs_full, from the reference pass to the next rollout
        return self.logits(self.B) if self.exact else 0


def _static(run: _Run, num_processes: int = 1) -> dict:
    """What every phase holds: the base's weights, the trained state (LoRA + value head in fp32, AdamW, the KL
    guard's copies, DDP's gradient buckets under DDP), the reward members on the shared base, and the weights of
    every separate reward / audit model."""
    shape = run.shape
    n_policy = lora_parameter_count(shape, run.lora_r, run.targets, run.L_t)
    critic_targets = [t for t in run.targets if t != "lm_head"]  # the critic reads hidden states, never logits
    n_critic = lora_parameter_count(shape, run.lora_r, critic_targets, run.L_t) if run.critic == "separate" else 0
    n_value_head = run.H + 1
    return {
        "weights": (base_weight_bytes(shape, load_in_4bit=True) if run.quantized
                    else base_weight_bytes(shape, run.prec.weights)),
        "trained": trainable_bytes(n_policy + n_critic + n_value_head, n_policy if run.exact else 0,
                                   ddp=num_processes > 1),
        "reward_members": reward_member_bytes(shape, run.ensemble, run.ensemble_mode, run.lora_r, run.targets),
        "separate_models": sum(m.weight_bytes() for m in run.scorers),
        "n_policy": n_policy, "n_critic": n_critic, "n_value_head": n_value_head,
    }


def _common(static: dict) -> dict:
    return dict(base_weights=static["weights"]["total"], trainable=static["trained"]["total"],
                reward_members=static["reward_members"], separate_models=static["separate_models"])


def _generation(run: _Run, common: dict) -> list[dict]:
    """PolicyAndValue.generate (`self.rollout = None` first: nothing of the previous rollout is alive): the KV cache
    of B × (P + R) + the generation working set."""
    return [dict(**common, kv_cache=run.kv_cache(run.B), working_set=run.generation_working_set(run.B))]


def _reward_scoring(run: _Run, common: dict) -> list[dict]:
    """RewardPipeline.score, then each audit: the members on the shared base (Python callables: nothing), then each
    separate reward model and each audit model, one scoring forward alive at a time."""
    moments = [dict(**common, reward_scoring=run.member_scoring(run.B))]
    moments += [dict(**common, reward_scoring=m.scoring_bytes(run.B, run.T)) for m in run.scorers]
    return moments


def _reference_pass(run: _Run, common: dict) -> list[dict]:
    """PolicyAndValue.lower (the frozen-prefix cache) and .logits(reference=True): the no-grad forward, its logits →
    z/T → the full log-softmax (ref_logits is freed when _rollout returns)."""
    held = dict(**common, prefix_cache=run.prefix_cache(run.B))
    return [dict(held, working_set=run.nograd(run.B, run.T)),
            dict(held, working_set=run.forward_logits(run.B)),
            dict(held, policy_logits=run.logits(run.B), reference_logsoftmax=run.reference_logsoftmax())]


def _rollout_held(run: _Run, common: dict) -> dict:
    """What stays alive from the reference pass to the next rollout (training step, KL checks, the monitor): the
    rollout's prefix cache and reference log-softmax."""
    return dict(**common, prefix_cache=run.prefix_cache(run.B), reference_logsoftmax=run.reference_logsoftmax())


def _training_step(run: _Run, common: dict) -> list[dict]:
    """The θ_old pass and every epoch's training forward, loss and backward. One minibatch: the θ_old forward with
    gradients IS epoch 1's training forward (memo; `del out` leaves the memo the only holder, and epoch 1 takes it);
    after each epoch but the last the forward that measures the KL is the next epoch's, memoised the same way; each
    step's logits are deleted before the next forward: one alive at a time. Minibatches: a θ_old pass without
    gradients over the whole batch (its logits freed once old_logp is taken), then b rows per step, each copying its
    rows of the prefix cache."""
    held = _rollout_held(run, common)
    if run.M == 1:
        trained = dict(held, activations=run.activations(run.B), weight_copies=run.weight_copies())
        return [dict(trained, working_set=run.forward_logits(run.B)),
                dict(trained, policy_logits=run.logits(run.B),
                     working_set=loss_transient_bytes(run.B, run.R, run.V)),
                dict(trained, policy_logits=run.logits(run.B), working_set=run.backward(run.B))]
    b, h_rows = run.b, run.prefix_cache(run.b)
    trained = dict(held, activations=run.activations(b), weight_copies=run.weight_copies())
    return [dict(held, working_set=run.no_grad_forward(run.B)),
            dict(trained, working_set=run.forward_logits(b) + h_rows),
            dict(trained, policy_logits=run.logits(b), working_set=loss_transient_bytes(b, run.R, run.V) + h_rows),
            dict(trained, policy_logits=run.logits(b), working_set=run.backward(b) + h_rows)]


def _exact_kl_check(run: _Run, common: dict) -> list[dict]:
    """Hard controller only: kl/before_update on the θ_old forward's logits (one minibatch: while the memo holds
    that forward's activations; minibatches: the no-grad θ_old pass's full-batch logits), and after the last epoch
    (every epoch without the memo, and in the guard's backtracking) PPOTrainer._measure: a no-grad forward of one
    minibatch of rows (b = B / minibatches) at a time, then PolicyAndValue.sequence_kl on its [b, R, V] logits."""
    if not run.exact:
        return []
    held = _rollout_held(run, common)
    before = dict(held, policy_logits=run.logits(run.B), exact_kl=run.exact_kl())
    if run.M == 1:
        before.update(activations=run.activations(run.B), weight_copies=run.weight_copies())
    return [before, dict(held, working_set=run.no_grad_forward(run.b)),
            dict(held, policy_logits=run.logits(run.b), exact_kl=run.exact_kl())]


def _monitor(run: _Run, common: dict) -> list[dict]:
    """Between iterations the monitor's review queue (when a 'queue' detector fires): self.rollout (its reference
    log-softmax and prefix cache) is alive while q ≤ monitor_max_queue prompts are sampled from π_ref, scored
    (rewards, then audits), and their KL measured — the policy's and the reference's logits of q rows (each copying
    its rows of the prefix cache), then sequence_kl."""
    q = min(run.monitor_max_queue, run.B)
    if q <= 0:
        return []
    rollout = _rollout_held(run, common)
    h_q = run.prefix_cache(q)
    lq = run.logits(q)
    fwd = run.forward_logits(q)
    scoring = [run.member_scoring(q)] + [m.scoring_bytes(q, run.T) for m in run.scorers]
    return [dict(rollout, kv_cache=run.kv_cache(q), working_set=run.generation_working_set(q)),
            *(dict(rollout, working_set=s) for s in scoring),
            dict(rollout, working_set=max(run.nograd(q, run.T), fwd) + h_q),
            dict(rollout, policy_logits=lq, working_set=fwd + h_q),
            dict(rollout, policy_logits=3 * lq),
            dict(rollout, policy_logits=2 * lq, exact_kl=exact_kl_bytes(run.R, run.V))]


PHASE_BUILDERS = {"generation": _generation, "reward scoring": _reward_scoring, "reference pass": _reference_pass,
                  "training step": _training_step, "exact-KL check": _exact_kl_check, "monitor": _monitor}


def _largest_moment(moments: list[dict]) -> dict | None:
    """A phase = its largest moment: {"total": bytes, "parts": {component: bytes}} (zero parts dropped)."""
    best = None
    for parts in moments:
        parts = {k: int(v) for k, v in parts.items() if v}
        total = sum(parts.values())
        if best is None or total > best["total"]:
            best = {"total": total, "parts": parts}
    return best


def estimate(shape: dict, *, batch: int = 8, prompt_length: int = 256, completion_length: int = 48,
             minibatches: int = 1, ppo_epochs: int = 4, dtype=None, bf16: bool = False, load_in_4bit: bool = False,
             lora_r: int = 16, lora_targets=("q", "k", "v", "o"), lora_top_layers: int = 0,
             gradient_checkpointing: bool = False, critic: str = "shared", ensemble: int = 0,
             ensemble_mode: str = "heads", kl_controller: str = "hard", monitor_max_queue: int = 2,
             separate_reward_models=(), audit_models=(), num_processes: int = 1, device: str = "cuda") -> dict:
    """Peak memory of a PPO iteration, per process: bytes per component, per phase, the peak phase and the overhead.

    `dtype` has the trainer's semantics (`weight_dtype`: None → float32, "auto" → the config's torch_dtype, or a
    dtype); `bf16` = PPOConfig(bf16=True), autocast around every pass. `separate_reward_models` / `audit_models`:
    'MODEL[@DTYPE]' strings, dicts or ScoringModel (each adds its weights to every phase and its scoring forward to
    the reward-scoring phase and the monitor). `num_processes` > 1: DDP — the same plan per process, + DDP's
    gradient buckets; the global batch is batch × num_processes.

    Each phase is the largest of its "moments" — what is alive at one point of PPOTrainer._iteration (or of the
    monitor's review queue after it), read off the code; `monitor_max_queue` = PPOConfig.monitor_max_queue (0: no
    monitor, or no detector with the 'queue' action).

    Returns {"components": {name: bytes}, "phases": {phase: {"total": bytes, "parts": {name: bytes}}},
    "peak_phase", "peak_allocated" (what torch allocates at the peak; compare with torch.cuda.max_memory_allocated
    or a CPU RSS delta), "overhead", "peak" (= peak_allocated + overhead: what the GPU must have), "params",
    "activations_checkpointing", "activations_no_checkpointing", "precision", "options"}."""
    if critic not in ("shared", "separate"):
        raise PlanError(f"critic must be 'shared' or 'separate', got {critic!r}.")
    if ensemble_mode not in ("heads", "adapters"):
        raise PlanError(f"ensemble_mode must be 'heads' or 'adapters', got {ensemble_mode!r}.")
    if batch < 1 or minibatches < 1 or batch % minibatches:
        raise PlanError(f"batch ({batch}) must be a positive multiple of minibatches ({minibatches}).")
    if num_processes < 1:
        raise PlanError(f"num_processes must be ≥ 1, got {num_processes}.")
    prec = precision_of(dtype, load_in_4bit, bf16, shape)
    L = shape["num_hidden_layers"]
    top = lora_top_layers or 0
    if not 0 <= top <= L:
        raise PlanError(f"lora_top_layers={top} but the model has {L} layers.")
    scorers = ([ScoringModel.parse(m, "reward") for m in separate_reward_models]
               + [ScoringModel.parse(m, "audit") for m in audit_models])
    run = _Run(shape=shape, B=batch, P=prompt_length, R=completion_length, M=minibatches, prec=prec,
               targets=normalize_targets(lora_targets), lora_r=lora_r, L_t=top or L,
               checkpointing=gradient_checkpointing, critic=critic, ensemble=ensemble, ensemble_mode=ensemble_mode,
               exact=kl_controller == "hard",
               cache=bool(top) and not is_gpt2(shape),  # frozen-prefix cache: verified off for GPT-2 (positions)
               monitor_max_queue=monitor_max_queue, scorers=scorers, device=device)

    static = _static(run, num_processes)
    common = _common(static)
    phases = {}
    for name, build in PHASE_BUILDERS.items():
        phase = _largest_moment(build(run, common))
        if phase is not None:
            phases[name] = phase
    peak_phase = max(phases, key=lambda k: phases[k]["total"])
    peak_allocated = phases[peak_phase]["total"]
    overhead = overhead_bytes(peak_allocated, device)
    act = {ck: training_activation_bytes(shape, run.b, run.T, targets=run.targets, r=lora_r, a=prec.a,
                                         trained_layers=run.L_t, checkpointing=ck, critic=critic, h=prec.h,
                                         autocast=prec.casts) for ck in (False, True)}
    components = {
        "base_weights": static["weights"]["total"], "trainable": static["trained"]["total"],
        "reward_members": static["reward_members"], "separate_models": static["separate_models"],
        "activations": run.activations(run.b), "weight_copies": run.weight_copies(), "kv_cache": run.kv_cache(run.B),
        "reward_scoring": max([run.member_scoring(run.B)] + [m.scoring_bytes(run.B, run.T) for m in scorers]),
        "policy_logits": run.logits(run.B), "reference_logsoftmax": run.reference_logsoftmax(),
        "exact_kl": run.exact_kl(), "prefix_cache": run.prefix_cache(run.B), "overhead": overhead,
    }
    return {
        "model": shape.get("name", shape.get("model_type")), "components": components, "phases": phases,
        "peak_phase": peak_phase, "peak_allocated": peak_allocated, "overhead": overhead,
        "peak": peak_allocated + overhead, "weights": static["weights"], "trained": static["trained"],
        "params": {**parameter_counts(shape), "lora_policy": static["n_policy"], "lora_critic": static["n_critic"],
                   "value_head": static["n_value_head"]},
        "activations_checkpointing": act[True], "activations_no_checkpointing": act[False],
        "activation_bytes": prec.a, "hidden_bytes": prec.h,
        "precision": {"weights": prec.weights, "autocast": prec.autocast, "a": prec.a, "h": prec.h,
                      "describe": prec.describe()},
        "scoring_models": [{"name": m.name, "role": m.role, "dtype": m.dtype, "weights": m.weight_bytes(),
                            "scoring": m.scoring_bytes(batch, run.T)} for m in scorers],
        "per_process": True, "num_processes": num_processes, "global_batch": batch * num_processes,
        "options": dict(batch=batch, prompt_length=prompt_length, completion_length=completion_length,
                        minibatches=minibatches, ppo_epochs=ppo_epochs, dtype=prec.weights if not load_in_4bit else
                        weight_dtype(dtype, shape), dtype_requested=dtype, bf16=bool(bf16),
                        load_in_4bit=load_in_4bit, lora_r=lora_r, lora_targets=list(run.targets),
                        lora_top_layers=top, gradient_checkpointing=gradient_checkpointing, critic=critic,
                        ensemble=ensemble, ensemble_mode=ensemble_mode, kl_controller=kl_controller,
                        monitor_max_queue=monitor_max_queue, separate_reward_models=[m.name for m in scorers
                                                                                     if m.role == "reward"],
                        audit_models=[m.name for m in scorers if m.role == "audit"], num_processes=num_processes,
                        device=device),
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
