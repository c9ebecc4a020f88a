"""report_to="tensorboard" (a dev dependency, so these run in CI): what lands in the tracker is the log history, step for
step, through a resume in a later session; the config's lists and dicts reach its `args` text; the reward trainer
writes every tag trl.RewardTrainer writes."""
import json
from pathlib import Path

import pytest
from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import PPOConfig, PPOTrainer, RewardEnsembleConfig, RewardEnsembleTrainer
from rlhf_ext.testing import tiny_causal_lm

from .conftest import preference_rows
from .test_ppo import good_counter, prompts

LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


def ppo(out, tok, max_steps, report_to, **kw):
    kw = dict(eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=1) | kw
    args = PPOConfig(str(out), per_device_train_batch_size=4, max_steps=max_steps, learning_rate=3e-2,
                     max_completion_length=8, kl_controller="fixed", init_kl_coef=0.01, use_cpu=True,
                     disable_tqdm=True, logging_steps=1, seed=0, report_to=report_to, per_device_eval_batch_size=4,
                     shapers=[{"name": "linear", "alpha": 0.02, "free_tokens": 4}, "missing_eos"],
                     monitor_detectors=["length_drift", {"name": "repetition", "action": "log"}], **kw)
    return PPOTrainer(tiny_causal_lm(tok), reward_funcs=good_counter(tok), args=args, train_dataset=prompts(16),
                      eval_dataset=prompts(4), processing_class=tok, peft_config=LoraConfig(**LORA))


def tensorboard_scalars(out) -> tuple[dict, dict]:
    """{tag: [(step, value), …]} over every event file under out/runs, and the `args` text of the first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    scalars, args = {}, None
    for f in sorted(Path(out, "runs").rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        ea = EventAccumulator(str(f), size_guidance={"scalars": 0, "tensors": 0})
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in ea.Scalars(tag))
        if args is None and "args/text_summary" in ea.Tags()["tensors"]:
            args = json.loads(make_ndarray(ea.Tensors("args/text_summary")[0].tensor_proto).item().decode())
    return scalars, args


def expected(log_history, first_step=1) -> dict:
    """The tensorboard tags transformers' TensorBoardCallback writes for a log history (train/…, eval/…)."""
    out = {}
    for entry in log_history:
        if entry["step"] < first_step:
            continue
        for k, v in entry.items():
            if k == "step" or isinstance(v, str):
                continue
            tag = "eval/" + k[5:] if k.startswith("eval_") else "train/" + k
            out.setdefault(tag, []).append((entry["step"], v))
    return out


def test_ppo_tensorboard_holds_every_iteration_and_continues_on_resume(tmp_path, tok):
    out = tmp_path / "ppo"
    tr = ppo(out, tok, 3, "tensorboard")
    tr.train()
    first = [dict(e) for e in tr.state.log_history]
    tr = ppo(out, tok, 5, "tensorboard")  # a later session: resumes from checkpoint-3
    tr.train(resume_from_checkpoint=True)
    scalars, args = tensorboard_scalars(out)
    want = expected(first)  # the first session's history (its closing log included), then the second's own steps
    for tag, points in expected(tr.state.log_history, first_step=4).items():
        want.setdefault(tag, []).extend(points)
    for tag, points in want.items():
        got = scalars.get(tag)
        assert got is not None, tag
        assert [s for s, _ in got] == [s for s, _ in points], tag  # once per step: no restart at 0, no repeat
        assert [v for _, v in got] == pytest.approx([v for _, v in points], nan_ok=True), tag
    assert set(scalars) == set(want)
    steps = [s for s, _ in scalars["train/objective/kl"]]
    assert steps == [1, 2, 3, 4, 5]
    assert [s for s, _ in scalars["eval/kl"]] == [2, 3, 4, 5]  # eval_steps=2, and at the end of each session
    assert args["shapers"][1] == "missing_eos" and args["monitor_detectors"][1]["action"] == "log"


def test_reward_tensorboard_has_every_tag_trl_reward_trainer_writes(tmp_path, tok, tiny_path):
    """Both trainers on the same data and settings, each with report_to="tensorboard": every tag trl.RewardTrainer
    writes, ours writes too, at the same steps (ours adds its ensemble's metrics)."""
    from trl import RewardConfig, RewardTrainer

    common = dict(max_steps=3, per_device_train_batch_size=8, per_device_eval_batch_size=8, use_cpu=True, bf16=False,
                  disable_tqdm=True, logging_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="no",
                  report_to="tensorboard", learning_rate=3e-3, gradient_checkpointing=False, seed=0)
    data = dict(train_dataset=Dataset.from_list(preference_rows(32, 0)),
                eval_dataset=Dataset.from_list(preference_rows(8, 1)), processing_class=tok,
                peft_config=LoraConfig(**LORA))
    RewardTrainer(tiny_path, args=RewardConfig(str(tmp_path / "trl"), **common), **data).train()
    RewardEnsembleTrainer(tiny_path, args=RewardEnsembleConfig(str(tmp_path / "ours"), ensemble_size=2,
                                                              normalization_samples=32, **common), **data).train()
    theirs, _ = tensorboard_scalars(tmp_path / "trl")
    ours, cfg = tensorboard_scalars(tmp_path / "ours")
    assert {"train/loss", "eval/loss", "train/accuracy", "eval/accuracy"} <= set(theirs)
    assert set(theirs) <= set(ours), set(theirs) - set(ours)
    for tag, points in theirs.items():
        assert [s for s, _ in ours[tag]] == [s for s, _ in points], tag
    assert cfg["ensemble_size"] == 2


def test_the_recipes_take_a_comma_list_and_name_an_unknown_tracker():
    """`--report_to tensorboard,trackio` on a recipe's command line is the list a YAML list gives (it was one unknown
    name); a name transformers has no integration for is named as such, not "install it"."""
    from types import SimpleNamespace

    from rlhf_ext.recipes import RecipeInputError, check_report_to

    args = SimpleNamespace(report_to=["tensorboard, none"])
    check_report_to(args)
    assert args.report_to == ["tensorboard", "none"]
    with pytest.raises(RecipeInputError, match=r"nosuch.*Give the names as listed") as e:
        check_report_to(SimpleNamespace(report_to=["tensorboard,nosuch"]))
    assert "Install it" not in str(e.value)
    with pytest.raises(RecipeInputError, match="report_to"):  # `report_to: null` in a YAML: named, as before
        check_report_to(SimpleNamespace(report_to=[None]))


def test_the_policy_card_links_the_run_it_was_logged_to(tmp_path, tok, monkeypatch):
    """As trl's cards do: the Trackio Space (or Weights & Biases / Comet run) the training logged to; none offline."""
    import trl.trainer.utils as trl_utils

    tr = ppo(tmp_path / "ppo", tok, 1, "none", save_strategy="no", eval_strategy="no")
    tr.train()
    tr.save_model(str(tmp_path / "plain"))
    assert "Logged to" not in (tmp_path / "plain" / "README.md").read_text()
    url = "https://huggingface.co/spaces/someone/trackio"
    monkeypatch.setattr(trl_utils, "get_trackio_space_url", lambda: url)
    tr.save_model(str(tmp_path / "tracked"))
    assert f"Logged to Trackio: {url}" in (tmp_path / "tracked" / "README.md").read_text()
