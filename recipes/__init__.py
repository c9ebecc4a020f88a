"""The recipes: one readable script per trainer plus YAML configs and accelerate configs.

In the repository this folder is top-level `recipes/`; installed, it is the package `rlhf_ext.recipes` (see
pyproject.toml's `package-dir`), so `rlhf-ext ppo --config …` works from a wheel too. Configs name data and models
relative to themselves or as package resources, so they run from any directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import shlex
import sys
import typing
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROGRAM: str | None = None  # how the user started the recipe, for its messages: `rlhf-ext ppo` sets it (cli.py)


def program() -> str:
    """The name a recipe's usage line and errors begin with: `rlhf-ext ppo` when run through the console script,
    else the script's file name (`ppo.py`), as argparse names it."""
    return PROGRAM or Path(sys.argv[0]).name


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
    the newest checkpoint in `output_dir`, which the string field would otherwise take for a folder named "true";
    `false` for none."""
    value = training_args.resume_from_checkpoint
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def parse_arguments(config_cls, argv: list[str] | None = None):
    """(script_args, training_args, model_args, config_file) as TRL's scripts parse them — `TrlParser((ScriptArguments,
    config_cls, ModelConfig)).parse_args_and_config()` —, except that a mistake in the configuration stops the recipe
    with one line naming it and the fix (argparse's exit status, 2, before anything loads) where TrlParser raises a
    traceback: a `--config` file that is not there (a shipped config's name, e.g. `--config ppo_smollm2_sentiment`,
    finds it from any directory), not YAML or not a mapping; the other recipe's config (a reward YAML given to the
    PPO recipe, or the reverse); a GRPO / RLOO / TRL 1.12 PPO field (with its replacement); any other unknown field
    (with the nearest one); a key given twice; a YAML value of the wrong type for its field, where TrlParser passes
    it on unchecked (`_typed_settings`); and a value the configs refuse (their own messages name the fix)."""
    import yaml
    from trl import ModelConfig, ScriptArguments, TrlParser

    parser = TrlParser((ScriptArguments, config_cls, ModelConfig), prog=program())
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
            settings = yaml.load(Path(config_file).read_text(), Loader=_unique_keys_loader())
        except _DuplicateKey as e:
            fail(f"{config_file}: {e}")
        except yaml.YAMLError as e:
            fail(f"{config_file} is not valid YAML: {' '.join(str(e).split())}")
        if settings is None:
            settings = {}
        if not isinstance(settings, dict):
            fail(f"{config_file} must be a YAML mapping of `field: value` lines (it holds a {type(settings).__name__})")
    _check_fields(parser, config_cls, [k for k in settings if k != "env"], argv, config_file, fail)
    if config_file is not None:  # what TrlParser does with --config, on the file read (and checked) once, here
        env = settings.pop("env", {})
        if not isinstance(env, dict):
            fail(f"{config_file}: `env` must be a mapping of environment variables (NAME: value lines)")
        os.environ.update({str(k): str(v) for k, v in env.items()})
        parser.set_defaults_with_config(**_typed_settings(settings, parser.dataclass_types, config_file, fail))
        i = argv.index("--config")
        argv = argv[:i] + argv[i + 2:]
    try:
        parsed = parser.parse_args_and_config(argv)
        _refuse_8bit(parsed[2])
    except (ValueError, TypeError) as e:  # the configs' own checks: each message says what to change
        fail(_json_option(parser, argv, e) or str(e))
    return (*parsed, config_file)


def _json_option(parser, argv, error) -> str | None:
    """For PPOConfig's JSON error on a command-line value ("Expecting value: line 1 column 1"), which names no field:
    the option that holds the text (the YAML's were checked before)."""
    import json

    if not isinstance(error, json.JSONDecodeError):
        return None
    hints = {k: v for cls in parser.dataclass_types for k, v in typing.get_type_hints(cls).items()}
    for name, value in vars(parser.parse_known_args(argv)[0]).items():
        if isinstance(value, str) and name in hints and _json_kind(hints[name]) and name not in _JSON_FILE_FIELDS:
            try:
                json.loads(value)
            except ValueError:
                example = "'{\"lam\": 1.0}'" if _json_kind(hints[name]) is dict else "'[\"missing_eos\"]'"
                return f"--{name} {value!r} is not JSON ({error}); give it as JSON text, e.g. --{name} {example}"
    return None


def _json_kind(hint):
    """dict or list for a field that takes a mapping or list either as such or as JSON text (`aggregation_kwargs`,
    `shapers`: PPOConfig parses a string there), unlike a list of names that also takes one name (`report_to`)."""
    import types

    union = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    origins = {typing.get_origin(k) or k for k in union}
    if str not in origins:
        return None
    if dict in origins:
        return dict
    lists = [typing.get_args(k) for k in union if typing.get_origin(k) is list]
    return list if any(args in ((typing.Any,), ()) for args in lists) else None


class _DuplicateKey(Exception):
    pass


def _unique_keys_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """yaml.SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last one silently, so
        `max_steps: 1` above a forgotten `max_steps: 50` trained for 50."""

        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, typing.Hashable) and key in seen:
                    raise _DuplicateKey(f"`{key}` is set twice (lines {seen[key]} and {line}); YAML would keep the "
                                        f"last one silently. Keep one of them.")
                seen.setdefault(key, line)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


# transformers reads a string in these as the path of a JSON file; in the other mapping fields, as JSON
_JSON_FILE_FIELDS = {"accelerator_config", "deepspeed", "fsdp_config"}


def _typed_settings(settings: dict, dataclass_types, config_file: str, fail) -> dict:
    """The YAML's values checked against their fields' types, as argparse checks the command line's: TrlParser makes
    them argparse defaults, which argparse converts only when they are strings, so `learning_rate: true` trained at
    1.0, `num_ppo_epochs: 1.5` failed deep in training and `shapers: linear` stopped with a JSON error naming no
    field. Returned as the command line would give them: a whole float as an int (`max_steps: 1.0e3`), one string
    as a one-element list (`lora_target_modules: c_attn`, as `--lora_target_modules c_attn`)."""
    hints, defaults = {}, {}
    for cls in dataclass_types:
        hints.update(typing.get_type_hints(cls))
        defaults.update({f.name: f.default for f in dataclasses.fields(cls)})
    return {name: _typed(name, value, hints[name], defaults.get(name), config_file, fail) if name in hints else value
            for name, value in settings.items()}


def _typed(name: str, value, hint, default, config_file: str, fail):
    import enum
    import json
    import types

    import yaml

    union = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = [k for k in union if k is not type(None)]
    origins = {typing.get_origin(k) or k for k in kinds}
    choices = {k for k in origins if k is typing.Literal or (isinstance(k, type) and issubclass(k, enum.Enum))}
    shown = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).removesuffix("\n...\n").strip()
    json_kind = _json_kind(hint)

    def refuse(why: str):
        fail(f"{config_file}: `{name}: {shown}` is {why}")

    def expected() -> str:
        if json_kind:
            return f"a {'mapping' if json_kind is dict else 'list'} (YAML, or the same as a JSON string)"
        return _expected(kinds)

    if value is None:
        if type(None) in union or default is None:
            return None
        refuse(f"null; {name} takes {expected()}. Give a value or leave the line out (default: {default!r}).")
    if typing.Any in kinds or not origins <= {bool, int, float, str, list, dict} | choices:
        return value  # a type this check does not know (accelerate's ParallelismConfig): the field's own check
    if json_kind:
        if isinstance(value, json_kind):
            return value
        if not isinstance(value, str) or name in _JSON_FILE_FIELDS and not value.lstrip().startswith("{"):
            if isinstance(value, str):
                return value  # a JSON file's path
            refuse(f"{_kind_of(value)}; {name} takes {expected()}.")
        try:
            parsed = json.loads(value)
        except ValueError as e:
            example = "{lam: 1.0}" if json_kind is dict else "[{name: linear, alpha: 0.02}, missing_eos]"
            refuse(f"text that is not JSON ({e}); {name} takes {expected()}, e.g. {name}: {example}.")
        if not isinstance(parsed, json_kind):
            refuse(f"JSON for {_kind_of(parsed)}; {name} takes {expected()}.")
        return value
    if isinstance(value, bool) and choices:
        refuse(f"a boolean; {name} takes {expected()}. YAML reads a bare no / yes / off / on as a boolean: quote it "
               f"({name}: \"{'yes' if value else 'no'}\").")
    if isinstance(value, str) and origins and origins <= {int, float}:  # YAML reads 1e3 (no dot) as text
        try:
            number = float(value)
        except ValueError:
            refuse(f"text; {name} takes {expected()}.")
        if float in origins:
            return value  # argparse converts it
        value = number  # an integer field: judged as the number it spells, below
    if isinstance(value, str):  # argparse converts it as it converts the command line's (or says why not)
        return [value] if list in origins and str not in origins else value
    if str in origins and not isinstance(value, (list, dict)):
        return value  # transformers reads some text fields' other values itself (`fsdp: true`)
    if isinstance(value, bool):
        if bool in origins:
            return value
        refuse(f"a boolean; {name} takes {expected()} (true is not 1 here).")
    if isinstance(value, (int, float)) and bool not in origins:
        if float in origins or int in origins and float(value).is_integer():
            return value if float in origins else int(value)
        if int in origins:
            refuse(f"a number with a fraction; {name} takes {expected()}.")
    if isinstance(value, list) and list in origins or isinstance(value, dict) and dict in origins:
        return value
    refuse(f"{_kind_of(value)}; {name} takes {'one value: ' if isinstance(value, (list, dict)) else ''}{expected()}.")


# a value's type in words, as expected (`_expected`) and as found (`_kind_of`: a YAML true is "a boolean")
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text", list: "a list",
               dict: "a mapping"}


def _kind_of(value) -> str:
    return "a boolean" if isinstance(value, bool) else _TYPE_WORDS.get(type(value), f"a {type(value).__name__}")


def _expected(kinds) -> str:
    import enum

    words = []
    for k in kinds:
        origin = typing.get_origin(k) or k
        if origin is typing.Literal:
            words.append("one of " + ", ".join(map(str, typing.get_args(k))))
        elif isinstance(origin, type) and issubclass(origin, enum.Enum):
            words.append("one of " + ", ".join(str(m.value) for m in origin))
        else:
            words.append(_TYPE_WORDS.get(origin, getattr(origin, "__name__", str(origin))))
    return " or ".join(dict.fromkeys(words))


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


def quiet_bars_off_main_process() -> None:
    """Under `accelerate launch` with several processes (torch.distributed.run sets RANK), the libraries' progress
    bars — transformers' "Loading weights", datasets' maps — are drawn by the main process only, as rlhf_ext's own
    (`rlhf_ext/progress.py`): one per process drew over each other. Warnings and errors are left as they are."""
    if os.environ.get("RANK", "0") == "0":
        return
    import datasets
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def run(main, config_cls, argv: list[str] | None = None):
    """A recipe's `__main__`: `parse_arguments`, then `main(script_args, training_args, model_args, config_file=…)`;
    a `RecipeInputError` becomes one line on stderr and exit status 2 instead of a traceback; Ctrl-C, status 130 (a
    training run has saved the iteration or step it finished and said how to resume: `rlhf_ext/interrupt.py`)."""
    *arguments, config_file = parse_arguments(config_cls, argv)
    quiet_bars_off_main_process()
    try:
        return main(*arguments, config_file=config_file)
    except RecipeInputError as e:
        print(f"{program()}: error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        from tqdm.auto import tqdm

        tqdm.write(f"{program()}: interrupted", file=sys.stderr)  # a line of its own under a live bar
        raise SystemExit(130) from None


def announce_saved(trainer, kind: str) -> None:
    """The recipe's last lines (main process only, as TRL's scripts print "Model saved to …"): where the artifact
    is and the command that uses it next; for PPO, the run's report and any flagged pairs awaiting review."""
    if not trainer.is_world_process_zero():
        return
    args = trainer.args
    out = args.output_dir
    arg = shlex.quote(str(out))  # the commands below copy into a shell as printed (a space or é in the folder)
    if kind == "reward":
        lines = [f"Reward model saved to {out} (adapters, heads, normalisation, manifest).",
                 f"Next, PPO with it as reward_model_path: rlhf-ext ppo --config PPO_CONFIG --reward_model_path "
                 f"{arg}"]
    else:
        lines = [f"Policy saved to {out} (a PEFT adapter: PeftModel.from_pretrained(base, {out!r}); value head in "
                 f"{Path(out) / 'critic'}).",
                 f"Curves, alarms and top samples: rlhf-ext report {arg}"]
        monitor = getattr(trainer, "monitor", None)
        if monitor is not None and monitor.halted_by:
            lines.insert(0, f"Stopped early: the reward-hacking monitor's {monitor.halted_by} detector halted "
                            f"training at iteration {trainer.iteration} of {trainer.state.max_steps} (its warning "
                            f"above says how to resume).")
        if monitor is not None:
            try:
                pending = monitor.queue.pending_count()
            except Exception:  # a damaged queue is the review command's to name, not the end of a finished run
                pending = 0
            if pending:
                lines.append(f"{pending} flagged pair(s) await review: rlhf-ext review {arg}")
    if args.push_to_hub:
        lines.append(f"Pushed to the Hub: https://huggingface.co/{trainer.hub_model_id}")
    print("\n".join(lines), flush=True)


@contextmanager
def setup_phase():
    """Around building the trainer and `train()`: until training begins (the trainers' `on_train_begin`, after a
    checkpoint is resumed and before the first step), a ValueError, TypeError, FileNotFoundError, CorruptFileError
    or a KeyError from `datasets` is the input's — the data, a setting only the trainer can judge, the checkpoint —
    and becomes a `RecipeInputError` (`run`: one line, exit status 2). From the first step on, an error is a bug and
    keeps its traceback. Yields the watch: `trainer = setup.watch(Trainer(...))`."""
    from transformers import TrainerCallback

    from rlhf_ext.integrity import CorruptFileError, OutputDirInUseError

    class Watch(TrainerCallback):
        began = False

        def watch(self, trainer):
            trainer.callback_handler.callbacks.insert(0, self)  # before the monitor, whose start samples the policy
            return trainer

        def on_train_begin(self, args, state, control, **kwargs):
            self.began = True

    setup = Watch()
    try:
        yield setup
    except (ValueError, TypeError, OSError, CorruptFileError, KeyError, OutputDirInUseError) as e:
        if setup.began or isinstance(e, KeyError) and not _raised_in_datasets(e):
            raise
        # a KeyError's str() is the repr of its message
        raise RecipeInputError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from e


def _raised_in_datasets(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__", "").split(".")[0] == "datasets":
            return True
        tb = tb.tb_next
    return False


def dataset_split(script_args, split: str, optional: bool = False):
    """`rlhf_ext.data.load_split` for the recipe's dataset; a dataset that is neither here nor reachable on the Hub,
    or a local file that is not JSON lines, is a `RecipeInputError` (its message says where relative paths are read
    from and the ways out, or which line is bad). `optional`: None where the split is not there (a broken file
    still stops the recipe)."""
    from rlhf_ext.data import DataFileError, load_split

    try:
        return load_split(script_args.dataset_name, split, script_args.dataset_config, script_args.dataset_streaming)
    except DataFileError as e:
        raise RecipeInputError(str(e)) from e
    except (FileNotFoundError, ConnectionError, ValueError) as e:
        # not there: no such file, the Hub out of reach, or a Hub dataset without that split (ValueError); a local
        # file's ValueError (pyarrow's, a column of two types) is a broken file
        there = isinstance(e, ValueError) and Path(script_args.dataset_name).exists()
        if optional and not there:
            return None
        raise RecipeInputError(str(e)) from e


def warn_preference_pairs(dataset) -> None:
    """PPO given preference pairs (TRL's chosen/rejected format, e.g. `dataset_config: preferences`) trains on their
    prompts alone: said once, since it runs, but is rarely what was meant."""
    import warnings

    pairs = [c for c in ("chosen", "rejected") if c in (dataset.column_names or [])]
    if pairs:
        warnings.warn(f"The PPO dataset holds preference pairs ({', '.join(pairs)} columns): PPO uses only their "
                      f"prompts (rewards come from reward_model_path), not the {' / '.join(pairs)} responses. Pass "
                      f"prompt-only data (e.g. dataset_config: prompts); the pairs are for `rlhf-ext reward`.",
                      UserWarning, stacklevel=2)


def data_path(script_args, config_file) -> str:
    """`dataset_name`, required, resolved as `rlhf_ext.data.resolve_data_path` does (relative to the YAML)."""
    from rlhf_ext.data import resolve_data_path

    if not script_args.dataset_name:
        raise RecipeInputError("Set dataset_name: a Hub dataset id, a folder of <config>_<split>.jsonl files (relative "
                               "to the YAML), or shipped:sentiment (the embedded task) — in the YAML or as "
                               "--dataset_name.")
    return resolve_data_path(script_args.dataset_name, config_file)


def check_report_to(training_args) -> None:
    """`report_to`'s trackers can be built: transformers refuses a missing one only when the trainer is built,
    after the model has loaded, with a traceback."""
    from transformers.integrations import get_reporting_integration_callbacks

    if any("," in n for n in training_args.report_to or [] if isinstance(n, str)):  # `--report_to a,b`: a list
        training_args.report_to = [x.strip() for n in training_args.report_to for x in str(n).split(",") if x.strip()]
    names = [n for n in training_args.report_to or [] if n != "none"]
    try:
        for callback in get_reporting_integration_callbacks(names):
            callback()
    except ValueError as e:  # a name transformers has no integration for
        raise RecipeInputError(f"report_to {names}: {e} Give the names as listed (several: a YAML list, or "
                               f"--report_to tensorboard,trackio).") from e
    except (RuntimeError, ImportError) as e:
        raise RecipeInputError(f"report_to {names}: {e} Install it, or set report_to to another tracker or "
                               f"none.") from e


def check_plugins(training_args) -> None:
    """Build, before anything loads, every plugin a PPO config names — KL controller and estimator, aggregation,
    shapers, detectors: small objects, no model —, so an unknown name (the registry's message lists the valid ones),
    a misspelled keyword or a value a plugin refuses stops the recipe with the field named, not after the weights
    load."""
    from rlhf_ext.monitor.monitor import build_detectors
    from rlhf_ext.plugins.kl import build_controller
    from rlhf_ext.plugins.shaping import build_shapers
    from rlhf_ext.registry import build

    a = training_args
    builds = {
        "kl_controller": lambda: build_controller(a.kl_controller, a.init_kl_coef, a.kl_target,
                                                  **(a.kl_controller_kwargs or {})),
        "kl_estimator": lambda: build("kl_estimator", a.kl_estimator),
        "aggregation": lambda: build("aggregation", a.aggregation, **(a.aggregation_kwargs or {})),
        "shapers": lambda: build_shapers(a.shapers),
        "monitor_detectors": lambda: build_detectors(a.monitor_detectors) if a.monitor else None,
    }
    for field, build_it in builds.items():
        try:
            build_it()
        except KeyError as e:  # a {…} entry without its "name"
            raise RecipeInputError(f"{field}: an entry has no {e}: give each as a name or a mapping with `name: …` "
                                   f"(e.g. {{name: linear, alpha: 0.02}}); `rlhf-ext plugins` lists the names.") from e
        except (ValueError, TypeError) as e:
            raise RecipeInputError(f"{field}: {e}") from e


def check_resume(training_args) -> None:
    """Refuse, before anything loads, a `resume_from_checkpoint` with nothing to resume: a folder that is not there,
    or `true` where `output_dir` holds no checkpoint-N folder. (A checkpoint that is there but damaged is found when
    it loads, inside `setup_phase`.)"""
    value = resume_argument(training_args)
    if not value:
        return
    from rlhf_ext.integrity import numbered_checkpoints

    output_dir = Path(training_args.output_dir)
    found = [p.name for p in reversed(numbered_checkpoints(output_dir))]  # oldest first
    there = (f"{output_dir} holds {', '.join(found[-3:])}: pass one of those, or true for the newest" if found else
             f"{output_dir} holds no checkpoint-N folder (a run writes them with save_strategy 'steps' or 'epoch'): "
             f"train without resume_from_checkpoint, or set output_dir to the earlier run's")
    if value is True and not found:
        raise RecipeInputError(f"resume_from_checkpoint true: nothing to resume; {there}.")
    if value is not True and not Path(value).expanduser().is_dir():
        raise RecipeInputError(f"resume_from_checkpoint {value!r}: no such folder (relative paths are read from "
                               f"{Path.cwd()}); {there}.")


def check_extra_preferences(files) -> None:
    """Each `extra_preferences` file, before anything loads: there, and JSON lines with at least one row (the
    trainer reads them only after the model has loaded)."""
    from rlhf_ext.data import DataFileError, jsonl_rows
    from rlhf_ext.monitor.queue import preferences_as_decided

    for f in files or []:
        preferences_as_decided(f)  # a review folder's file that a killed server left stale or missing: rebuilt
        if not Path(f).is_file():
            raise RecipeInputError(f"extra_preferences: no file {f} (relative paths are read from {Path.cwd()}). "
                                   f"Decisions from the review page are in OUTPUT_DIR/review/preferences.jsonl "
                                   f"(written after the first decision).")
        try:
            rows = jsonl_rows(f)
        except DataFileError as e:
            raise RecipeInputError(f"extra_preferences: {e}") from e
        if not rows:
            raise RecipeInputError(f"extra_preferences: {f} holds no preference pairs yet (the file is empty).")


def check_reward_model_path(path: str | None, field: str = "reward_model_path") -> None:
    """Refuse, before anything loads, a `reward_model_path` that cannot work: unset; the `output_dir` of a shipped
    reward config that has not run yet — the first run's usual mistake, named with the command that writes it —; a
    local path that does not exist (one no Hub id could be); a folder that holds no model. A name shaped like a Hub
    id is left to the Hub. `field`: the setting that named it (an entry of `audit_model_paths` is checked the same way)."""
    from rlhf_ext.models import is_hub_id
    from rlhf_ext.reward.artifact import SPEC_FILE, is_reward_artifact

    if not path:
        raise RecipeInputError("Set reward_model_path to a reward-model artifact (the output_dir of `rlhf-ext "
                               "reward`) or a sequence-classification reward model (Hub id or folder).")
    local = Path(path).expanduser()
    if local.is_dir():
        if not (is_reward_artifact(local) or (local / "config.json").is_file()):  # what PPOTrainer can load
            raise RecipeInputError(
                f"{field} {path!r} is a folder but holds no reward model (no {SPEC_FILE} or config.json). "
                f"Pass the output_dir of `rlhf-ext reward`, or the folder trl.RewardTrainer / save_pretrained() "
                f"wrote.")
        saved_as = non_reward_architecture(local)
        if saved_as:
            raise RecipeInputError(
                f"{field} {path!r} holds a {saved_as} (its config.json's `architectures`), not a reward "
                f"model: loaded for scoring, its score head would be random and PPO would chase noise. Train a reward "
                f"model on it first (`rlhf-ext reward`, then pass that output_dir), or pass a sequence-classification "
                f"reward checkpoint (what trl.RewardTrainer saves).")
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
            f"{field} {path!r} is not here (relative paths are read from {Path.cwd()}): it is what "
            f"`rlhf-ext reward --config {writers[0]}` writes. Train the reward model first, from this directory, or "
            f"set --{field} to a reward model you have.")
    if not is_hub_id(path):
        raise RecipeInputError(
            f"{field} {path!r}: no such folder (relative paths are read from {Path.cwd()}, then beside the "
            f"config), and not a Hub id. Pass the output_dir of `rlhf-ext reward`, a folder trl.RewardTrainer saved, "
            f"or a Hub id (namespace/name).")


