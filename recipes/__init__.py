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
