"""Coming from TRL 1.12's PPO: its example script (trl/examples/scripts/ppo/ppo.py, shape kept line for line), changed
only in the import and the lines the README's migration table names, trains. Models are tiny and built in code
(saved to folders so `from_pretrained` runs as in the script); no network."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel

from rlhf_ext.testing import save_tiny_model, tiny_config, tiny_tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("trl112")
    tok = tiny_tokenizer()
    sft = save_tiny_model(root / "sft", tok)
    torch.manual_seed(1)
    rm = LlamaForSequenceClassification(tiny_config(tok, num_labels=1))
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return {"sft": sft, "rm": str(root / "rm"), "out": str(root / "out")}


def test_trl112_ppo_script_migrated_by_the_table(folders):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_ext import PPOConfig, PPOTrainer  # table: was `from trl.experimental.ppo import PPOConfig, PPOTrainer`

    training_args = PPOConfig(
        output_dir=folders["out"], per_device_train_batch_size=4, num_ppo_epochs=2, num_mini_batches=1,
        learning_rate=3e-3, total_episodes=8, response_length=8, kl_coef=0.05, cliprange=0.2, cliprange_value=0.2,
        stop_token="eos", missing_eos_penalty=1.0, use_cpu=True, save_strategy="no", report_to="none",
        disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(folders["sft"], padding_side="left")
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})  # as TRL's example: never resized
    value_model = AutoModelForSequenceClassification.from_pretrained(folders["rm"], num_labels=1)  # noqa: F841
    reward_model = AutoModelForSequenceClassification.from_pretrained(folders["rm"], num_labels=1)
    policy = AutoModelForCausalLM.from_pretrained(folders["sft"])
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    ref_policy = None  # noqa: F841  (with peft_config TRL 1.12 took None too)

    dataset = Dataset.from_dict({"prompt": [f"write a short review of the {w} ." for w in
                                            "movie book song film food place day night".split() * 2]})
    eval_dataset = dataset.select(range(4))

    def prepare_dataset(dataset, tokenizer):
        def tokenize(element):
            outputs = tokenizer(element["prompt"], padding=False)
            return {"input_ids": outputs["input_ids"]}

        return dataset.map(tokenize, batched=True, remove_columns=dataset.column_names,
                           num_proc=training_args.dataset_num_proc)  # TRL's field: PPOConfig has it too

    train_dataset = prepare_dataset(dataset, tokenizer)
    eval_dataset = prepare_dataset(eval_dataset, tokenizer)

    trainer = PPOTrainer(
        args=training_args,
        processing_class=tokenizer,
        model=policy,
        # ref_model=ref_policy,       table: delete (the reference is the base with adapters off)
        reward_model=reward_model,
        # value_model=value_model,    table: delete (the critic is a value head on the policy)
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
    )
    before = {n: p.detach().clone() for n, p in trainer.policy.peft.named_parameters() if "lora_B" in n}
    hist = trainer.train()
    trainer.save_model(training_args.output_dir)

    assert len(hist) == 2  # total_episodes 8 / 4 prompts per iteration
    assert training_args.max_completion_length == 8 and training_args.clip_range == 0.2
    assert training_args.init_kl_coef == 0.05
    assert {"name": "missing_eos", "penalty": 1.0} in training_args.shapers
    assert all(torch.isfinite(torch.tensor(h["objective/scores"])) for h in hist)
    moved = [n for n, p in trainer.policy.peft.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert len(moved) == len(before)  # every LoRA-B of the policy trained
    assert trainer.eval_dataset is eval_dataset
    base = AutoModelForCausalLM.from_pretrained(folders["sft"])
    assert isinstance(PeftModel.from_pretrained(base, training_args.output_dir), PeftModel)


@pytest.mark.parametrize("kw, says", [
    ({"ref_model": "copy"}, "`ref_model` is not used: the reference policy is the policy's own base"),
    ({"value_model": "copy"}, "`value_model` is not used: the critic is a value head"),
    ({"data_collator": lambda x: x}, "`data_collator` is not used"),
    ({"optimizers": ("adam", None)}, "`optimizers` is not supported"),
])
def test_trl112_arguments_without_a_counterpart_say_what_replaced_them(folders, kw, says, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf_ext import PPOConfig, PPOTrainer

    kw = {k: (AutoModelForCausalLM.from_pretrained(folders["sft"]) if v == "copy" else v) for k, v in kw.items()}
    with pytest.raises(ValueError, match=says):
        PPOTrainer(model=folders["sft"], reward_funcs=lambda completions, **k: [0.0] * len(completions),
                   args=PPOConfig(str(tmp_path), use_cpu=True), train_dataset=Dataset.from_dict({"prompt": ["a"] * 8}),
                   **kw)


def test_trl112_config_names_conflicting_with_ours_are_refused(tmp_path):
    from rlhf_ext import PPOConfig

    with pytest.warns(FutureWarning, match="`cliprange` is TRL 1.12's name"):
        assert PPOConfig(str(tmp_path), cliprange=0.3).clip_range == 0.3
    with pytest.raises(ValueError, match="Both `response_length`.*keep `max_completion_length`"):
        PPOConfig(str(tmp_path), response_length=10, max_completion_length=20)
    with pytest.raises(ValueError, match="stop_token='<stop>'.*eos_token"):
        PPOConfig(str(tmp_path), stop_token="<stop>")


@pytest.mark.parametrize("field, fix", [
    ("sft_model_path", "the model you pass to PPOTrainer \\(a recipe's model_name_or_path\\)"),
    ("local_rollout_forward_batch_size", "nothing: the rollout's passes run this process's batch at once; lower "
                                         "per_device_train_batch_size for memory"),
    ("num_sample_generations", "eval_dataset with eval_strategy"),
    ("stop_token_id", "add that id to the model's generation_config.eos_token_id"),
    ("whiten_rewards", "callable_normalization='running' to put the rewards on one scale"),
    ("ref_adapter_name", "nothing: the reference is the base with every adapter off"),
    ("ds3_gather_for_generation", "nothing: DeepSpeed is not supported"),
    ("local_mini_batch_size", "delete it: TRL computed it from the others"),  # in a config saved by a TRL 1.12 run
    ("world_size", "delete it: TRL computed it from the others"),
])
def test_trl112_fields_without_a_counterpart_are_refused_with_the_replacement(tmp_path, field, fix):
    """Python's bare "unexpected keyword argument" before; now the field, where it comes from, what to use."""
    from rlhf_ext import PPOConfig

    with pytest.raises(TypeError, match=f"`{field}` \\(TRL 1.12 PPO\\) → {fix}"):
        PPOConfig(str(tmp_path), use_cpu=True, **{field: 1})