def non_reward_architecture(path) -> str | None:
    """The architecture a local checkpoint folder was saved as, when that is not a reward model: its config.json
    names `architectures` and none is a *ForSequenceClassification (a causal LM such as LlamaForCausalLM, a bare
    trunk). None for an rlhf_ext reward artifact, a sequence-classification checkpoint, or a folder whose config says
    nothing either way (no config.json, unreadable, no `architectures`): loading decides those. Read from the
    config alone, before any weights load."""
    from rlhf_ext.models import non_reward_architecture as saved_as_non_reward
    from rlhf_ext.reward.artifact import is_reward_artifact

    path = Path(path).expanduser()
    return None if is_reward_artifact(path) else saved_as_non_reward(_saved_config(path).get("architectures"))


def _saved_config(folder) -> dict:
    """A local checkpoint folder's config.json as a dict; {} where there is none or it cannot be read (loading
    reports those)."""
    import json

    try:
        config = json.loads((Path(folder).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def check_model_name(name: str | None, trust_remote_code: bool = False) -> None:
    """Refuse, before anything loads, a `model_name_or_path` that can name no model (`models.missing_model`), or a
    local checkpoint that ships its own modelling code (`auto_map`) while `trust_remote_code` is off."""
    from rlhf_ext.models import missing_model

    missing = missing_model(name) if name else None
    if missing:
        raise RecipeInputError(f"model_name_or_path: {missing}")
    if name and not trust_remote_code:
        auto_map = _saved_config(name).get("auto_map")
        if auto_map:
            raise RecipeInputError(
                f"model_name_or_path {name!r} ships its own modelling code (auto_map in config.json: "
                f"{', '.join(sorted(set(str(v) for v in auto_map.values())))}), which runs only with "
                f"--trust_remote_code true. Read that code first; it runs with your permissions.")
