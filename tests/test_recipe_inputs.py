"""The recipes' inputs, wrong in the ways people get them wrong, each stopped with one line and argparse's exit status 2
(no traceback), before the model loads where the mistake can be seen then:

- a YAML value of the wrong type (TrlParser makes YAML values argparse defaults, which argparse converts only when
  they are text: `learning_rate: true` trained at 1.0) or a key given twice (PyYAML keeps the last silently);
- a plugin name or keyword the registry does not know, a resume folder that is not there, an `extra_preferences`
  file that is missing or broken, a causal LM given as the reward model — refused before any weights load (they
  failed after, as tracebacks, or for the causal LM trained PPO against a random score head);
- a local JSON-lines file that is malformed, empty or not UTF-8 (`datasets` said "Expected object or value at
  position 18", a bare StopIteration, a UnicodeDecodeError at tokenization);
- what only the trainer can judge (prompt-only data for the reward model, a damaged checkpoint): one line too, as
  long as training has not begun; an error in a training step is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset

from rlhf_ext import PPOConfig, PPOTrainer, RewardEnsembleConfig, RewardEnsembleTrainer
from rlhf_ext.data import DataFileError, jsonl_rows, load_split
from rlhf_ext.integrity import CorruptFileError
from rlhf_ext.recipes import RecipeInputError, non_reward_architecture, parse_arguments, run, setup_phase

from .conftest import preference_rows, rlhf_ext_in_this_process

CLI = Path(sys.executable).with_name("rlhf-ext")
ROOT = Path(__file__).resolve().parents[1]


# -- fixtures: tiny models, local data, configs ------------------------------------------------------------------
def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """`preferences_{train,test}.jsonl` and `prompts_{train,test}.jsonl`, TRL's formats."""
    folder = tmp_path_factory.mktemp("data")
    for split, seed in (("train", 0), ("test", 1)):
        rows = preference_rows(16, seed)
        write_jsonl(folder / f"preferences_{split}.jsonl", rows)
        write_jsonl(folder / f"prompts_{split}.jsonl", [{"prompt": r["prompt"]} for r in rows])
    return folder


@pytest.fixture(scope="module")
def seq_cls_reward(tmp_path_factory, tiny_path) -> str:
    """A sequence-classification reward checkpoint (what trl.RewardTrainer saves) on the tiny model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("seq_cls") / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(folder)
    return str(folder)


def config(tmp_path: Path, recipe: str, tiny_path: str, data: Path, **fields) -> Path:
    """A YAML for `recipe` ("ppo" or "reward") on the tiny model and the local data, one short step; `fields` win."""
    common = {"model_name_or_path": tiny_path, "dataset_name": str(data), "use_cpu": True, "report_to": "none",
              "max_steps": 1, "save_strategy": "no", "per_device_train_batch_size": 4, "seed": 0,
              "output_dir": str(tmp_path / f"out-{recipe}")}
    if recipe == "ppo":
        rm = tmp_path / "rm"
        rm.mkdir(exist_ok=True)
        (rm / "config.json").write_text("{}")  # a reward folder the first check accepts; nothing loads it here
        common |= {"dataset_config": "prompts", "reward_model_path": str(rm), "max_completion_length": 4,
                   "num_ppo_epochs": 1, "monitor_reference_prompts": 4, "kl_target": 5.0}
    else:
        common |= {"dataset_config": "preferences", "eval_strategy": "no", "normalization_samples": 32}
    path = tmp_path / f"{recipe}.yaml"
    path.write_text(yaml.safe_dump({**common, **fields}, sort_keys=False))
    return path


def module_and_class(recipe: str):
    import importlib

    name = "ppo" if recipe == "ppo" else "reward_modeling"
    return importlib.import_module(f"recipes.{name}"), (PPOConfig if recipe == "ppo" else RewardEnsembleConfig)


def one_line_error(capsys, stop) -> str:
    """The recipe's error: status 2, no traceback, the message on one line (warnings may come before it)."""
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]


