"""The reward-model artifact: one folder per run, loadable by one call into a `RewardEnsemble`.

Layout::

    rlhf_ext_reward.json             spec: base model (canonical reference + fingerprint), mode, members,
                                     normalisation, LoRA config, pooling
    heads.safetensors                score heads: "<adapter>.weight" [k, H] (+ ".bias")
    adapters/<adapter>.safetensors   LoRA weights, keys relative to the transformer trunk
    trunk/                           full trunk weights (only for runs without LoRA)
    tokenizer files, README.md (model card)
    manifest.json                    size + SHA-256 of every file, verified on load (written last)

Members are LoRA adapters (+ heads) on a frozen base, so the PPO trainer attaches them to *its* base
(`load_reward_model(path, base_model=policy_peft_model)`) instead of loading another model copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..adapters import wrap_with_peft
from ..integrity import CorruptFileError, atomic_folder, load_safetensors, read_json, save_tensors, verify_manifest
from ..models import (base_reference, changed_from_checkpoint, ensure_pad_token, load_model, load_tokenizer,
                      model_fingerprint, quantization_config, trunk_of)
from .ensemble import RewardEnsemble

SPEC_FILE = "rlhf_ext_reward.json"
FORMAT_VERSION = 2
_REBUILD = ("Rebuild the artifact: rerun the reward recipe (recipes/reward_modeling.py) or "
            "RewardEnsembleTrainer.save_model(output_dir)")
# LoRA inits that leave the base weights as they are (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA rewrite them): the saved
# weights replace such an init, so an adapter is always rebuilt with the default one
BASE_KEEPING_INITS = (True, False, "gaussian", "orthogonal", "eva")


def trunk_key_prefix(peft_model) -> str:
    """State-dict prefix of the trunk inside a PeftModel (`base_model.model.` + `model.` for LMs)."""
    hf = peft_model.get_base_model()
    inner = getattr(hf, "base_model_prefix", "")
    return "base_model.model." + (f"{inner}." if inner and hasattr(hf, inner) else "")


def save_reward_artifact(out_dir, ens: RewardEnsemble, spec: dict, tokenizer, card: str | None = None) -> Path:
    """Write `ens` (its adapters, heads, and the trunk when it has no LoRA) as an artifact folder, atomically."""
    from peft import get_peft_model_state_dict

    out = Path(out_dir)
    with atomic_folder(out) as tmp:
        (tmp / "adapters").mkdir()
        save_tensors({f"{a}.{k}": v.float() for a, head in ens.heads.items() for k, v in head.state_dict().items()},
                     tmp / "heads.safetensors")
        if spec["mode"] == "full":
            trunk_of(ens.model).save_pretrained(tmp / "trunk", safe_serialization=True)
        else:
            prefix = trunk_key_prefix(ens.model)
            for a in ens.adapters:
                sd = get_peft_model_state_dict(ens.model, adapter_name=a)
                keep = ens.model.peft_config[a].modules_to_save or ()
                own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and _adapter_key(k, keep)}
                save_tensors(own, tmp / "adapters" / f"{a}.safetensors")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card:
            (tmp / "README.md").write_text(card)
        (tmp / SPEC_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **spec}, indent=2))
    return out


def _adapter_key(key: str, modules_to_save) -> bool:
    """A key of an adapter's own state: LoRA weights, or its trained copy of a `modules_to_save` module (PEFT's state
    dict names that as the module itself) — never a base bias (PEFT adds those for bias != "none")."""
    module = key.rsplit(".", 1)[0]
    return "lora_" in key or any(module == m or module.endswith("." + m) for m in modules_to_save)


def is_reward_artifact(path) -> bool:
    """`path` is a folder written by `RewardEnsembleTrainer.save_model` (it holds the spec file)."""
    return (Path(path).expanduser() / SPEC_FILE).is_file()


def read_spec(path) -> dict:
    path = Path(path).expanduser()
    f = path / SPEC_FILE
    if not path.exists():
        raise FileNotFoundError(f"No reward model at {str(path)!r}: no such folder (relative paths are read from "
                                f"{Path.cwd()}), and not a Hub id. Pass the output_dir of `recipes/reward_modeling.py` "
                                f"or `RewardEnsembleTrainer`, or the Hub repo it was pushed to.")
    if not is_reward_artifact(path):
        raise FileNotFoundError(
            f"{path} is not an rlhf_ext reward-model artifact ({SPEC_FILE} missing). Train one with "
            f"`recipes/reward_modeling.py` or `RewardEnsembleTrainer`, then pass its output_dir."
        )
    spec = read_json(f, _REBUILD + ".")
    if spec.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer rlhf_ext (format {spec['format_version']}); upgrade rlhf_ext.")
    for key in ("mode", "adapters", "members"):
        if key not in spec:
            raise CorruptFileError(f, f"has no '{key}' entry", _REBUILD + ".")
    return spec


def lora_config_of(spec: dict, model):
    """The artifact's LoraConfig for `model` (artifacts written before `layers_pattern` was recorded get it here)."""
    from peft import LoraConfig

    from ..prefix_cache import layer_list_name

    cfg = dict(spec["lora_config"])
    if cfg.get("layers_to_transform") is not None and not cfg.get("layers_pattern"):
        cfg["layers_pattern"] = layer_list_name(model)
    init = cfg.get("init_lora_weights", True)
    if init not in BASE_KEEPING_INITS:  # trained on a rewritten base: re-running the init would rewrite this one
        raise ValueError(f"This reward artifact was trained with init_lora_weights={init!r}, which rewrites the base "
                         f"weights it starts from: its adapter on the unmodified base does not score as the trained "
                         f"model did, and rebuilding it would rewrite the base it is loaded onto (shared with the PPO "
                         f"policy). Nothing was changed. Please retrain it with the default init (leave "
                         f"init_lora_weights out); rlhf_ext now refuses such inits when training starts.")
    cfg["init_lora_weights"] = True  # the saved weights replace the init; a base-editing one never runs
    return LoraConfig(**cfg)


