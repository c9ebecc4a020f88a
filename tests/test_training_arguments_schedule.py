"""More of transformers' TrainingArguments as a Trainer user sets them on PPOConfig: the learning-rate schedule counts
iterations (the guard cannot leave it unfinished), metric-driven schedules step on the evaluation, `max_grad_norm`
≤ 0 means no clipping, `grad_norm` and `num_input_tokens_seen` are logged, the best checkpoint survives
`save_total_limit`, and what PPO cannot honour is refused or named — each checked against an independent
computation or the behaviour of transformers' Trainer."""

from __future__ import annotations

import math
import warnings

import huggingface_hub
import pytest
import torch
from transformers import TrainerCallback

from rlhf_ext import PPOConfig

from .test_ppo import make, prompts


def _params(tr):
    return {n: p.detach().clone() for n, p in tr.policy.peft.named_parameters() if p.requires_grad}


def test_the_schedule_counts_iterations_and_ends_at_max_steps_when_the_guard_cuts_epochs(tmp_path, tok):
    """Linear decay over max_steps iterations, read after each (Trainer's `learning_rate`). With a tight hard-KL
    bound the guard ends epochs early; planned in optimizer steps, the schedule stopped at 0.07 of its rate."""
    hist = make(tmp_path, tok, max_steps=4, learning_rate=0.1, lr_scheduler_type="linear", num_ppo_epochs=4,
                kl_controller="hard", kl_target=1e-4).train()
    assert sum(h["kl/backtracks"] + h["kl/restored"] + h["kl/shrunk"] for h in hist) > 0  # the guard did cut epochs
    assert [h["learning_rate"] for h in hist] == pytest.approx([0.1 * (1 - i / 4) for i in range(1, 5)])


def test_warmup_steps_count_iterations(tmp_path, tok):
    hist = make(tmp_path, tok, max_steps=4, learning_rate=1e-2, lr_scheduler_type="constant_with_warmup",
                warmup_steps=2, num_ppo_epochs=3).train()
    assert [h["learning_rate"] for h in hist] == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2])


def test_reduce_lr_on_plateau_steps_on_the_evaluation_metric(tmp_path, tok):
    """transformers' Trainer steps ReduceLROnPlateau with `metric_for_best_model` after each evaluation (here it
    crashed at the first optimizer step: step() without the metric). patience 0: every evaluation that does not
    beat the best so far halves the rate."""
    tr = make(tmp_path, tok, max_steps=4, learning_rate=1e-2, lr_scheduler_type="reduce_lr_on_plateau",
              lr_scheduler_kwargs={"patience": 0, "factor": 0.5}, eval_strategy="steps", eval_steps=1,
              metric_for_best_model="kl", greater_is_better=False, logging_steps=1, eval_dataset=prompts(4),
              per_device_train_batch_size=8)
    tr.train()
    evals = [h["eval_kl"] for h in tr.state.log_history if "eval_kl" in h]
    rates = [h["learning_rate"] for h in tr.state.log_history if "objective/kl" in h]
    assert len(evals) == 4 and tr.lr_scheduler.best == min(evals)
    lr, best, expected = 1e-2, math.inf, []
    for kl in evals:  # ReduceLROnPlateau(mode="min", patience=0, threshold=1e-4 relative) by hand
        if kl < best * (1 - 1e-4):
            best = kl
        else:
            lr *= 0.5
        expected.append(lr)
    # the rate logged with iteration i is the one set by the evaluations before it
    assert rates == pytest.approx([1e-2] + expected[:-1])


