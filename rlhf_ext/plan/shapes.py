"""Model shapes for the memory plan: the architecture fields it needs, from a shipped `plan_shapes/*.json`, a local
folder or config.json, or (online) `AutoConfig`; the dtype names and the NF4 storage cost the formulas share."""

from __future__ import annotations

import json
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
SHAPES_DIR = Path(__file__).resolve().parent.parent / "plan_shapes"
# model types whose parameters `parameter_counts`' closed form describes (checked against the real modules in
# tests/test_plan.py); any other config is counted exactly on a model built on the meta device (`counted_parameters`)
FORMULA_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")


class PlanError(ValueError):
    """A model the plan cannot read (unknown name, offline Hub id, malformed config)."""


# ------------------------------------------------------------------------------------------------------ shapes
def shipped_shapes() -> dict[str, dict]:
    """Name → shape of every `plan_shapes/*.json` (architecture fields + hub_id + source)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(SHAPES_DIR.glob("*.json"))}


def shape_from_config(cfg) -> dict:
    """The architecture fields the plan needs, from a config.json dict or a transformers config (GPT-2 names —
    n_embd, n_layer, n_head, n_inner, n_positions — included; multimodal configs via their text config)."""
    # the whole config: what AutoModelForCausalLM builds from it (a multimodal model's vision tower included, as
    # `load_model` loads it) is what `counted_parameters` counts; its dtype is what `--dtype auto` loads
    top = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    cfg = dict(cfg)
    if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    composite = cfg.get("model_type") != top.get("model_type")

    def first(*names, default=None):
        return next((cfg[n] for n in names if cfg.get(n) is not None), default)

    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head")
    layers = first("num_hidden_layers", "n_layer")
    vocab = first("vocab_size")
    if None in (hidden, heads, layers, vocab):
        raise PlanError(f"The config lacks architecture fields (hidden_size / num_attention_heads / "
                        f"num_hidden_layers / vocab_size): found keys {sorted(cfg)[:20]}…")
    def count(name, value) -> int:  # a config's size field: a whole number > 0 (0 heads divided by zero)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
            raise PlanError(f"The config's {name} is {value!r}; it must be a whole number ≥ 1. Check the "
                            f"config.json (or pass the model's Hub id).")
        return int(value)

    hidden = count("hidden_size", hidden)
    heads = count("num_attention_heads", heads)
    positions = first("max_position_embeddings", "n_positions")
    shape = {
        "model_type": cfg.get("model_type", "llama"),
        "vocab_size": count("vocab_size", vocab),
        "hidden_size": hidden,
        "intermediate_size": count("intermediate_size", first("intermediate_size", "n_inner", default=4 * hidden)),
        "num_hidden_layers": count("num_hidden_layers", layers),
        "num_attention_heads": heads,
        "num_key_value_heads": count("num_key_value_heads", first("num_key_value_heads", default=heads)),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True)),
        "max_position_embeddings": None if positions is None else count("max_position_embeddings", positions),
    }
    for extra in ("head_dim", "name", "hub_id", "source", "attention_bias", "layer_types"):
        if cfg.get(extra) is not None:
            shape[extra] = cfg[extra]
    # the checkpoint's dtype, what --dtype auto loads: transformers takes the top level's for the whole model (a
    # composite config's text_config may record another, e.g. float32 as transformers 4 wrote sub-configs)
    for source in (cfg, top):  # (top last: it wins)
        for extra in ("torch_dtype", "dtype"):
            if source.get(extra) is not None:
                shape["torch_dtype"] = str(source[extra]).replace("torch.", "")
    prequantized = prequantized_layout(top.get("quantization_config"))
    if prequantized:
        shape["prequantized"] = prequantized
    if (composite or shape["model_type"] not in FORMULA_MODEL_TYPES) and "param_counts" not in cfg:
        try:
            shape["param_counts"] = counted_parameters(top if composite else cfg)
        except Exception as e:  # noqa: BLE001 — a model type this transformers does not know: the closed form
            shape["param_counts_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    elif "param_counts" in cfg:
        shape["param_counts"] = dict(cfg["param_counts"])
    return shape


def prequantized_layout(qc) -> dict | None:
    """The 4-bit layout of a checkpoint saved already quantised by bitsandbytes (a "…-bnb-4bit" repo: config.json's
    `quantization_config`), which the trainers load in 4-bit whatever `load_in_4bit` says: quant type, double
    quantisation, compute dtype. None for a full-precision checkpoint (or another quantisation method)."""
    if hasattr(qc, "to_dict"):
        qc = qc.to_dict()
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes" or not (
            qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        return None
    return {"quant_type": qc.get("bnb_4bit_quant_type") or "nf4",
            "double_quant": bool(qc.get("bnb_4bit_use_double_quant")),
            "compute_dtype": str(qc.get("bnb_4bit_compute_dtype") or "float32").replace("torch.", "")}


def counted_parameters(cfg: dict) -> dict:
    """Parameters of the causal LM that the config dict `cfg` describes, counted on a model built on the meta device
    (no memory, no download), split the way bitsandbytes' 4-bit loading treats them: `linear` = the weights of
    `nn.Linear` / `Conv1D` modules other than the output embedding (what `load_in_4bit` quantises, transformers'
    rule, and Falcon's linears, which `models.load_model` quantises after it); `experts` = the fused expert tensors
    (`rlhf_ext.models.fused_expert_parameters`), which bitsandbytes 0.50 leaves unquantised; `embeddings`; `lm_head`
    (0 when tied); `other` = everything else (norms, biases, routers, the experts, recurrent layers' convolutions and
    state parameters)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from ..models import PLAIN_LINEAR_SUBCLASSES, fused_expert_parameters

    config = _transformers_config(cfg)
    with torch.device("meta"):
        try:  # the class `load_model` loads (Gemma 3 4B+: Gemma3ForConditionalGeneration, its vision tower included)
            model = AutoModelForCausalLM.from_config(config)
        except Exception:  # noqa: BLE001 — a composite config no causal-LM class takes: its language model
            model = AutoModelForCausalLM.from_config(config.get_text_config())
    out = model.get_output_embeddings()
    params = dict(model.named_parameters())  # tied parameters once
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    tied = out is None or out.weight is model.get_input_embeddings().weight
    lm_head = 0 if tied else out.weight.numel()
    linear = sum(m.weight.numel() for m in model.modules() if m is not out and (
        type(m) is torch.nn.Linear or isinstance(m, Conv1D) or type(m).__name__ in PLAIN_LINEAR_SUBCLASSES))
    total = sum(p.numel() for p in params.values())
    experts = sum(p.numel() for p in fused_expert_parameters(model))
    return {"embeddings": embeddings, "lm_head": lm_head, "linear": linear, "experts": experts,
            "other": total - embeddings - lm_head - linear, "total": total}


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
            if (path / "rlhf_ext_reward.json").is_file():
                raise PlanError(f"{path} is a reward-model artifact, not a policy: plan it with "
                                f"--separate-reward-model {path} (a second model), or, trained on the policy's own base, "
                                f"--ensemble K --ensemble-mode heads|adapters (members on the shared base).")
            raise PlanError(f"{path} is a folder without config.json.")
        path = path / "config.json"
    if path.is_file():
        if path.suffix.lower() != ".json":  # weights (.safetensors, .bin, .gguf) or a tokenizer: not a config to read
            kind = f"a {path.suffix} file" if path.suffix else "a file"
            raise PlanError(f"{path} is {kind}, not a model config: pass the model's folder "
                            f"(the one holding config.json), its config.json, a Hub id, or a shipped shape.")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an over-long integer
            raise PlanError(f"{path} is not valid JSON ({e}).") from None
        if not isinstance(cfg, dict):
            raise PlanError(f"{path} holds a JSON {type(cfg).__name__}, not a model config (an object of "
                            f"architecture fields such as hidden_size).")
        return {**shape_from_config(_with_defaults(cfg)), "name": cfg.get("_name_or_path") or path.parent.name,
                "source": str(path)}
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


def _with_defaults(cfg: dict):
    """A config.json as transformers reads it, when it needs its class's defaults: transformers writes a nested
    text_config as its differences from that class's defaults (Gemma 3 4B+: no vocab_size, num_attention_heads, …).
    The plain dict where transformers is not needed or cannot read it (a model type it does not know)."""
    text = cfg.get("text_config")
    if not isinstance(text, dict) or "num_attention_heads" in text and "vocab_size" in text:
        return cfg
    try:
        return _transformers_config(cfg)
    except Exception:  # noqa: BLE001 — shape_from_config names what is missing
        return cfg


def _transformers_config(cfg: dict):
    """The transformers config of a config.json dict, its class's defaults filled in."""
    from transformers import AutoConfig, PretrainedConfig

    decode = getattr(PretrainedConfig, "_decode_special_floats", None)  # config.json writes inf as {"__float__": …}
    return AutoConfig.for_model(**(decode(cfg) if decode else cfg))


def model_dims(shape: dict) -> tuple[int, int, int, int, int, int, int, int]:
    """(V, H, I, L, n_h, n_kv, d, d_q = n_h·d)."""
    H, nh = shape["hidden_size"], shape["num_attention_heads"]
    d = shape.get("head_dim") or H // nh
    return (shape["vocab_size"], H, shape["intermediate_size"], shape["num_hidden_layers"], nh,
            shape["num_key_value_heads"], d, nh * d)


def is_gpt2(shape: dict) -> bool:
    return shape.get("model_type") == "gpt2"