def attach_adapters(peft_model, path, spec, prefix: str = "") -> list[str]:
    """Add the artifact's LoRA adapters to an existing PeftModel (frozen); returns their names on the host."""
    from peft import set_peft_model_state_dict

    names = []
    key_prefix = trunk_key_prefix(peft_model)
    for a in spec["adapters"]:
        host_name = prefix + a
        if host_name not in peft_model.peft_config:
            peft_model.add_adapter(host_name, lora_config_of(spec, peft_model))
        state = load_safetensors(Path(path) / "adapters" / f"{a}.safetensors", _REBUILD + ".")
        try:
            res = set_peft_model_state_dict(peft_model, {key_prefix + k: v for k, v in state.items()},
                                            adapter_name=host_name)
        except RuntimeError as e:  # shapes differ: an artifact written before its rank_pattern etc. were recorded
            raise ValueError(f"Reward adapter {a!r} of {path} does not match the LoRA config its artifact records "
                             f"({spec.get('lora_config')}): {str(e).splitlines()[-1].strip()}. Its trainer did not "
                             f"record every LoRA setting (an earlier rlhf_ext). {_REBUILD}.") from e
        unexpected = list(getattr(res, "unexpected_keys", []))
        if unexpected:
            raise ValueError(f"Reward adapter {a!r} of {path} does not fit this base model (unexpected keys "
                             f"{unexpected[:3]}…): it was trained on {spec.get('base_model')!r}.")
        names.append(host_name)
    from ..adapters import adapter_parameters

    for h in names:  # reward members stay frozen on the host
        for p in adapter_parameters(peft_model, h).values():
            p.requires_grad_(False)
    return names