def recipe_error(capsys, recipe: str, argv) -> str:
    module, cls = module_and_class(recipe)
    with pytest.raises(SystemExit) as stop:
        run(module.main, cls, [str(a) for a in argv])
    return one_line_error(capsys, stop)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Both trainers (and so every model load) refused: what is checked must be checked before them."""
    import recipes.ppo as ppo_recipe
    import recipes.reward_modeling as reward_recipe

    monkeypatch.setattr(ppo_recipe, "PPOTrainer", lambda *a, **k: pytest.fail("the policy loaded"))
    monkeypatch.setattr(reward_recipe, "RewardEnsembleTrainer", lambda *a, **k: pytest.fail("the model loaded"))


def cli(argv, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *map(str, argv)], capture_output=True, text=True, timeout=300, cwd=cwd)


def assert_one_line_exit_2(r, script: str) -> str:
    """`r`: the console script's CompletedProcess, or (status, stderr) from `rlhf_ext_in_this_process`."""
    status, stderr = (r.returncode, r.stderr) if isinstance(r, subprocess.CompletedProcess) else r
    assert status == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(f"{script}: error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# -- through `rlhf-ext`: its main in this process; the last test here runs the installed script itself ------------
def test_an_unknown_plugin_name_stops_ppo_before_the_model_loads(tmp_path, tiny_path, data, monkeypatch, capsys):
    """`aggregation: meann` was a traceback (exit 1) after the policy, reference and reward model had loaded."""
    path = config(tmp_path, "ppo", tiny_path, data, aggregation="meann")
    line = assert_one_line_exit_2(rlhf_ext_in_this_process(["ppo", "--config", path], tmp_path, monkeypatch, capsys),
                                  "rlhf-ext ppo")
    assert "aggregation: Unknown aggregation 'meann'. Valid names: " in line
    listed = line.split("Valid names: ")[1].split(". ")[0].split(", ")  # and any other test's plugin in this process
    assert {"mean", "median", "min", "uwo", "weighted"} <= set(listed), line
    assert not (tmp_path / "out-ppo").exists()


def test_a_malformed_jsonl_line_is_named_by_file_and_line(tmp_path, tiny_path, data, monkeypatch, capsys):
    """Was `ValueError: Expected object or value at position 18` from inside `datasets`, no file, no line."""
    folder = tmp_path / "bad"
    folder.mkdir()
    good = [json.dumps({"prompt": r["prompt"]}) for r in preference_rows(6, 0)]
    (folder / "prompts_train.jsonl").write_text("\n".join(good[:4] + ['{"prompt": "oops", '] + good[4:]) + "\n")
    path = config(tmp_path, "ppo", tiny_path, data, dataset_name=str(folder))
    line = assert_one_line_exit_2(rlhf_ext_in_this_process(["ppo", "--config", path], tmp_path, monkeypatch, capsys),
                                  "rlhf-ext ppo")
    assert f"{folder / 'prompts_train.jsonl'} line 5: not valid JSON" in line


def test_prompt_only_data_given_to_the_reward_recipe_is_one_line(tmp_path, tiny_path, data, monkeypatch, capsys):
    """The trainer finds this while it is built (after the model loads): one line, exit 2, no traceback."""
    path = config(tmp_path, "reward", tiny_path, data, dataset_config="prompts")
    line = assert_one_line_exit_2(rlhf_ext_in_this_process(["reward", "--config", path], tmp_path, monkeypatch,
                                                           capsys), "rlhf-ext reward")
    assert "train_dataset is missing column(s) ['chosen', 'rejected']; it has ['prompt']" in line


def test_a_yaml_value_of_the_wrong_type_exits_2_through_the_console_script(tmp_path, tiny_path, data):
    path = config(tmp_path, "reward", tiny_path, data, per_device_train_batch_size=8.5)
    line = assert_one_line_exit_2(cli(["reward", "--config", path], tmp_path), "rlhf-ext reward")
    assert (f"{path}: `per_device_train_batch_size: 8.5` is a number with a fraction; per_device_train_batch_size "
            f"takes an integer") in line


# -- YAML values against their fields' types (parse_arguments) ----------------------------------------------------
@pytest.mark.parametrize("text, says", [
    ("learning_rate: true", "`learning_rate: true` is a boolean; learning_rate takes a number"),
    ("learning_rate: [0.001]", "`learning_rate: [0.001]` is a list; learning_rate takes one value: a number"),
    ("max_completion_length: 8.7", "`max_completion_length: 8.7` is a number with a fraction; max_completion_length "
                                   "takes an integer"),
    ("num_ppo_epochs: 1.5", "`num_ppo_epochs: 1.5` is a number with a fraction; num_ppo_epochs takes an integer"),
    ("seed: 1.9", "`seed: 1.9` is a number with a fraction; seed takes an integer"),
    ("per_device_train_batch_size: 8.5", "per_device_train_batch_size takes an integer"),
    ("kl_target: {value: 5}", "`kl_target: {value: 5}` is a mapping; kl_target takes one value: a number"),
    ("shapers: linear", "`shapers: linear` is text that is not JSON (Expecting value: line 1 column 1 (char 0)); "
                        "shapers takes a list"),
    ("aggregation_kwargs: lam=1", "`aggregation_kwargs: lam=1` is text that is not JSON"),
    ("aggregation_kwargs: '[1]'", "`aggregation_kwargs: '[1]'` is JSON for a list; aggregation_kwargs takes a "
                                  "mapping"),
    ("shapers: {name: linear}", "`shapers: {name: linear}` is a mapping; shapers takes a list"),
    ("use_cpu: 1", "`use_cpu: 1` is an integer; use_cpu takes true or false"),
    ("eval_strategy: no", "`eval_strategy: false` is a boolean; eval_strategy takes one of no, steps, epoch"),
    ("max_steps:", "`max_steps: null` is null; max_steps takes an integer"),
    # text where a number goes: argparse printed its whole usage and named --max_steps, an option never typed
    ("max_steps: fast", "`max_steps: fast` is text; max_steps takes an integer"),
    ("num_ppo_epochs: 2.5e0", "`num_ppo_epochs: 2.5e0` is a number with a fraction; num_ppo_epochs takes an integer"),
    ("learning_rate: fast", "`learning_rate: fast` is text; learning_rate takes a number"),
])
def test_a_yaml_value_of_the_wrong_type_names_field_file_value_and_type(capsys, tmp_path, text, says):
    path = tmp_path / "c.yaml"
    path.write_text(("output_dir: out\n" if "use_cpu" in text else "output_dir: out\nuse_cpu: true\n") + text + "\n")
    with pytest.raises(SystemExit) as stop:
        parse_arguments(PPOConfig, ["--config", str(path)])
    line = one_line_error(capsys, stop)
    assert f"error: {path}: `" in line and says in line, line


@pytest.mark.parametrize("option, value, example", [("--aggregation_kwargs", "lam=1", """'{"lam": 1.0}'"""),
                                                     ("--shapers", "linear", """'["missing_eos"]'""")])
def test_json_text_on_the_command_line_that_is_not_json_names_the_option(capsys, option, value, example):
    """PPOConfig's own json.loads said "Expecting value: line 1 column 1 (char 0)", naming no field."""
    with pytest.raises(SystemExit) as stop:
        parse_arguments(PPOConfig, ["--output_dir", "out", "--use_cpu", "true", option, value])
    line = one_line_error(capsys, stop)
    assert f"{option} '{value}' is not JSON (Expecting value: line 1 column 1 (char 0)); give it as JSON text, e.g. " \
           f"{option} {example}" in line


def test_yaml_values_the_command_line_would_accept_still_parse(tmp_path):
    """What argparse reads from text stays accepted (YAML 1.1 reads `1e-3` as text), and values come out as the
    command line gives them: a whole float as an int, one module name as a one-element list (`--lora_target_modules
    c_attn`), `resume_from_checkpoint: true` as true. The JSON fields take YAML or JSON text."""
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: out\nuse_cpu: 'true'\nlearning_rate: 1e-3\nmax_steps: 2.0\nseed: '3'\n"
                    "lora_target_modules: c_attn\nresume_from_checkpoint: true\nkl_target: 5\nnum_ppo_epochs: 3e0\n"
                    "aggregation_kwargs: '{\"lam\": 2.0}'\nshapers: [{name: linear, alpha: 0.1}, missing_eos]\n"
                    "eval_strategy: 'no'\n")
    script, args, model_args, config_file = parse_arguments(PPOConfig, ["--config", str(path)])
    assert (args.use_cpu, args.learning_rate, args.seed, args.kl_target) == (True, 1e-3, 3, 5)
    assert args.max_steps == 2 and type(args.max_steps) is int
    assert args.num_ppo_epochs == 3 and type(args.num_ppo_epochs) is int  # `3e0`: text to YAML 1.1 (no dot)
    assert model_args.lora_target_modules == "c_attn"  # TRL's ModelConfig: a one-element list is its element
    assert args.resume_from_checkpoint is True and args.aggregation_kwargs == {"lam": 2.0}
    assert args.shapers == [{"name": "linear", "alpha": 0.1}, "missing_eos"] and config_file == str(path)


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_shipped_configs_parse_as_trl_parses_them(path):
    from trl import ModelConfig, ScriptArguments, TrlParser

    cls = PPOConfig if "reward_model_path" in yaml.safe_load(path.read_text()) else RewardEnsembleConfig
    argv = ["--config", str(path), "--use_cpu", "true", "--bf16", "false"]
    ours = parse_arguments(cls, list(argv))[:3]
    trls = TrlParser((ScriptArguments, cls, ModelConfig)).parse_args_and_config(list(argv))
    for a, b in zip(ours, trls):
        assert a.to_dict() == b.to_dict() if hasattr(a, "to_dict") else vars(a) == vars(b)