@pytest.mark.parametrize("name", ["loss", "eval_loss"])
def test_a_loss_to_pick_the_best_by_is_refused_at_construction(tmp_path, name):
    with pytest.raises(ValueError, match=r"has no loss.*'kl', 'length', 'eos'"):
        PPOConfig(str(tmp_path), metric_for_best_model=name, eval_strategy="steps")
    with pytest.raises(ValueError, match=r"has no loss"):  # transformers fills in "loss" for the plateau schedule
        PPOConfig(str(tmp_path), lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps")


def test_max_grad_norm_zero_or_negative_means_no_clipping(tmp_path, tok):
    """As in Trainer. -1 passed straight to clip_grad_norm_ rescaled every gradient to norm 1 and flipped it."""
    after = {}
    for norm in (None, 0.0, -1.0):
        tr = make(tmp_path / str(norm), tok, max_steps=1, max_grad_norm=norm, num_ppo_epochs=1)
        tr.train()
        after[norm] = _params(tr)
    for norm in (0.0, -1.0):
        assert all(torch.equal(after[norm][k], after[None][k]) for k in after[None]), norm


def test_grad_norm_is_the_mean_gradient_norm_of_the_iterations_steps(tmp_path, tok):
    """Trainer logs `grad_norm`; here the mean over the iteration's optimizer steps, checked against the norm of
    the gradients the optimizer stepped with (no clipping: max_grad_norm=None)."""
    tr = make(tmp_path, tok, max_steps=2, num_ppo_epochs=3, max_grad_norm=None)
    seen = []

    class Norms(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            def pre_hook(opt, *_):
                grads = [p.grad.double().flatten() for g in opt.param_groups for p in g["params"] if p.grad is not None]
                seen.append(float(torch.cat(grads).norm()))
            tr.optimizer.register_step_pre_hook(pre_hook)

    tr.add_callback(Norms())
    hist = tr.train()
    assert len(seen) == 6
    assert [h["grad_norm"] for h in hist] == pytest.approx([sum(seen[:3]) / 3, sum(seen[3:]) / 3], rel=1e-5)


@pytest.mark.parametrize("mode", ["all", "non_padding"])
def test_num_input_tokens_seen_counts_each_rollout(tmp_path, tok, mode):
    tr = make(tmp_path, tok, max_steps=3, include_num_input_tokens_seen=mode, logging_steps=1)
    counts = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ro = tr.rollout
            counts.append(int(ro.mask.sum()) if mode == "non_padding" else ro.ids.numel())

    tr.add_callback(Count())
    tr.train()
    logged = [h["num_input_tokens_seen"] for h in tr.state.log_history if "objective/kl" in h]
    assert logged == [sum(counts[: i + 1]) for i in range(3)] and logged[-1] > 0
    assert tr.state.log_history[-1]["train_tokens_per_second"] > 0  # the closing summary, as Trainer's


def test_the_best_checkpoint_is_recorded_and_survives_save_total_limit(tmp_path, tok):
    """As in Trainer: state.best_model_checkpoint names the best evaluation's checkpoint, and save_total_limit=1
    keeps it beside the newest. The judge scores the first evaluation highest, so the best is checkpoint-1."""
    calls = []

    def judge(prompts, completions, **kw):
        calls.append(1)
        return [5.0 if len(calls) == 1 else 1.0] * len(completions)

    tr = make(tmp_path, tok, max_steps=3, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
              save_total_limit=1, metric_for_best_model="judge", greater_is_better=True, eval_dataset=prompts(4),
              per_device_train_batch_size=8, audit_funcs=[judge])
    tr.train()
    assert tr.state.best_global_step == 1
    assert tr.state.best_model_checkpoint == str(tmp_path / "ppo" / "checkpoint-1")
    assert sorted(p.name for p in (tmp_path / "ppo").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]


def test_torch_empty_cache_steps_is_honoured(tmp_path, tok, monkeypatch):
    import rlhf_ext.ppo.trainer as trainer_module

    cleared = []
    monkeypatch.setattr(trainer_module, "clear_device_cache", lambda *a, **k: cleared.append(1), raising=False)
    make(tmp_path, tok, max_steps=5, torch_empty_cache_steps=2).train()
    assert len(cleared) == 2  # after iterations 2 and 4


def test_what_ppo_cannot_use_is_refused_or_named(tmp_path):
    with pytest.raises(ValueError, match="use_liger_kernel=True.*Remove use_liger_kernel"):
        PPOConfig(str(tmp_path), use_liger_kernel=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PPOConfig(str(tmp_path), dataloader_num_workers=2, prediction_loss_only=True, save_on_each_node=True)
    said = " ".join(str(w.message) for w in caught)
    assert "dataloader_num_workers=2, prediction_loss_only=True, save_on_each_node=True: no effect in PPOTrainer" in said
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PPOConfig(str(tmp_path))
    assert not [w for w in caught if "no effect in PPOTrainer" in str(w.message)]


def test_get_train_dataloader_says_how_ppo_draws_its_prompts(tmp_path, tok):
    tr = make(tmp_path, tok, max_steps=1)
    with pytest.raises(NotImplementedError, match="no training DataLoader.*trainer.prompts"):
        tr.get_train_dataloader()


def test_create_model_card_writes_ppos_card_and_save_model_keeps_its_metadata(tmp_path, tok):
    tr = make(tmp_path, tok, max_steps=1)
    tr.train()
    tr.create_model_card(model_name="my-policy", tags=["my-tag"], dataset_name="my/prompts")
    card = (tmp_path / "ppo" / "README.md").read_text()
    assert "my-tag" in card and "my/prompts" in card and "# my-policy" in card and "rlhf_ext" in card
    tr.save_model(str(tmp_path / "ppo"))
    card = (tmp_path / "ppo" / "README.md").read_text()
    assert "my-tag" in card and "my/prompts" in card and "# my-policy" in card


def test_the_configs_resume_from_checkpoint_is_named_when_a_new_run_is_refused(tmp_path, tok):
    """transformers' Trainer does not read args.resume_from_checkpoint either; the refusal said to set exactly it."""
    make(tmp_path, tok, max_steps=1, save_strategy="steps", save_steps=1).train()
    with pytest.raises(ValueError, match=r"resume_from_checkpoint=True in the config is not read by train\(\)"):
        make(tmp_path, tok, max_steps=2, resume_from_checkpoint=True).train()


@pytest.mark.parametrize("trainer", ["ppo", "reward"])
def test_push_to_hub_without_network_says_so_at_construction(tmp_path, tok, tiny_path, monkeypatch, trainer):
    def offline(*a, **k):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    if trainer == "ppo":
        build = lambda: make(tmp_path, tok, max_steps=1, push_to_hub=True, hub_model_id="me/policy")  # noqa: E731
    else:
        from datasets import Dataset
        from peft import LoraConfig

        from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer

        from .conftest import preference_rows

        args = RewardEnsembleConfig(str(tmp_path / "rm"), max_steps=1, report_to="none", use_cpu=True,
                                    push_to_hub=True, hub_model_id="me/rm")
        build = lambda: RewardEnsembleTrainer(tiny_path, args=args, processing_class=tok,  # noqa: E731
                                              train_dataset=Dataset.from_list(preference_rows(8, 0)),
                                              peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(OSError, match=r"push_to_hub=True: \w+ could not create or reach the Hub repository "
                                      r"'me/\w+' \(ConnectionError.*Nothing has trained yet.*push_to_hub=False"):
        build()


def test_num_input_tokens_seen_continues_after_a_resume(tmp_path, tok):
    """As Trainer: the count is restored with the checkpoint (a resumed run started again from 0)."""
    kw = dict(include_num_input_tokens_seen="all", logging_steps=1, save_strategy="steps", save_steps=2)
    straight = make(tmp_path / "a", tok, max_steps=4, **kw)
    straight.train()
    make(tmp_path / "b", tok, max_steps=2, **kw).train()
    resumed = make(tmp_path / "b", tok, max_steps=4, **kw)
    resumed.train(resume_from_checkpoint=True)
    seen = lambda tr: [h["num_input_tokens_seen"] for h in tr.state.log_history if "objective/kl" in h]  # noqa: E731
    assert seen(resumed) == seen(straight) and seen(straight)[-1] > seen(straight)[1] > 0


def test_a_best_metric_evaluation_never_logs_is_refused_when_the_trainer_is_built(tmp_path, tok):
    """`metric_for_best_model="reward"` (PPO's evaluation logs kl, length, eos and the audit judges): transformers'
    KeyError at the first evaluation, after eval_steps iterations — and before that iteration's checkpoint, so they
    were lost. Named evaluation sets prefix their metrics, as Trainer does."""
    with pytest.raises(ValueError, match=r"metric_for_best_model='reward' is not a metric PPOTrainer's evaluation "
                                         r"logs; it logs kl, length, eos \(as eval_<name>\)"):
        make(tmp_path, tok, eval_strategy="steps", eval_steps=2, metric_for_best_model="reward",
             eval_dataset=prompts(4))

    def judge(prompts, completions, **kw):
        return [1.0] * len(completions)

    for name in ("judge", "eval_kl", "a_judge"):  # an audit judge, the eval_ prefix, a named set's metric
        make(tmp_path, tok, eval_strategy="steps", metric_for_best_model=name, audit_funcs=[judge],
             eval_dataset={"a": prompts(4)} if name.startswith("a_") else prompts(4))
    with pytest.raises(ValueError, match="it logs a_kl, a_length, a_eos, a_judge"):
        make(tmp_path, tok, eval_strategy="steps", metric_for_best_model="judge", audit_funcs=[judge],
             eval_dataset={"a": prompts(4)})


def test_evaluating_the_reference_reads_kl_zero(tmp_path, tok):
    """`evaluate_policy(adapters=False)` samples the reference and reported 21.8 nats of KL after one iteration: the
    KL line compared the trained policy's logits with the reference's on the reference's samples."""
    tr = make(tmp_path, tok, max_steps=1, learning_rate=0.1)
    tr.train()
    data = prompts(4)
    assert tr.evaluate_policy(data, adapters=True)["kl_mean"] > 0.01  # the policy moved
    assert tr.evaluate_policy(data, adapters=False)["kl_mean"] == 0.0