def load_reward_model(path, base_model=None, *, tokenizer=None, dtype=None, load_in_4bit=None,
                      adapter_prefix: str = "", device=None) -> RewardEnsemble:
    """Load a reward-model artifact (a folder, or a Hub repo id "user/repo"). With `base_model` (a PeftModel on the same base), members are attached to it
    as extra adapters — no second copy of the base. Otherwise the trunk is loaded from the recorded base model.

    Every file is checked against the artifact's manifest first: a truncated or altered file is named."""
    from peft import PeftModel

    from ..hub import download, looks_like_repo_id

    if looks_like_repo_id(str(path)) and not Path(path).exists():
        path = download(str(path))  # "user/repo" on the Hub: the same artifact folder
    path = Path(path).expanduser()  # `~/rm` as the recipes' reward_model_path check and load_model take it
    spec = read_spec(path)
    if not verify_manifest(path, _REBUILD + ".", required=("heads.safetensors",)):
        import warnings

        warnings.warn(f"Reward model {path} has no manifest.json, so its files could not be checked for damage or "
                      f"tampering before loading. Re-save it with RewardEnsembleTrainer.save_model() (or "
                      f"rlhf_ext.integrity.write_manifest(folder)) to add one.", stacklevel=2)
    if tokenizer is None:
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            raise CorruptFileError(path / "tokenizer.json", "missing (the artifact has no tokenizer files)",
                                   _REBUILD + ", or pass tokenizer= the base model's tokenizer.")
        tokenizer = load_tokenizer(str(path))
    tokenizer = ensure_pad_token(tokenizer)
    heads_state = load_safetensors(path / "heads.safetensors", _REBUILD + ".")
    mode = spec["mode"]
    if mode == "full":
        model = load_model(str(path / "trunk"), "trunk", dtype=dtype or spec.get("dtype"))
        adapters, owns = ["full"], True
    elif base_model is not None:
        if not isinstance(base_model, PeftModel):
            raise TypeError("`base_model` must be a peft.PeftModel so reward members can be attached as adapters.")
        model, owns = base_model, False
        adapters = attach_adapters(model, path, spec, prefix=adapter_prefix)
    else:
        four_bit = spec.get("load_in_4bit", False) if load_in_4bit is None else load_in_4bit
        layout = spec.get("four_bit") if four_bit else None  # the quantisation it was trained on (NF4 if unrecorded)
        quantization = {} if not layout else {"quantization_config": quantization_config(
            True, layout["compute_dtype"], quant_type=layout["quant_type"], double_quant=layout["double_quant"],
            quant_storage=layout.get("quant_storage"))}  # unrecorded before: uint8, bitsandbytes' default
        if not spec.get("base_model"):  # trained from a model instance with no name or path to record
            raise ValueError(f"{path} does not record where its base model comes from (it was trained from a model "
                             f"instance without a name_or_path). Pass that base as a peft.PeftModel: "
                             f"load_reward_model(path, base_model=get_peft_model(base, LoraConfig(...))), or train "
                             f"from a model name or folder, which the artifact then records.")
        base = load_model(spec["base_model"], "trunk", dtype=dtype or spec.get("dtype"), load_in_4bit=four_bit,
                          revision=spec.get("base_revision"), **quantization)
        if spec.get("base_fingerprint") and spec["base_fingerprint"] != model_fingerprint(base):
            # trained on a model object changed in memory (an SFT adapter merged, embeddings resized): the recorded
            # name loads other weights, and the heads would score them silently wrong
            raise ValueError(f"{path} was trained on weights that differ from those at its recorded base model "
                             f"{spec['base_model']!r} (fingerprint {spec['base_fingerprint']} against "
                             f"{model_fingerprint(base)}): the model given to the trainer was changed in memory — an "
                             f"adapter merged, embeddings resized — or the folder changed since. Save the model it "
                             f"trained on (model.save_pretrained(dir), tokenizer too) and pass it: "
                             f"load_reward_model(path, base_model=get_peft_model(AutoModel.from_pretrained(dir), "
                             f"LoraConfig(...))), or retrain from the saved folder.")
        first = spec["adapters"][0]
        model = wrap_with_peft(base, lora_config_of(spec, base), adapter_prefix + first)
        adapters, owns = attach_adapters(model, path, spec, prefix=adapter_prefix), True
        model.eval()
    heads = nn.ModuleDict()
    for host, a in zip(adapters, spec["adapters"]):  # artifact names → names on the host model
        if f"{a}.weight" not in heads_state:
            raise CorruptFileError(path / "heads.safetensors", f"has no head for member adapter {a!r}", _REBUILD + ".")
        w = heads_state[f"{a}.weight"]
        # in fp32 as trained, whatever torch's default dtype is (a user's set_default_dtype(bfloat16) rounded every
        # score); transformers' from_pretrained likewise ignores it
        lin = nn.Linear(w.shape[1], w.shape[0], bias=f"{a}.bias" in heads_state, dtype=torch.float32)
        with torch.no_grad():
            lin.weight.copy_(w)
            if lin.bias is not None:
                lin.bias.copy_(heads_state[f"{a}.bias"])
        heads[host] = lin.requires_grad_(False)
    ens = RewardEnsemble(model, tokenizer, {**spec, "adapters": adapters}, heads, owns_base=owns)
    ens.heads.to(device if device is not None else next(trunk_of(model).parameters()).device)
    return ens


def same_base(spec: dict, model, name: str | None) -> bool:
    """Does the artifact's base model equal `model` (loaded from `name`)? By fingerprint of the weights when the
    artifact recorded one — and, as that reads the embeddings only, which an SFT adapter merged into the policy's
    base leaves alone, by `model`'s other weights against the recorded base's checkpoint when it is at hand —, else
    by canonical reference (embedded name, Hub id or absolute path)."""
    if spec.get("base_fingerprint"):
        return spec["base_fingerprint"] == model_fingerprint(model) and \
            not changed_from_checkpoint(model, spec.get("base_model"))
    refs = {base_reference(r) for r in (spec.get("base_model"), spec.get("base_model_display")) if r}
    mine = {base_reference(r) for r in (name, getattr(getattr(model, "config", None), "_name_or_path", None)) if r}
    return bool(refs & mine)