def test_a_key_given_twice_names_both_lines(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: out\nuse_cpu: true\nmax_steps: 1\nseed: 0\nmax_steps: 50\n")
    with pytest.raises(SystemExit) as stop:
        parse_arguments(PPOConfig, ["--config", str(path)])
    line = one_line_error(capsys, stop)
    assert f"{path}: `max_steps` is set twice (lines 3 and 5)" in line
    # the same key in two mappings, and a merged key given again (YAML's override), are not duplicates
    path.write_text("output_dir: out\nuse_cpu: true\nkl_controller_kwargs: &d {lam: 1.0}\n"
                    "aggregation_kwargs:\n  <<: *d\n  lam: 2.0\n")
    args = parse_arguments(PPOConfig, ["--config", str(path)])[1]
    assert (args.kl_controller_kwargs, args.aggregation_kwargs) == ({"lam": 1.0}, {"lam": 2.0})


def test_a_yaml_env_mapping_is_still_applied(tmp_path, monkeypatch):
    """TRL's `env:` (environment variables set before anything runs): the recipes now read the YAML themselves."""
    monkeypatch.delenv("RLHF_EXT_TEST_VARIABLE", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: out\nuse_cpu: true\nenv:\n  RLHF_EXT_TEST_VARIABLE: 7\n")
    parse_arguments(PPOConfig, ["--config", str(path)])
    import os

    assert os.environ.pop("RLHF_EXT_TEST_VARIABLE") == "7"


# -- local JSON-lines files (load_split) --------------------------------------------------------------------------
def test_a_malformed_empty_or_non_utf8_jsonl_names_the_file_and_line(tmp_path):
    rows = [json.dumps({"prompt": f"say something {i}"}) for i in range(6)]
    bad = tmp_path / "malformed.jsonl"
    bad.write_text("\n".join(rows[:4] + ['{"prompt": "oops", '] + rows[4:]) + "\n")
    with pytest.raises(DataFileError, match=rf"{bad} line 5: not valid JSON \(Expecting property name enclosed in "
                                            rf"double quotes at column 20\)"):
        load_split(str(bad), "train")
    empty = tmp_path / "empty.jsonl"
    for text in ("", "\n  \n\n"):
        empty.write_text(text)
        with pytest.raises(DataFileError, match=f"{empty} holds no rows"):
            load_split(str(empty), "train")
    latin = tmp_path / "prompts_train.jsonl"
    latin.write_bytes(("\n".join(rows[:2] + ['{"prompt": "café"}']) + "\n").encode("latin-1"))
    with pytest.raises(DataFileError, match=rf"{latin} line 3: not UTF-8 \(byte 0xe9"):
        load_split(str(tmp_path), "train", "prompts")  # the folder layout is checked the same way
    with pytest.raises(DataFileError, match=rf"{latin} line 3: not UTF-8"):
        load_split(str(tmp_path), "train", "prompts", streaming=True)
    array = tmp_path / "array.jsonl"
    array.write_text(rows[0] + "\n[1, 2]\n")
    with pytest.raises(DataFileError, match=rf"{array} line 2: an array, not a JSON object"):
        jsonl_rows(array)


def test_a_utf8_bom_and_blank_lines_are_still_accepted(tmp_path):
    rows = [json.dumps({"prompt": f"say something {i}"}) for i in range(5)]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + ("\n".join(rows[:2] + ["", "   "] + rows[2:]) + "\n\n").encode())
    assert jsonl_rows(path) == 5
    dataset = load_split(str(path), "train")
    assert len(dataset) == 5 and dataset.column_names == ["prompt"] and dataset[0]["prompt"] == "say something 0"


# -- checked before the model loads ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, says", [
    ({"aggregation": "meann"}, "aggregation: Unknown aggregation 'meann'. Valid names: "),  # + what other tests registered
    ({"kl_controller": "hardd"}, "kl_controller: Unknown kl_controller 'hardd'. Valid names: "),
    ({"kl_estimator": "k4"}, "kl_estimator: Unknown kl_estimator 'k4'. Valid names: "),
    ({"shapers": ["lenght"]}, "shapers: Unknown shaper 'lenght'. Valid names: "),
    ({"monitor_detectors": ["lenght_drift"]}, "monitor_detectors: Unknown detector 'lenght_drift'. Valid names: "),
    ({"aggregation": "uwo", "aggregation_kwargs": {"lamda": 1.0}},
     "aggregation: Bad arguments for aggregation 'uwo': UncertaintyWeighted.__init__() got an unexpected keyword "
     "argument 'lamda'"),
    ({"shapers": [{"name": "linear", "alpah": 0.05}]}, "shapers: Bad arguments for shaper 'linear'"),
    ({"shapers": [{"name": "linear", "alpha": -5}]}, "shapers: The 'linear' shaper's alpha=-5 is negative"),
    ({"shapers": [{"alpha": 0.1}]}, "shapers: an entry has no 'name'"),
    ({"kl_controller_kwargs": {"horizon": 10}}, "kl_controller: Bad arguments for kl_controller 'hard'"),
])
def test_plugin_names_and_keywords_are_checked_before_the_model_loads(capsys, tmp_path, tiny_path, data,
                                                                      no_model_loads, fields, says):
    line = recipe_error(capsys, "ppo", ["--config", config(tmp_path, "ppo", tiny_path, data, **fields)])
    assert f"ppo.py: error: {says}" in line or f"error: {says}" in line, line
    if "Unknown" in says:  # the built-in names are listed (other tests in this process may have added their own)
        builtin = {"aggregation": "mean, median, min", "kl_controller": "adaptive, fixed, hard",
                   "kl_estimator": "k1, k2, k3"}.get(says.split(":")[0])
        assert builtin is None or all(name in line for name in builtin.split(", ")), line


