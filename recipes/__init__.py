"""The recipes: one readable script per trainer plus YAML configs and accelerate configs.

In the repository this folder is top-level `recipes/`; installed, it is the package `rlhf_ext.recipes` (see
pyproject.toml's `package-dir`), so `rlhf-ext ppo --config …` works from a wheel too. Configs name data and models
relative to themselves or as package resources, so they run from any directory.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def recipe_path(name: str) -> Path:
    path = HERE / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"No recipe {name!r} in {HERE}; available: {sorted(p.stem for p in HERE.glob('*.py') if p.stem != '__init__')}")
    return path


def config_path(name: str) -> Path:
    """A shipped config by file name (`ppo_smollm2_sentiment.yaml`) or stem."""
    name = name if name.endswith(".yaml") else name + ".yaml"
    return HERE / "configs" / name


def lora_config(model_args):
    """TRL's `get_peft_config(model_args)`, except that one module name stays a module name.

    TRL turns a one-element `lora_target_modules` list into a plain string (so `all-linear` works), and PEFT reads a
    string as a regular expression over *full* module names: `lora_target_modules: [c_attn]` would match no module
    ("Target modules c_attn not found"). A bare name is put back into a list; `all-linear` and real patterns stay."""
    from trl import get_peft_config

    config = get_peft_config(model_args)
    target = getattr(config, "target_modules", None)
    if isinstance(target, str) and target != "all-linear" and target.isidentifier():
        config.target_modules = {target}
    return config


def model_loading(model_args, training_args):
    """TRL's `ModelConfig` loading fields, read as TRL's own scripts read them; returns the 4-bit config or None.

    `dtype`, `model_revision` (unless "main") and `attn_implementation` go into `training_args.model_init_kwargs`,
    the `from_pretrained` kwargs both trainers load the base with (a YAML's own `model_init_kwargs` are kept, these
    win). `load_in_4bit` with `bnb_4bit_quant_type`, `use_bnb_nested_quant` and `bnb_4bit_quant_storage` becomes the
    returned `BitsAndBytesConfig`, its compute dtype the model dtype (TRL's `get_quantization_config`), passed to the
    trainer as `quantization_config`. `load_in_8bit` is refused rather than ignored."""
    from rlhf_ext.models import quantization_config

    if model_args.load_in_8bit:
        raise ValueError(
            "load_in_8bit: rlhf_ext shares one frozen base between policy, reference, critic and reward members, in "
            "full precision or in 4-bit (bitsandbytes' 8-bit layers are not supported). Set `load_in_4bit: true` "
            "(QLoRA) instead, or neither.")
    init = {"dtype": model_args.dtype} if model_args.dtype is not None else {}  # "auto": the checkpoint's own dtype
    if model_args.model_revision not in (None, "main"):
        init["revision"] = model_args.model_revision
    if model_args.attn_implementation:
        init["attn_implementation"] = model_args.attn_implementation
    training_args.model_init_kwargs = {**(training_args.model_init_kwargs or {}), **init}
    return quantization_config(model_args.load_in_4bit, model_args.dtype, quant_type=model_args.bnb_4bit_quant_type,
                               double_quant=model_args.use_bnb_nested_quant,
                               quant_storage=model_args.bnb_4bit_quant_storage)


def resume_argument(training_args):
    """`resume_from_checkpoint` for `train()`, as TRL's scripts pass it on: a checkpoint folder; `true` (any case) for
    the newest checkpoint in `output_dir`, which the string field would otherwise take for a folder named "true"."""
    value = training_args.resume_from_checkpoint
    return True if isinstance(value, str) and value.lower() == "true" else value


def refuse_foreign_fields(parser, argv: list[str], config_file: str | None) -> None:
    """GRPO / RLOO / TRL 1.12 PPO fields, in the YAML (`config_file`, the `--config` argument) or on the command line,
    stop the PPO recipe with what to use instead (`PPOConfig` refuses them the same way in Python); TRL's parser
    alone would only call them "not used by the HfArgumentParser"."""
    import yaml

    from rlhf_ext.ppo.config import foreign_field_fixes

    names = [a[2:].split("=")[0] for a in argv if a.startswith("--")]
    if config_file is not None and Path(config_file).is_file():  # a missing one: TRL's parser says so
        config = yaml.safe_load(Path(config_file).read_text()) or {}
        names += list(config) if isinstance(config, dict) else []
    fixes = foreign_field_fixes(names)
    if fixes:
        parser.exit(2, f"{parser.prog}: error: PPOConfig has no such field(s): {fixes}. (README: \"Coming from TRL "
                       f"1.12's PPO\", \"Coming from GRPO / RLOO\".)\n")  # argparse's exit status, without its usage