def test_a_trl112_config_is_told_what_its_settings_mean_here(tmp_path):
    """A config written with TRL 1.12's names runs, but some of its settings mean something else here: one warning
    names each that applies, with the setting that keeps TRL 1.12's behaviour (before: none, and a migrated script
    sampled and stepped differently). Batch sizes need no note: TRL 1.12 (trl==1.12.0, run on a tiny model with
    per_device_train_batch_size=4, num_mini_batches=2) sampled 4 prompts per iteration and took 2 optimizer steps per
    epoch, as the same numbers do here; its rollout was per_device_train_batch_size × gradient_accumulation_steps,
    which the refusal of gradient_accumulation_steps > 1 names, and its iterations ⌈total_episodes / rollout⌉."""
    import math

    from rlhf_ext import PPOConfig

    with pytest.warns(UserWarning, match="TRL 1.12 PPO names") as caught:
        cfg = PPOConfig(str(tmp_path), use_cpu=True, per_device_train_batch_size=2, num_mini_batches=2,
                        total_episodes=8, kl_estimator="k3")
    text = str(caught[0].message)
    for says in ("the reward penalty −β·KL is always k1", "temperature=0.7", "TRL 1.12: 53", "stop_on_eos=False"):
        assert says in text, says
    assert "per_device_train_batch_size" not in text  # the same meaning as TRL 1.12's (a wrong note said b × n)
    b, g, n, episodes = 2, 3, 2, 10  # TRL 1.12: rollout b × g per process, n minibatches, ⌈episodes / rollout⌉
    with pytest.raises(ValueError, match=f"set per_device_train_batch_size={b * g} and keep num_mini_batches"):
        PPOConfig(str(tmp_path), use_cpu=True, per_device_train_batch_size=b, gradient_accumulation_steps=g,
                  num_mini_batches=n, total_episodes=episodes, temperature=0.7)
    ours = PPOConfig(str(tmp_path), use_cpu=True, per_device_train_batch_size=b * g, num_mini_batches=n,
                     total_episodes=episodes, temperature=0.7)
    assert ours.max_steps == math.ceil(episodes / (b * g)) == 2  # rounded up: 12 prompts, never fewer than 10
    with pytest.raises(ValueError, match="total_episodes=0"):
        PPOConfig(str(tmp_path), use_cpu=True, total_episodes=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing left to say: TRL 1.12's behaviour, spelled out
        PPOConfig(str(tmp_path), use_cpu=True, per_device_train_batch_size=4, total_episodes=8, temperature=0.7,
                  response_length=53, stop_token="eos")
        PPOConfig(str(tmp_path), use_cpu=True, num_mini_batches=2, kl_estimator="k3")  # not a TRL 1.12 config
    assert cfg.max_steps == 4


def test_the_ppo_recipe_refuses_them_from_a_yaml_or_the_command_line(tmp_path, monkeypatch, capsys):
    """TRL's parser said only "Some specified arguments are not used by the HfArgumentParser"; the recipe names the
    replacement, for a YAML key and an option alike, and exits 2 (argparse's status) before loading anything."""
    from tests.conftest import rlhf_ext_in_this_process

    config = tmp_path / "ppo.yaml"
    config.write_text("model_name_or_path: no/such-model\noutput_dir: out\nwhiten_rewards: true\n")
    status, err = rlhf_ext_in_this_process(["ppo", "--config", config, "--beta", "0.1"], tmp_path, monkeypatch, capsys)
    assert status == 2, err[-2000:]
    assert "`whiten_rewards` (TRL 1.12 PPO) → callable_normalization='running'" in err
    assert "`beta` (GRPO / RLOO) → the KL settings" in err
    assert "usage:" not in err and not (tmp_path / "out").exists()


def test_every_refused_trl112_field_is_in_the_readme_table():
    from pathlib import Path

    from rlhf_ext.ppo.config import FROM_TRL112

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("### Coming from TRL 1.12's PPO")[1].split("###")[0]
    assert [k for k in FROM_TRL112 if f"`{k}`" not in table] == []