@pytest.mark.parametrize("recipe", ["ppo", "reward"])
def test_a_config_without_dataset_name_or_with_a_tracker_not_installed_is_one_line(capsys, tmp_path, tiny_path, data,
                                                                                  no_model_loads, recipe):
    """No dataset_name: a traceback (`'NoneType' object has no attribute 'startswith'`). report_to a tracker that is
    not installed: transformers' RuntimeError as a traceback, after the model had loaded."""
    path = config(tmp_path, recipe, tiny_path, data)
    settings = yaml.safe_load(path.read_text())
    del settings["dataset_name"]
    path.write_text(yaml.safe_dump(settings))
    line = recipe_error(capsys, recipe, ["--config", path])
    assert "Set dataset_name: a Hub dataset id, a folder of <config>_<split>.jsonl files" in line
    line = recipe_error(capsys, recipe, ["--config", config(tmp_path, recipe, tiny_path, data, report_to=["wandb"])])
    assert "report_to ['wandb']:" in line and "Install it, or set report_to to another tracker or none" in line


@pytest.mark.parametrize("recipe", ["ppo", "reward"])
def test_a_resume_folder_that_is_not_there_is_refused_before_the_model_loads(capsys, tmp_path, tiny_path, data,
                                                                             no_model_loads, recipe):
    out = tmp_path / f"out-{recipe}"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-10").mkdir()
    path = config(tmp_path, recipe, tiny_path, data)
    line = recipe_error(capsys, recipe, ["--config", path, "--resume_from_checkpoint", out / "checkpoint-9"])
    assert f"resume_from_checkpoint '{out / 'checkpoint-9'}': no such folder" in line
    assert f"{out} holds checkpoint-2, checkpoint-10: pass one of those, or true for the newest" in line
    line = recipe_error(capsys, recipe, ["--config", path, "--resume_from_checkpoint", "true",
                                         "--output_dir", tmp_path / "fresh"])
    assert f"resume_from_checkpoint true: nothing to resume; {tmp_path / 'fresh'} holds no checkpoint-N folder" in line


