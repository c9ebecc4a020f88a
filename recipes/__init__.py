"""The recipes: one readable script per trainer plus YAML configs and accelerate configs.

In the repository this folder is top-level `recipes/`; installed, it is the package `rlhf_ext.recipes` (see
pyproject.toml's `package-dir`), so `rlhf-ext ppo --config …` works from a wheel too. Configs name data and models
relative to themselves or as package resources, so they run from any directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
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

    _refuse_8bit(model_args)
    init = {"dtype": model_args.dtype} if model_args.dtype is not None else {}  # "auto": the checkpoint's own dtype
    if model_args.model_revision not in (None, "main"):
        init["revision"] = model_args.model_revision
    if model_args.attn_implementation:
        init["attn_implementation"] = model_args.attn_implementation
    training_args.model_init_kwargs = {**(training_args.model_init_kwargs or {}), **init}
    return quantization_config(model_args.load_in_4bit, model_args.dtype, quant_type=model_args.bnb_4bit_quant_type,
                               double_quant=model_args.use_bnb_nested_quant,
                               quant_storage=model_args.bnb_4bit_quant_storage)


def _refuse_8bit(model_args) -> None:
    if model_args.load_in_8bit:
        raise ValueError(
            "load_in_8bit: rlhf_ext shares one frozen base between policy, reference, critic and reward members, in "
            "full precision or in 4-bit (bitsandbytes' 8-bit layers are not supported). Set `load_in_4bit: true` "
            "(QLoRA) instead, or neither.")


def resume_argument(training_args):
    """`resume_from_checkpoint` for `train()`, as TRL's scripts pass it on: a checkpoint folder; `true` (any case) for
    the newest checkpoint in `output_dir`, which the string field would otherwise take for a folder named "true"."""
    value = training_args.resume_from_checkpoint
    return True if isinstance(value, str) and value.lower() == "true" else value


def parse_arguments(config_cls, argv: list[str] | None = None):
    """(script_args, training_args, model_args, config_file) as TRL's scripts parse them — `TrlParser((ScriptArguments,
    config_cls, ModelConfig)).parse_args_and_config()` —, except that a mistake in the configuration stops the recipe
    with one line naming it and the fix (argparse's exit status, 2, before anything loads) where TrlParser raises a
    traceback: a `--config` file that is not there (a shipped config's name, e.g. `--config ppo_smollm2_sentiment`,
    finds it from any directory), not YAML or not a mapping; the other recipe's config (a reward YAML given to the
    PPO recipe, or the reverse); a GRPO / RLOO / TRL 1.12 PPO field (with its replacement); any other unknown field
    (with the nearest one); and a value the configs refuse (their own messages name the fix)."""
    import yaml
    from trl import ModelConfig, ScriptArguments, TrlParser

    parser = TrlParser((ScriptArguments, config_cls, ModelConfig))
    parser.epilog = ("--config FILE: the settings as YAML (`field: value` lines; the options above override them). "
                     "A shipped config by name works from any directory: "
                     + ", ".join(sorted(p.stem for p in (HERE / "configs").glob("*.yaml"))) + ".")
    for action in parser._actions:  # an optional bool (`bf16`, `gradient_checkpointing`) as a bare flag too, as a bool
        if action.nargs is None and getattr(action.type, "__name__", "") == "string_to_bool":
            action.nargs, action.const = "?", True
    argv = list(sys.argv[1:] if argv is None else argv)

    def fail(message: str):
        parser.exit(2, f"{parser.prog}: error: {message}\n")  # argparse's status, without its usage

    config_file, settings = None, {}
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 == len(argv):
            fail("--config needs a YAML file, e.g. --config ppo_smollm2_sentiment (a shipped config) or a path")
        config_file = argv[i + 1] = _config_file(argv[i + 1], fail)
        try:
            settings = yaml.safe_load(Path(config_file).read_text())
        except yaml.YAMLError as e:
            fail(f"{config_file} is not valid YAML: {e}")
        if settings is None:
            settings = {}
        if not isinstance(settings, dict):
            fail(f"{config_file} must be a YAML mapping of `field: value` lines (it holds a {type(settings).__name__})")
    _check_fields(parser, config_cls, [k for k in settings if k != "env"], argv, config_file, fail)
    try:
        parsed = parser.parse_args_and_config(argv)
        _refuse_8bit(parsed[2])
    except (ValueError, TypeError) as e:  # the configs' own checks: each message says what to change
        fail(str(e))
    return (*parsed, config_file)


def _config_file(name: str, fail) -> str:
    """`name` if it is a file; else the shipped config of that name when `name` is a bare name; else `fail`."""
    if Path(name).is_file():
        return name
    shipped = config_path(name)
    if Path(name).name == name and shipped.is_file():
        return str(shipped)
    names = ", ".join(sorted(p.stem for p in (HERE / "configs").glob("*.yaml")))
    fail(f"--config {name}: no such file. Pass a path to a YAML, or a shipped config by name (from any directory): "
         f"{names}")


def _check_fields(parser, config_cls, yaml_names: list[str], argv: list[str], config_file, fail) -> None:
    """Every field named in the YAML or as a `--option` is one the recipe's dataclasses have; else `fail` with what
    the name is: another trainer's field (with what to use instead) or a misspelling (with the nearest field)."""
    from rlhf_ext import PPOConfig, RewardEnsembleConfig

    known = {action.dest for action in parser._actions}  # what a YAML key sets (TrlParser matches dests)
    flags = {s.lstrip("-").replace("-", "_") for action in parser._actions for s in action.option_strings}
    flags |= {"config"}
    # an option may be abbreviated (argparse's prefix matching): unknown only if it starts no option's name
    options = [a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")]  # --kl-target too
    options = [o for o in options if not any(f.startswith(o) for f in flags)]
    where = {**{k: "the command line" for k in options}, **{k: config_file for k in yaml_names if k not in known}}
    if not where:
        return
    if config_cls is PPOConfig:
        from rlhf_ext.ppo.config import foreign_field_fixes

        fixes = foreign_field_fixes(where)
        if fixes:
            fail(f"PPOConfig has no such field(s): {fixes}. (README: \"Coming from TRL 1.12's PPO\", \"Coming from "
                 f"GRPO / RLOO\".)")
    other, command = ((RewardEnsembleConfig, "rlhf-ext reward (recipes/reward_modeling.py)") if config_cls is PPOConfig
                      else (PPOConfig, "rlhf-ext ppo (recipes/ppo.py)"))
    theirs = sorted(k for k in where if k in {f.name for f in dataclasses.fields(other)})
    if theirs and set(theirs) == set(where):
        subject = f"{config_file} is" if config_file and any(where[k] == config_file for k in theirs) else \
            "these options are"
        fail(f"{', '.join(theirs)}: {other.__name__} field(s), not {config_cls.__name__}'s — {subject} for the other "
             f"recipe: run it with {command}")
    unknown = [f"`{k}` ({where[k]}{_nearest(k, known)})" for k in sorted(where)]
    fail(f"{config_cls.__name__} has no such field(s): {'; '.join(unknown)}. `--help` lists every field.")


def _nearest(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    return f"; did you mean `{close[0]}`?" if close else ""


class RecipeInputError(Exception):
    """An input the recipe cannot use — a dataset or a reward model that is not there —, found before training
    starts. `run` ends the recipe with this message and exit status 2 (a configuration's own mistakes stop earlier,
    in `parse_arguments`)."""


def run(main, config_cls, argv: list[str] | None = None):
    """A recipe's `__main__`: `parse_arguments`, then `main(script_args, training_args, model_args, config_file=…)`;
    a `RecipeInputError` becomes one line on stderr and exit status 2 instead of a traceback."""
    *arguments, config_file = parse_arguments(config_cls, argv)
    try:
        return main(*arguments, config_file=config_file)
    except RecipeInputError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def dataset_split(script_args, split: str):
    """`rlhf_ext.data.load_split` for the recipe's dataset; a dataset that is neither here nor reachable on the Hub
    is a `RecipeInputError` (its message says where relative paths are read from and the ways out)."""
    from rlhf_ext.data import load_split

    try:
        return load_split(script_args.dataset_name, split, script_args.dataset_config, script_args.dataset_streaming)
    except (FileNotFoundError, ConnectionError) as e:
        raise RecipeInputError(str(e)) from e


def check_reward_model_path(path: str | None) -> None:
    """Refuse, before anything loads, a `reward_model_path` that cannot work: unset; the `output_dir` of a shipped
    reward config that has not run yet — the first run's usual mistake, named with the command that writes it —; a
    local path that does not exist (one no Hub id could be); a folder that holds no model. A name shaped like a Hub
    id is left to the Hub."""
    from rlhf_ext.models import is_hub_id
    from rlhf_ext.reward.artifact import SPEC_FILE, is_reward_artifact

    if not path:
        raise RecipeInputError("Set reward_model_path to a reward-model artifact (the output_dir of `rlhf-ext "
                               "reward`) or a sequence-classification reward model (Hub id or folder).")
    local = Path(path).expanduser()
    if local.is_dir():
        if not (is_reward_artifact(local) or (local / "config.json").is_file()):  # what PPOTrainer can load
            raise RecipeInputError(
                f"reward_model_path {path!r} is a folder but holds no reward model (no {SPEC_FILE} or config.json). "
                f"Pass the output_dir of `rlhf-ext reward`, or the folder trl.RewardTrainer / save_pretrained() "
                f"wrote.")
        return
    if local.exists():
        return
    import yaml

    wanted = Path(path).as_posix().rstrip("/").removeprefix("./")
    configs = {p.stem: yaml.safe_load(p.read_text()) or {} for p in sorted((HERE / "configs").glob("*.yaml"))}
    writers = [name for name, c in configs.items()  # a reward config: the one kind without a reward_model_path
               if "reward_model_path" not in c and str(c.get("output_dir", "")).rstrip("/") == wanted]
    if writers:
        raise RecipeInputError(
            f"reward_model_path {path!r} is not here (relative paths are read from {Path.cwd()}): it is what "
            f"`rlhf-ext reward --config {writers[0]}` writes. Train the reward model first, from this directory, or "
            f"set --reward_model_path to a reward model you have.")
    if not is_hub_id(path):
        raise RecipeInputError(
            f"reward_model_path {path!r}: no such folder (relative paths are read from {Path.cwd()}, then beside the "
            f"config), and not a Hub id. Pass the output_dir of `rlhf-ext reward`, a folder trl.RewardTrainer saved, "
            f"or a Hub id (namespace/name).")


def check_model_name(name: str | None, trust_remote_code: bool = False) -> None:
    """Refuse, before anything loads, a `model_name_or_path` that can name no model (`models.missing_model`), or a
    local checkpoint that ships its own modelling code (`auto_map`) while `trust_remote_code` is off."""
    import json

    from rlhf_ext.models import missing_model

    missing = missing_model(name) if name else None
    if missing:
        raise RecipeInputError(f"model_name_or_path: {missing}")
    config = Path(name).expanduser() / "config.json" if name else None
    if config is not None and config.is_file() and not trust_remote_code:
        try:
            auto_map = json.loads(config.read_text()).get("auto_map")
        except (OSError, ValueError, AttributeError):
            auto_map = None
        if auto_map:
            raise RecipeInputError(
                f"model_name_or_path {name!r} ships its own modelling code (auto_map in config.json: "
                f"{', '.join(sorted(set(str(v) for v in auto_map.values())))}), which runs only with "
                f"--trust_remote_code true. Read that code first; it runs with your permissions.")