@pytest.mark.parametrize("content, says", [
    (None, "extra_preferences: no file {f} (relative paths are read from"),
    ("", "extra_preferences: {f} holds no preference pairs yet"),
    ('{"chosen": "a"\n', "extra_preferences: {f} line 1: not valid JSON (Expecting ',' delimiter at column 15)"),
])
def test_extra_preference_files_are_checked_before_the_model_loads(capsys, tmp_path, tiny_path, data, no_model_loads,
                                                                   content, says):
    f = tmp_path / "review" / "preferences.jsonl"
    if content is not None:
        f.parent.mkdir()
        f.write_text(content)
    path = config(tmp_path, "reward", tiny_path, data, extra_preferences=[str(f)])
    assert says.format(f=f) in recipe_error(capsys, "reward", ["--config", path])


def test_the_reward_recipes_test_split_may_be_missing_but_not_broken(capsys, tmp_path, tiny_path, data, monkeypatch):
    """The held-out pairs are optional (no `preferences_test.jsonl`: no evaluation); a test file that is there but
    malformed was skipped as silently as a missing one."""
    import recipes.reward_modeling as reward_recipe

    class Stop(Exception):
        pass

    def trainer(*a, eval_dataset, **k):
        raise Stop(eval_dataset)

    monkeypatch.setattr(reward_recipe, "RewardEnsembleTrainer", trainer)
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "preferences_train.jsonl").write_text((data / "preferences_train.jsonl").read_text())
    module, cls = module_and_class("reward")
    path = config(tmp_path, "reward", tiny_path, data, dataset_name=str(folder))
    with pytest.raises(Stop) as stop:
        run(module.main, cls, ["--config", str(path)])
    assert stop.value.args[0] is None
    (folder / "preferences_test.jsonl").write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": \n')
    line = recipe_error(capsys, "reward", ["--config", path])
    assert f"{folder / 'preferences_test.jsonl'} line 2: not valid JSON" in line


def test_a_causal_lm_given_as_the_reward_model_is_refused_before_the_policy_loads(capsys, tmp_path, tiny_path, data,
                                                                                  no_model_loads, seq_cls_reward):
    """PPO trained against a randomly initialised score head (only transformers' load report said `score.weight
    MISSING`)."""
    path = config(tmp_path, "ppo", tiny_path, data, reward_model_path=tiny_path)
    line = recipe_error(capsys, "ppo", ["--config", path])
    assert f"reward_model_path '{tiny_path}' holds a LlamaForCausalLM (its config.json's `architectures`), not a " \
           f"reward model" in line and "`rlhf-ext reward`" in line and "sequence-classification" in line
    assert non_reward_architecture(tiny_path) == "LlamaForCausalLM"
    assert non_reward_architecture(seq_cls_reward) is None  # a reward model as trl.RewardTrainer saves one
    assert non_reward_architecture(tmp_path / "rm") is None  # config.json without `architectures`: loading decides


def test_ppo_on_preference_pairs_says_only_the_prompts_are_used(tmp_path, tiny_path, data, monkeypatch):
    import recipes.ppo as ppo_recipe

    class Stop(Exception):
        pass

    def trainer(*a, train_dataset, **k):
        raise Stop(train_dataset.column_names)

    monkeypatch.setattr(ppo_recipe, "PPOTrainer", trainer)
    module, cls = module_and_class("ppo")
    path = config(tmp_path, "ppo", tiny_path, data, dataset_config="preferences")
    with pytest.warns(UserWarning, match=r"The PPO dataset holds preference pairs \(chosen, rejected columns\): PPO "
                                         r"uses only their prompts") as seen, pytest.raises(Stop):
        run(module.main, cls, ["--config", str(path)])
    assert len([w for w in seen if "preference pairs" in str(w.message)]) == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Stop):  # prompt-only data: nothing to say
            run(module.main, cls, ["--config", str(config(tmp_path, "ppo", tiny_path, data))])


# -- the setup phase: one line until training begins, a traceback after ------------------------------------------------
class StubTrainer:
    """Stands in for a trainer: `fail_in` ("init", "resume", "step") says where it raises `error`."""

    def __init__(self, error: BaseException, fail_in: str):
        from transformers import TrainerControl, TrainerState
        from transformers.trainer_callback import CallbackHandler

        self.error, self.fail_in = error, fail_in
        self.callback_handler = CallbackHandler([], None, None, None, None)
        self.args, self.state, self.control = None, TrainerState(), TrainerControl()
        if fail_in == "init":
            raise error

    def train(self):
        if self.fail_in == "resume":
            raise self.error
        self.callback_handler.on_train_begin(self.args, self.state, self.control)
        raise self.error


@pytest.mark.parametrize("error", [ValueError("bad data"), TypeError("bad argument"), FileNotFoundError("no file"),
                                   CorruptFileError("ckpt/heads.safetensors", "truncated", "Resume from another.")])
@pytest.mark.parametrize("fail_in", ["init", "resume"])
def test_setup_errors_become_recipe_input_errors(error, fail_in):
    with pytest.raises(RecipeInputError, match=str(error).split(":")[0]) as caught:
        with setup_phase() as setup:
            setup.watch(StubTrainer(error, fail_in)).train()
    assert caught.value.__cause__ is error


@pytest.mark.parametrize("error", [ValueError("a bug"), TypeError("a bug"), KeyError("a bug")])
def test_errors_once_training_has_begun_keep_their_traceback(error):
    with pytest.raises(type(error)) as caught:
        with setup_phase() as setup:
            setup.watch(StubTrainer(error, "step")).train()
    assert caught.value is error


def test_only_a_key_error_from_datasets_is_the_inputs():
    with pytest.raises(RecipeInputError, match="promt"):
        with setup_phase():
            Dataset.from_dict({"prompt": ["hello"]})["promt"]
    with pytest.raises(KeyError):  # our own lookup: a bug
        with setup_phase():
            {}["promt"]


def test_a_damaged_checkpoint_to_resume_is_one_line(capsys, tmp_path, tiny_path, data, seq_cls_reward):
    """rlhf_ext.integrity's CorruptFileError, raised by the real trainer while it resumes, was a traceback."""
    path = config(tmp_path, "ppo", tiny_path, data, reward_model_path=seq_cls_reward, save_strategy="steps",
                  save_steps=1)
    module, cls = module_and_class("ppo")
    run(module.main, cls, ["--config", str(path)])
    adapter = tmp_path / "out-ppo" / "checkpoint-1" / "adapters" / "policy" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    line = recipe_error(capsys, "ppo", ["--config", path, "--max_steps", "2", "--resume_from_checkpoint",
                                        adapter.parents[2]])
    assert f"{adapter}: truncated or resized" in line


@pytest.mark.parametrize("recipe", ["ppo", "reward"])
def test_an_error_in_a_real_training_step_keeps_its_traceback(tmp_path, tiny_path, data, seq_cls_reward, monkeypatch,
                                                              recipe):
    """The trainers mark the start of training (on_train_begin) before their first step, so what fails in a step —
    a bug — is not reported as a bad input."""
    cls, method = (PPOTrainer, "_iteration") if recipe == "ppo" else (RewardEnsembleTrainer, "training_step")

    def step(self, *a, **k):
        raise ValueError("a bug in a training step")

    monkeypatch.setattr(cls, method, step)
    fields = {"reward_model_path": seq_cls_reward} if recipe == "ppo" else {}
    module, config_cls = module_and_class(recipe)
    with pytest.raises(ValueError, match="a bug in a training step"):
        run(module.main, config_cls, ["--config", str(config(tmp_path, recipe, tiny_path, data, **fields))])


def test_an_output_dir_another_run_holds_is_one_line(tmp_path, tiny_path, data):
    """The lock's refusal (another training run in output_dir) was a full traceback per process: a RuntimeError the
    recipes did not turn into their one-line error."""
    from rlhf_ext.integrity import output_dir_lock

    path = config(tmp_path, "reward", tiny_path, data)
    with output_dir_lock(tmp_path / "out-reward"):  # this test process is "the other run"
        line = assert_one_line_exit_2(cli(["reward", "--config", path], tmp_path), "rlhf-ext reward")
    assert "another" in line.lower() and str(__import__("os").getpid()) in line


# -- the data files users bring: compressed, a Hub download's folder, save_to_disk, broken JSON / CSV ---------------
TEXT_PAIRS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)]


def test_compressed_files_and_saved_or_downloaded_folders_load_their_splits(tmp_path):
    """`datasets` reads each of these; they were refused ("no such file", "No 'train.jsonl'"): a .jsonl.gz, a folder as
    `hf download --repo-type dataset` lays it out (data/train-…parquet, data/test-…), and save_to_disk folders of a
    Dataset and a DatasetDict — a split a folder lacks is named with the ones it has."""
    import gzip

    from datasets import DatasetDict

    rows = [r["chosen"] for r in TEXT_PAIRS]
    gz = tmp_path / "pairs.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in TEXT_PAIRS).encode()))
    assert load_split(str(gz), "train")["chosen"] == rows
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    Dataset.from_list(TEXT_PAIRS[:4]).to_parquet(hub / "train-00000-of-00001.parquet")
    Dataset.from_list(TEXT_PAIRS[4:]).to_parquet(hub / "test-00000-of-00001.parquet")
    assert load_split(str(hub.parent), "train")["chosen"] == rows[:4]
    assert load_split(str(hub.parent), "test")["chosen"] == rows[4:]
    Dataset.from_list(TEXT_PAIRS).save_to_disk(tmp_path / "one")
    assert load_split(str(tmp_path / "one"), "train")["chosen"] == rows
    with pytest.raises(FileNotFoundError, match="one saved Dataset, the 'train' split only"):
        load_split(str(tmp_path / "one"), "test")
    DatasetDict(train=Dataset.from_list(TEXT_PAIRS[:4]), validation=Dataset.from_list(TEXT_PAIRS[4:])).save_to_disk(
        tmp_path / "dict")
    assert load_split(str(tmp_path / "dict"), "validation")["chosen"] == rows[4:]
    with pytest.raises(FileNotFoundError, match=r"no 'test' split; it has \['train', 'validation'\]"):
        load_split(str(tmp_path / "dict"), "test")


@pytest.mark.parametrize("name, content, says", [
    ("bad.json", '[{"prompt": "a"},]', "could not be read as JSON"),
    ("empty.json", "", "could not be read as JSON"),
    ("ragged.csv", 'prompt\n"a"\n"b","c","d"\n', "could not be read as CSV"),
    ("empty.csv", "", "could not be read as CSV"),
    ("columns.json", '{"prompt": ["a", "b"], "chosen": ["c", "d"]}', "one JSON object of columns"),
    ("chat.csv", "prompt\n\"[{'role': 'user', 'content': 'hi'}]\"\n", "a CSV cannot hold lists"),
], ids=["bad.json", "empty.json", "ragged.csv", "empty.csv", "columns.json", "chat.csv"])
def test_a_json_or_csv_file_that_cannot_be_trained_on_names_the_file(tmp_path, name, content, says):
    """Tracebacks before (DatasetGenerationError, a bare StopIteration), a JSON object of columns read as one row and
    named as a bad row, and chat messages in a CSV trained as their Python text."""
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(DataFileError, match=says) as e:
        load_split(str(f), "train")
    assert str(f) in str(e.value)


def test_json_rows_of_token_ids_and_a_downloaded_folders_configs_load(tmp_path):
    """Rows whose values are lists — pre-tokenised `input_ids`, `chosen_ids` — are rows, streamed or not (the
    one-object-of-columns check took them for columns); a downloaded folder whose README declares configs is read
    with the recipe's `dataset_config`, as a Hub id is."""
    rows = tmp_path / "ids.json"
    rows.write_text(json.dumps([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}]))
    one = tmp_path / "one.json"
    one.write_text(json.dumps([{"chosen_ids": [1, 2], "rejected_ids": [3, 4]}]))
    for streaming in (False, True):
        assert [r["input_ids"] for r in load_split(str(rows), "train", streaming=streaming)] == [[1, 2, 3], [4, 5]]
        assert [r["chosen_ids"] for r in load_split(str(one), "train", streaming=streaming)] == [[1, 2]]
    hub = tmp_path / "hub"
    for config, text in (("prompts", "p"), ("preferences", "q")):
        (hub / config).mkdir(parents=True)
        Dataset.from_list([{"prompt": f"{text}{i}"} for i in range(3)]).to_parquet(
            hub / config / "train-00000-of-00001.parquet")
    (hub / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train-*\n"
        for c in ("prompts", "preferences")) + "---\n")
    assert load_split(str(hub), "train", "preferences")["prompt"] == ["q0", "q1", "q2"]
    assert load_split(str(hub), "train", "prompts")["prompt"] == ["p0", "p1", "p2"]


def test_preference_rows_mixing_text_and_chat_messages_are_named(tmp_path):
    """One column both text and chat messages: TRL's own preprocessing failed with an AttributeError traceback."""
    from rlhf_ext.reward.preference_data import validate_preference_dataset

    rows = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in TEXT_PAIRS]
    rows[3] = {c: [{"role": "user", "content": "q3"}, {"role": "assistant", "content": rows[3][c]}]
               for c in ("chosen", "rejected")}
    f = tmp_path / "mixed.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"row 3: 'chosen' is a list of chat messages, but row 0's is text"):
        validate_preference_dataset(load_split(str(f), "train"))


def test_a_prompt_that_is_a_list_of_strings_is_named(tmp_path, tok):
    from rlhf_ext.data import tokenize_prompts

    with pytest.raises(ValueError, match=r"Prompt 0 is a list \(\['a'\]\), not text"):  # AttributeError before
        tokenize_prompts(Dataset.from_dict({"prompt": [["a"], ["b", "c"]]}), tok, 64)


def test_the_reward_recipe_asked_to_evaluate_needs_its_test_split(capsys, tmp_path, tiny_path, data, no_model_loads):
    """eval_strategy set and no test split: transformers' "you didn't pass an eval_dataset" came after the model loaded,
    naming neither the split nor the file it was looked for in."""
    path = config(tmp_path, "reward", tiny_path, data, dataset_name=str(data / "preferences_train.jsonl"),
                  eval_strategy="steps", eval_steps=1)
    assert "is one file, the 'train' split only: there is no 'test' split" in recipe_error(capsys, "reward",
                                                                                         ["--config", path])


def test_a_text_prompt_with_whole_conversations_as_responses_says_to_drop_the_prompt():
    """HuggingFaceH4/ultrafeedback_binarized's shape: `prompt` text, `chosen`/`rejected` whole conversations. TRL's
    tokenisation failed on it with a bare AttributeError (`'list' object has no attribute 'endswith'`)."""
    from rlhf_ext.reward.preference_data import validate_preference_dataset

    turn = lambda reply: [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]  # noqa: E731
    rows = Dataset.from_list([{"prompt": "hi", "chosen": turn("hello"), "rejected": turn("go away")}])
    with pytest.raises(ValueError, match=r"row 0: 'prompt' is text but 'chosen' is a list of chat messages.*"
                                         r"remove_columns\('prompt'\)"):
        validate_preference_dataset(rows)


def test_measuring_the_prompts_takes_dataset_num_proc(tok):
    """The prompts' token counts (the length de-correlation reads them) over `dataset_num_proc` processes, as TRL
    spreads its own maps: the same counts as one process."""
    from rlhf_ext.reward.preference_data import with_prompt_length

    rows = Dataset.from_list([{"prompt": [{"role": "user", "content": "word " * (i + 1)}],
                               "chosen": [{"role": "assistant", "content": "a"}],
                               "rejected": [{"role": "assistant", "content": "b"}]} for i in range(8)])
    one = with_prompt_length(rows, tok)["prompt_length"]
    assert with_prompt_length(rows, tok, num_proc=2)["prompt_length"] == one and len(set(one)) == 8


def test_audit_model_paths_are_checked_like_reward_model_path(capsys, tmp_path, tiny_path, data, no_model_loads):
    """An audit judge's path is read beside the config as reward_model_path is, and a wrong one is named by its
    setting before the policy loads."""
    line = recipe_error(capsys, "ppo", ["--config", config(tmp_path, "ppo", tiny_path, data,
                                                           audit_model_paths=["./no_such_judge"])])
    assert "error: audit_model_paths './no_such_judge': no such folder" in line, line
    (tmp_path / "judge").mkdir()  # beside the config: found there, then refused for holding no model
    line = recipe_error(capsys, "ppo", ["--config", config(tmp_path, "ppo", tiny_path, data, audit_model_paths="judge")])
    assert f"error: audit_model_paths '{tmp_path / 'judge'}' is a folder but holds no reward model" in line, line
