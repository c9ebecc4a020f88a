import math
import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import PPOConfig, PPOTrainer, RewardEnsembleConfig, RewardEnsembleTrainer
from rlhf_ext.testing import tiny_causal_lm

from .conftest import FOUR_BIT_HIDDEN, preference_rows

SUBJECTS = "movie book song film food place day night".split()
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])


def prompts(n=32, conversational=True):
    ps = [f"write a short review of the {SUBJECTS[i % len(SUBJECTS)]} ." for i in range(n)]
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in ps] if conversational else ps})


def good_counter(tok):
    """A dense, learnable reward: 10 × the fraction of positive words in the response."""
    pos = set(tok.convert_tokens_to_ids("good great nice love happy wonderful excellent fun best".split()))

    def positive_words(prompts, completions, completion_ids, **kw):
        return [10.0 * sum(t in pos for t in ids) / max(1, len(ids)) for ids in completion_ids]

    return positive_words


def make(tmp_path, tok, reward=None, data=None, model=None, callbacks=None, eval_dataset=None, audit_funcs=None, **kw):
    base = dict(per_device_train_batch_size=16, max_steps=4, learning_rate=3e-2, max_completion_length=8,
                kl_controller="fixed", init_kl_coef=0.01, use_cpu=True, save_strategy="no", disable_tqdm=True,
                logging_steps=1000, seed=0)
    base.update(kw)
    args = PPOConfig(str(tmp_path / "ppo"), **base)
    return PPOTrainer(model or tiny_causal_lm(tok), reward_funcs=reward or good_counter(tok), args=args,
                      train_dataset=data or prompts(), processing_class=tok, peft_config=LoraConfig(**LORA), callbacks=callbacks,
                      eval_dataset=eval_dataset, audit_funcs=audit_funcs)


def test_ppo_raises_reward(tmp_path, tok):
    hist = make(tmp_path, tok, max_steps=10).train()
    first = sum(h["objective/scores"] for h in hist[:3]) / 3
    last = sum(h["objective/scores"] for h in hist[-3:]) / 3
    assert last > first + 1.0, (first, last)
    for key in ("policy/entropy", "policy/clipfrac", "policy/approx_kl", "val/explained_variance", "loss/value",
                "response/eos_rate", "response/length_mean", "objective/kl", "objective/beta"):
        assert all(math.isfinite(h[key]) for h in hist), key
    assert all(h["policy/entropy"] >= 0 for h in hist)  # masked means: never negative from padding
    for h in hist:  # where an iteration's time goes: sampling within the rollout, the rollout and the update within it
        assert 0 < h["time/generate_s"] <= h["time/rollout_s"] and h["time/update_s"] > 0
        assert h["time/rollout_s"] + h["time/update_s"] <= h["time/iteration_s"]


def test_learning_rate_and_episode_are_logged_as_trainer_and_trl_did(tmp_path, tok):
    """`learning_rate` (transformers' Trainer logs it) and `episode` (TRL 1.12: prompts so far) were not logged:
    here each is checked against the schedule and the batch computed independently."""
    hist = make(tmp_path, tok, max_steps=3, per_device_train_batch_size=4, num_ppo_epochs=2, learning_rate=1e-2,
                lr_scheduler_type="linear").train()
    # linear decay to 0 over the 3 iterations (the schedule counts iterations, as TRL 1.12's), read after each one
    assert [h["learning_rate"] for h in hist] == pytest.approx([1e-2 * (1 - (i + 1) / 3) for i in range(3)])
    assert [h["episode"] for h in hist] == [4, 8, 12]


def _lora_params(tr):
    return {n: p.detach().clone() for n, p in tr.policy.peft.named_parameters() if p.requires_grad and "lora_" in n}


@pytest.mark.parametrize("ent_coef", [0.0, 0.5])
def test_logged_entropy_is_the_policys_and_the_bonus_trains_only_when_asked(tmp_path, tok, ent_coef):
    """`policy/entropy` is the masked mean entropy of π over the response tokens — with ent_coef = 0 a statistic
    measured after the backward, otherwise a loss term — checked against a float64 computation from the policy's
    own logits (lr 0: the policy stays at θ_old)."""
    tr = make(tmp_path, tok, max_steps=1, num_ppo_epochs=1, learning_rate=0.0, ent_coef=ent_coef)
    h = tr.train()[0]
    ro = tr.rollout
    logp = tr.policy.logits(ro.ids, ro.mask, ro.R, ro.h_low).double().log_softmax(-1)
    per_token = -(logp.exp() * logp).sum(-1)
    m = ro.loss_mask.double()
    expected = float((per_token * m).sum() / m.sum())
    assert h["policy/entropy"] == pytest.approx(expected, rel=1e-4)

    # one step from the same start with and without the bonus: only the bonus's gradient tells them apart
    moved = {}
    for i, c in enumerate((0.0, ent_coef)):
        t = make(tmp_path / f"run{i}", tok, max_steps=1, num_ppo_epochs=1, learning_rate=1e-2, ent_coef=c)
        start = _lora_params(t)
        t.train()
        moved[c] = {n: p - start[n] for n, p in _lora_params(t).items()}
    assert all(bool(d.abs().max() > 0) for n, d in moved[0.0].items() if "lora_B" in n)  # B gets a gradient at B = 0
    differs = max(float((moved[ent_coef][n] - moved[0.0][n]).abs().max()) for n in moved[0.0])
    assert (differs > 0) == (ent_coef != 0), differs


def test_hard_kl_holds_where_fixed_breaks(tmp_path, tok):
    delta = 1.0
    fixed = make(tmp_path, tok, max_steps=8, learning_rate=5e-2, kl_controller="fixed", kl_target=delta,
                 log_kl_after_update=True)
    kls = [h["kl/after_update"] for h in fixed.train()]
    assert max(kls) > delta, kls  # the learning rate is large enough to break the bound
    hard = make(tmp_path / "hard", tok, max_steps=8, learning_rate=5e-2, kl_controller="hard", kl_target=delta)
    hist = hard.train()
    assert all(h["kl/after_update"] <= delta + 1e-6 for h in hist), [h["kl/after_update"] for h in hist]
    assert sum(h["kl/backtracks"] + h["kl/restored"] for h in hist) > 0


def test_lagrangian_beta_follows_kl(tmp_path, tok):
    tr = make(tmp_path, tok, max_steps=6, learning_rate=5e-2, kl_controller="lagrangian", kl_target=0.05,
              kl_controller_kwargs={"lr": 0.05})
    hist = tr.train()
    for h, nxt in zip(hist, hist[1:]):
        if h["objective/kl"] > 0.05:
            assert nxt["objective/beta"] > h["objective/beta"]
        elif h["objective/kl"] < 0.05 and h["objective/beta"] > 0:
            assert nxt["objective/beta"] < h["objective/beta"]


def _params(tr):
    return {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad} | {
        f"vh.{n}": p.detach().clone() for n, p in tr.policy.value_head.named_parameters()}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])  # 0.1: the optimizer's two parameter groups (matrices, biases)
def test_resume_is_exact(tmp_path, tok, weight_decay):
    torch.manual_seed(0)
    full = make(tmp_path / "a", tok, max_steps=4, shapers=[{"name": "debias"}], kl_controller="lagrangian", kl_target=0.5,
                weight_decay=weight_decay)
    hist_full = full.train()
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):  # simulates a run killed after iteration 2
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = state.global_step >= 2

    torch.manual_seed(0)
    half = make(tmp_path / "b", tok, max_steps=4, shapers=[{"name": "debias"}], kl_controller="lagrangian",
                kl_target=0.5, callbacks=[StopAt()], save_strategy="steps", save_steps=2, weight_decay=weight_decay)
    assert len(half.train()) == 2
    ckpt = str(tmp_path / "b" / "ppo" / "checkpoint-2")
    torch.manual_seed(123)  # a different process state: the checkpoint must restore everything
    resumed = make(tmp_path / "b", tok, max_steps=4, shapers=[{"name": "debias"}], kl_controller="lagrangian", kl_target=0.5,
                   weight_decay=weight_decay)
    hist_resumed = resumed.train(resume_from_checkpoint=ckpt)
    a, b = _params(full), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    for key in ("objective/scores", "objective/kl", "objective/beta", "loss/policy"):
        assert hist_resumed[-1][key] == pytest.approx(hist_full[-1][key], rel=1e-4, abs=1e-6)


def test_resume_with_other_trajectory_settings_warns_naming_each(tmp_path, tok):
    """Like transformers' Trainer for its batch size: a resume with other settings continues, but says it is not the
    checkpoint's run continued (a changed default, e.g. the demo's batch, would otherwise pass unnoticed)."""
    import warnings

    make(tmp_path, tok, max_steps=2, save_strategy="steps", save_steps=2, per_device_train_batch_size=4).train()
    ckpt = str(tmp_path / "ppo" / "checkpoint-2")
    with pytest.warns(UserWarning, match=r"per_device_train_batch_size: 4 in the checkpoint, 2 now; "
                                          r"num_ppo_epochs: 4 in the checkpoint, 2 now.*exact continuation"):
        make(tmp_path, tok, max_steps=3, per_device_train_batch_size=2, num_ppo_epochs=2).train(resume_from_checkpoint=ckpt)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Resuming from")
        hist = make(tmp_path, tok, max_steps=3, per_device_train_batch_size=4).train(resume_from_checkpoint=ckpt)
    assert len(hist) == 3


def test_an_ignored_signal_stays_ignored():
    """A job started with Ctrl-C ignored (`nohup`, `cmd &` in a script) is not made interruptible by training."""
    import signal

    from rlhf_ext.interrupt import StopAfterIteration

    found = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopAfterIteration(announce=False) as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, found)


@pytest.mark.parametrize("signum, raised", [("SIGINT", KeyboardInterrupt), ("SIGTERM", SystemExit)])
def test_a_signal_mid_iteration_saves_that_iteration_and_resumes_from_it(tmp_path, tok, capsys, signum, raised):
    """Ctrl-C or `kill` while iteration 2 samples: it finishes, checkpoint-2 is written (save_strategy='no': nothing
    would have been saved before — the run was lost), the run stops with what the signal means (SIGTERM: status 143)
    and says how to resume; the resumed run goes on from iteration 2 and logs as the uninterrupted one did."""
    import os
    import signal

    reward, calls = good_counter(tok), []

    def interrupted_at_2(prompts, completions, completion_ids, **kw):
        calls.append(1)
        if len(calls) == 2:  # the second iteration's scoring: mid-iteration
            os.kill(os.getpid(), getattr(signal, signum))
        return reward(prompts, completions, completion_ids, **kw)

    tr = make(tmp_path, tok, reward=interrupted_at_2, max_steps=4)
    # an interactive shell's handlers: in a background job SIGINT is ignored, and training leaves it so
    found = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(raised) as stop:
            tr.train()
    finally:
        after = {s: signal.getsignal(s) for s in before}
        signal.signal(signal.SIGINT, found)
    if raised is SystemExit:
        assert stop.value.code == 128 + signal.SIGTERM
    assert tr.iteration == 2 and sorted(p.name for p in (tmp_path / "ppo").glob("checkpoint-*")) == ["checkpoint-2"]
    err = capsys.readouterr().err
    assert f"{signum}: stopping after this iteration" in err and "Stopped after iteration 2: checkpoint-2" in err
    assert after == before  # the handlers it found are back
    resumed = make(tmp_path, tok, reward=reward, max_steps=4)
    hist = resumed.train(resume_from_checkpoint=True)
    assert "Resuming from" in capsys.readouterr().err and resumed.iteration == 4 and len(hist) == 4
    whole = make(tmp_path / "whole", tok, reward=reward, max_steps=4).train()
    assert [h["loss/policy"] for h in hist] == pytest.approx([h["loss/policy"] for h in whole], rel=1e-5)


def test_a_launchers_sigterm_after_ctrl_c_still_saves(tmp_path, tok, capsys):
    """Ctrl-C in the terminal reaches `accelerate launch` and its process alike; the launcher then passes a SIGTERM
    on, which counted as a second Ctrl-C: the run stopped at once, without the checkpoint it had announced. A second
    SIGTERM is the same stop request; only a second Ctrl-C stops at once."""
    import os
    import signal

    reward, calls = good_counter(tok), []

    def interrupted_at_2(prompts, completions, completion_ids, **kw):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)  # the launcher's, passed on
            os.kill(os.getpid(), signal.SIGTERM)
        return reward(prompts, completions, completion_ids, **kw)

    tr = make(tmp_path, tok, reward=interrupted_at_2, max_steps=4)
    found = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            tr.train()
    finally:
        signal.signal(signal.SIGINT, found)
    assert tr.iteration == 2 and sorted(p.name for p in (tmp_path / "ppo").glob("checkpoint-*")) == ["checkpoint-2"]


@pytest.mark.parametrize("parent, says", [
    (["python", "/venv/bin/accelerate", "launch", "recipes/ppo.py"], "accelerate launch kills its processes 5 s"),
    (["python", "-m", "torch.distributed.run", "--nproc_per_node", "2"], "torchrun kills its processes"),
    (["bash"], None)])
def test_the_announcement_says_what_a_launcher_above_will_do(monkeypatch, parent, says):
    """Under a launcher the promise 'stopping after this iteration' held only if the iteration ended within the
    launcher's grace period: the announcement says so and how to signal the training processes alone."""
    import psutil

    from rlhf_ext.interrupt import launcher_note

    class Me:
        def parent(self):
            return type("Parent", (), {"cmdline": lambda self: parent})()

    monkeypatch.setattr(psutil, "Process", Me)
    note = launcher_note()
    if says is None:
        assert note == ""
    else:
        assert says in note and "pkill -TERM -f recipes/ppo.py" in note


_SIGNALLED_WORKER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("interrupt", sys.argv[1])
interrupt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(interrupt)  # by path: the rlhf_ext package would load transformers (seconds)
with interrupt.StopAfterIteration() as stop:
    print("ready", flush=True)
    while not stop.requested():  # an iteration's work
        time.sleep(0.02)
    print("stopped after the iteration", flush=True)
    raise stop.exception()
"""


@pytest.mark.parametrize("peer_failed", [True, False])
def test_the_launchers_sigterm_after_another_process_failed_stops_at_once(tmp_path, peer_failed):
    """torchrun's agent (accelerate launch's, for several processes) SIGTERMs every process when one of them fails.
    That is no request to finish the iteration and save — without the failed process no collective, so no checkpoint,
    can complete: it was announced as one ("stopping after this iteration and saving a checkpoint … signal the
    training processes alone") and the process went on computing until its next collective failed or the agent
    killed it 30 s later. It now says why and stops at once (143). With every process of the launch alive (a user's
    `kill -TERM` of one process, or the launcher passing its own SIGTERM on) the iteration still finishes."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import uuid

    from rlhf_ext import interrupt

    env = {**os.environ, "TORCHELASTIC_RUN_ID": uuid.uuid4().hex, "LOCAL_WORLD_SIZE": "2"}
    cmd = [sys.executable, "-c", _SIGNALLED_WORKER, interrupt.__file__]
    worker = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peer = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.exit(1) if sys.argv[1] == '1' else "
                             "time.sleep(60)", str(int(peer_failed))], env=env)
    try:
        assert worker.stdout.readline().strip() == "ready"
        if peer_failed:
            assert peer.wait(timeout=30) == 1  # reaped, as the agent reaps it before it signals the others
        t0 = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=30)
    finally:
        for p in (worker, peer):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert worker.returncode == 128 + signal.SIGTERM and time.monotonic() - t0 < 10
    if peer_failed:
        assert "another process of this job has ended" in err and "stops now, without a checkpoint" in err
        assert "stopped after the iteration" not in out and "stopping after this iteration" not in err
    else:
        assert "stopping after this iteration" in err and "stopped after the iteration" in out
        assert "another process" not in err


def test_checkpoint_is_complete_and_atomic(tmp_path, tok):
    tr = make(tmp_path, tok, max_steps=2, save_strategy="steps", save_steps=1, critic="separate")
    tr.train()
    ck = tmp_path / "ppo" / "checkpoint-2"
    for f in ("ppo_state.json", "value_head.safetensors", "optimizer.pt", "rng.safetensors",
              "adapters/policy/adapter_model.safetensors", "adapters/critic/adapter_model.safetensors"):
        assert (ck / f).is_file(), f
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "ppo").iterdir())


def test_save_model_writes_a_standard_peft_adapter(tmp_path, tok, tiny_path):
    """save_model(dir): `PeftModel.from_pretrained(base, dir)` gives the trained policy; the critic sits aside."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf_ext.models import load_model

    tr = make(tmp_path, tok, model=load_model(tiny_path, "causal"), max_steps=1, critic="separate")
    tr.model_name = tiny_path
    tr.train()
    out = tmp_path / "policy"
    tr.save_model(str(out))
    top = {p.name for p in out.iterdir() if p.is_file()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "manifest.json"} <= top
    assert (out / "critic" / "value_head.safetensors").is_file()
    assert (out / "critic" / "critic" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), str(out)).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = tr.policy.logits(ids, torch.ones_like(ids), 4) * tr.args.temperature
        got = loaded(input_ids=ids).logits[:, :-1]
    assert torch.allclose(want, got, atol=1e-5)
    merged = tmp_path / "merged"
    tr.save_model(str(merged), merge=True)
    assert (merged / "model.safetensors").is_file()
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits[:, :-1]
    assert torch.allclose(want, got, atol=1e-4)


def test_4bit_ppo_iteration(tmp_path, tok, tiny4_path):
    from rlhf_ext.models import load_model

    model = load_model(tiny4_path, "causal", load_in_4bit=True)
    tr = make(tmp_path, tok, model=model, max_steps=1)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    hist = tr.train()
    assert math.isfinite(hist[0]["loss/policy"])
    assert any(not torch.equal(before[n], p) for n, p in tr.model.named_parameters() if n in before)


def test_reward_artifact_members_share_the_policy_base(tmp_path, tok, tiny_path, recwarn):
    rm_args = RewardEnsembleConfig(str(tmp_path / "rm"), ensemble_size=2, ensemble_mode="adapters", max_steps=3,
                                   per_device_train_batch_size=8, report_to="none", save_strategy="no",
                                   use_cpu=True, disable_tqdm=True, normalization_samples=16)
    rm = RewardEnsembleTrainer(tiny_path, args=rm_args, train_dataset=Dataset.from_list(preference_rows(32, 0)),
                               processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    rm.train()
    rm.save_model(str(tmp_path / "rm"))
    from rlhf_ext.models import load_model
    from rlhf_ext import load_reward_model

    policy_base = load_model(tiny_path, "causal")
    n_base = sum(p.numel() for p in policy_base.parameters())
    tr = make(tmp_path, tok, reward=[str(tmp_path / "rm")], model=policy_base, max_steps=1, aggregation="uwo",
              aggregation_kwargs={"lam": 0.5})
    tr.model_name = tiny_path
    n_all = sum(p.numel() for p in tr.model.parameters())
    assert n_all < n_base * 1.5  # members are adapters, not model copies
    hist = tr.train()
    assert "rewards/member_0_raw" in hist[0] and "rewards/ensemble_std" in hist[0]
    # hosted members score exactly like the standalone artifact
    alone = load_reward_model(tmp_path / "rm")
    rows = Dataset.from_list(preference_rows(4, 5))
    hosted = tr.rewards.members[0]
    # hosted on the policy's base, the members share a batch's prompt head when the policy's check turned it on
    assert hosted.share_prefix == (tr.startup["shared_prompt_prefix"] == "on") and not alone.share_prefix
    assert torch.allclose(hosted.score_texts(rows["prompt"], rows["chosen"]),
                          alone.score_texts(rows["prompt"], rows["chosen"]), atol=1e-5)
    # every PEFT wrap on the way (reward trainer, PPO trainer, standalone artifact) keeps PEFT's deprecation noise out
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)]


def test_bad_inputs(tmp_path, tok):
    bad = Dataset.from_dict({"prompt": ["write a review .", "   "] + ["the movie ."] * 20})
    with pytest.raises(ValueError, match="Prompt 1 is empty"):
        make(tmp_path, tok, data=bad)
    long = Dataset.from_dict({"prompt": ["the " * 40] + ["the movie ."] * 20})
    with pytest.raises(ValueError, match="max_prompt_length.*prompt_overflow"):
        make(tmp_path, tok, data=long, max_prompt_length=16, per_device_train_batch_size=4)
    with pytest.warns(UserWarning, match="dropped"):
        tr = make(tmp_path, tok, data=long, max_prompt_length=16, prompt_overflow="drop", per_device_train_batch_size=4)
    assert len(tr.prompts) == 20
    tr = make(tmp_path, tok, data=long, max_prompt_length=16, prompt_overflow="truncate", per_device_train_batch_size=4)
    assert max(len(ids) for _, ids in tr.prompts) == 16
    with pytest.raises(ValueError, match="kl_target.*> 0"):
        make(tmp_path, tok, kl_target=0.0, kl_controller="hard")
    with pytest.raises(ValueError, match="Valid names"):
        make(tmp_path, tok, kl_controller="trust_region")
    with pytest.raises(ValueError, match="Valid names"):
        make(tmp_path, tok, aggregation="mode")
    with pytest.raises(ValueError, match="'prompt' column"):
        make(tmp_path, tok, data=Dataset.from_dict({"text": ["a"] * 20}))


def test_nan_rewards_dropped_or_stopped(tmp_path, tok):
    def flaky(prompts, completions, completion_ids, **kw):
        return [float("nan") if i % 4 == 0 else 1.0 for i in range(len(prompts))]

    hist = make(tmp_path, tok, reward=flaky, max_steps=1).train()
    assert hist[0]["rewards/dropped_nonfinite"] == 4 and math.isfinite(hist[0]["loss/policy"])
    assert hist[0]["rewards/flaky_raw"] == 1.0  # the mean over the kept samples (a dropped NaN · 0 is still NaN)
    with pytest.raises(ValueError, match="non-finite"):
        make(tmp_path / "error", tok, reward=flaky, max_steps=1, nonfinite_rewards="error").train()


def test_text_prompts_and_separate_critic(tmp_path, tok):
    hist = make(tmp_path, tok, data=prompts(conversational=False), critic="separate", max_steps=2,
                shapers=["missing_eos", {"name": "linear", "alpha": 0.01}, "repetition"]).train()
    assert len(hist) == 2 and all(math.isfinite(h["loss/value"]) for h in hist)


@pytest.mark.parametrize("critic,kl_controller,four_bit", [("shared", "hard", False), ("separate", "fixed", False),
                                                         ("shared", "fixed", True)])
def test_frozen_prefix_cache_is_exact(tmp_path, tok, critic, kl_controller, four_bit):
    """LoRA on the top layers only: caching the lower layers changes nothing but the cost."""
    from rlhf_ext.models import load_model
    from rlhf_ext.testing import save_tiny_model

    path = save_tiny_model(tmp_path / "deep", tok, num_layers=4, hidden_size=FOUR_BIT_HIDDEN if four_bit else 32)
    top = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    runs = []
    for cache in (True, False):
        torch.manual_seed(0)
        args = PPOConfig(str(tmp_path / f"ppo{cache}"), per_device_train_batch_size=8, max_steps=2, learning_rate=3e-2,
                         max_completion_length=8, kl_controller=kl_controller, kl_target=0.5, use_cpu=True,
                         save_strategy="no", disable_tqdm=True, logging_steps=1000, seed=0, critic=critic,
                         cache_frozen_layers=cache, lora_top_layers=2)
        tr = PPOTrainer(load_model(path, "causal", load_in_4bit=four_bit), reward_funcs=good_counter(tok), args=args,
                        train_dataset=prompts(), processing_class=tok, peft_config=top)
        assert (tr.policy.split is not None) == cache and (not cache or tr.policy.split.k == 2)
        runs.append((tr.train(), _params(tr)))
    (h_a, p_a), (h_b, p_b) = runs
    for k in p_a:
        assert torch.allclose(p_a[k], p_b[k], atol=1e-5), k
    for key in ("loss/policy", "loss/value", "objective/kl"):
        assert h_a[-1][key] == pytest.approx(h_b[-1][key], rel=1e-4, abs=1e-6)


def test_frozen_prefix_cache_is_exact_on_gpt2(tmp_path, tok):
    """GPT-2 adds learned position embeddings before its first layer: the split must not add them twice. Before, the
    cache was switched off for GPT-2; now the layers below LoRA run once per rollout and the split's logits equal the
    full forward's (tests/test_architectures.py covers every family; the fallback with a reason, there too)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_ext.data import pad_ids

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=4, n_positions=128,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=8, max_steps=1, max_completion_length=6,
                     use_cpu=True, save_strategy="no", disable_tqdm=True, kl_controller="fixed")
    tr = PPOTrainer(gpt2, reward_funcs=good_counter(tok), args=args, train_dataset=prompts(), processing_class=tok,
                    peft_config=LoraConfig(r=4, target_modules=["c_attn"], layers_to_transform=[2],
                                           fan_in_fan_out=True))
    assert tr.policy.split is not None
    ids, mask = pad_ids([i for _, i in tr.prompts[:3]], tr.policy.pad_id, side="left")
    full = tr.policy.logits(ids, mask, 4)
    cached = tr.policy.logits(ids, mask, 4, tr.policy.lower(ids, mask))
    assert torch.allclose(full, cached, atol=1e-5)
    assert math.isfinite(tr.train()[0]["loss/policy"])

def test_a_streamed_run_extended_by_max_steps_uses_each_prompt_once_in_stream_order(tmp_path, tok):
    """Raise max_steps and resume, as the 'Nothing to train' message suggests: a stream is read further, and the
    prompts were shuffled over the longer list — the saved position pointed into another order, so prompts of the
    first run came again and others never (0, 6, 8–11 twice; 12, 13, 17, 19, 20, 22 never). A stream is read in its
    own order now, so the resumed run goes on where the first stopped."""
    from datasets import Dataset

    seen = []

    def record(prompts, completions, completion_ids, **kw):
        seen.extend(int(p.split()[-2]) for p in prompts)
        return [0.0] * len(prompts)

    stream = Dataset.from_dict({"prompt": [f"write a review of film {i} ." for i in range(100)]}).to_iterable_dataset()
    make(tmp_path, tok, reward=record, data=stream, max_steps=3, per_device_train_batch_size=4,
         max_completion_length=4, save_strategy="steps", save_steps=3).train()
    with pytest.warns(UserWarning):  # the prompt set read so far differs (longer): said
        make(tmp_path, tok, reward=record, data=stream, max_steps=6, per_device_train_batch_size=4,
             max_completion_length=4, save_strategy="steps", save_steps=3).train(resume_from_checkpoint=True)
    assert seen == list(range(24))


def test_an_endless_prompt_stream_is_read_as_far_as_max_steps_needs(tmp_path, tok):
    """A streamed prompt set (`dataset_streaming`) may not end: PPO reads the max_steps × batch prompts its
    iterations use, in stream order, and no further (it read the whole stream before: an endless one never started).
    Without max_steps it is refused before any model loads, as TRL's Trainer refuses an IterableDataset."""
    from datasets import IterableDataset

    pulled = []

    def endless():
        i = 0
        while True:
            pulled.append(i)
            yield {"prompt": f"write a short review of film number {i} ."}
            i += 1

    stream = IterableDataset.from_generator(endless)
    tr = make(tmp_path, tok, data=stream, max_steps=3, per_device_train_batch_size=4, max_completion_length=4)
    assert [p for p, _ in tr.prompts] == [f"write a short review of film number {i} ." for i in range(12)]
    assert len(pulled) <= 13  # the twelve, and at most one the generator had produced before the reader stopped
    tr.train()
    assert tr.iteration == 3 and tr.data_epoch == 0  # the three batches are the twelve prompts, each once

    with pytest.raises(ValueError, match=r"streamed.*Set `max_steps` \(PPO iterations\) or `total_episodes`"):
        PPOTrainer("no/such-model", reward_funcs=good_counter(tok), train_dataset=stream, processing_class=tok,
                   args=PPOConfig(str(tmp_path / "p2"), use_cpu=True, num_train_epochs=1))


def test_a_stream_shorter_than_max_steps_needs_is_said_with_the_prompts_it_leaves_out(tmp_path, tok):
    """A stream of 10 prompts for 4 iterations of 4: read again from its start, as Trainer restarts a stream; prompts 8
    and 9 (short of a whole batch at the end of each pass) never reach a rollout, which is now said."""
    from datasets import IterableDataset

    seen = []

    def record(prompts, completions, completion_ids, **kw):
        seen.extend(int(p.split()[-2]) for p in prompts)
        return [0.0] * len(prompts)

    rows = [{"prompt": f"write a review of film {i} ."} for i in range(10)]
    stream = IterableDataset.from_generator(lambda: iter(rows))
    with pytest.warns(UserWarning, match=r"streamed 10 usable prompts, fewer than the 16 that max_steps=4 iterations "
                                         r"of 4 use: it is read again from its start, in the same order, and its last "
                                         r"2 prompt\(s\) are never used"):
        tr = make(tmp_path, tok, reward=record, data=stream, max_steps=4, per_device_train_batch_size=4,
                  max_completion_length=4)
    tr.train()
    assert seen == [*range(8), *range(8)]
    with warnings.catch_warnings():  # a stream as long as the run needs: nothing to say
        warnings.filterwarnings("error", message="train_dataset streamed")
        make(tmp_path / "b", tok, data=IterableDataset.from_generator(lambda: iter(rows)), max_steps=2,
             per_device_train_batch_size=4, max_completion_length=4)


def test_named_evaluation_sets_are_each_evaluated_as_transformers_trainer_does(tmp_path, tok):
    """eval_dataset={"a": …, "b": …} (or a DatasetDict): each set is evaluated and logged as eval_<name>_*, as
    transformers' Trainer does with a dict; before, the dict was read as one dataset whose columns were the names."""
    sets = {"short": prompts(4), "plain": prompts(6, conversational=False)}
    tr = make(tmp_path, tok, max_steps=1, per_device_train_batch_size=4, max_completion_length=4, eval_dataset=sets,
              eval_strategy="steps", eval_steps=1)
    tr.train()
    logged = {k for h in tr.state.log_history for k in h}
    assert {"eval_short_kl", "eval_plain_kl", "eval_short_length", "eval_plain_length"} <= logged, sorted(logged)
    direct = tr.evaluate(eval_dataset=sets, metric_key_prefix="test")
    assert {k.split("_")[1] for k in direct} == {"short", "plain"} and all(k.startswith("test_") for k in direct)


def test_reward_functions_get_dataset_columns_trainer_state_and_log_metric_as_in_trl_grpo(tmp_path, tok):
    """TRL's GRPO / RLOO call a reward function with the prompts' other dataset columns (a list each, row-aligned),
    `trainer_state` and `log_metric`; a GRPO reward function such as `accuracy(completions, solution, **kwargs)` failed
    here with a missing argument. A function without **kwargs still gets only what it names; judges get the columns
    too, in training and in evaluation."""
    subjects = [f"subject{i}" for i in range(8)]
    data = Dataset.from_dict({"prompt": [f"write a short review of the {s} ." for s in subjects], "subject": subjects,
                              "weight": [float(i) for i in range(8)]})
    steps, means = [], []

    def grpo_style(completions, subject, weight, trainer_state, log_metric, **kwargs):
        assert all(s in p for p, s in zip(kwargs["prompts"], subject))  # the columns line up with the prompts
        steps.append(trainer_state.global_step)
        means.append(sum(weight) / len(weight))
        log_metric("custom/mean_weight", means[-1])
        return weight

    def old_style(prompts, completions, completion_ids):  # no **kwargs: called as before
        return [0.0] * len(completions)

    def judge(completions, subject, **kwargs):
        return [float(s[-1]) for s in subject]

    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=4, max_steps=2, max_completion_length=4,
                     use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, report_to="none",
                     eval_strategy="steps", eval_steps=2)
    tr = PPOTrainer(tiny_causal_lm(tok), reward_funcs=[grpo_style, old_style], audit_funcs=[judge], args=args,
                    train_dataset=data, eval_dataset=data.select([1, 2]), processing_class=tok,
                    peft_config=LoraConfig(**LORA))
    tr.train()
    assert steps == [0, 1]
    logged = [h["custom/mean_weight"] for h in tr.state.log_history if "custom/mean_weight" in h]
    assert logged == pytest.approx(means)
    assert [h["eval_judge"] for h in tr.state.log_history if "eval_judge" in h] == [pytest.approx(1.5)]


def test_log_completions_prints_trls_table_with_log_extra_columns_monitor_or_not(tmp_path, tok, capsys):
    """`log_completions=True` prints TRL's completions table at every logging step — before, only when the monitor
    was on — and a reward function's `log_extra(column, values)` (GRPO / RLOO pass it; here a GRPO function calling
    `kwargs["log_extra"]` raised KeyError) adds a column of per-completion values; the wrong count is refused."""
    def tagged(completions, **kwargs):
        kwargs["log_extra"]("verdict", [f"v{len(c)}" for c in completions])
        return [float(len(c)) for c in completions]

    def judge(completions, log_extra, trainer_state, **kwargs):  # an audit judge logs into its own rollout's table
        log_extra("judged", [f"at step {trainer_state.global_step}"] * len(completions))
        return [0.0] * len(completions)

    tr = make(tmp_path, tok, reward=[tagged], max_steps=2, per_device_train_batch_size=4, max_completion_length=4,
              monitor=False, log_completions=True, logging_steps=1)
    tr.audit_funcs = {"judge": judge}
    tr.train()
    out = capsys.readouterr().out
    assert out.count("Step 1") == 1 and out.count("Step 2") == 1  # one table per logging step
    assert "verdict" in out and "reward" in out and "judged" in out
    assert tr.rollout.extra == {"verdict": [f"v{len(c)}" for c in tr.rollout.completions], "judged": ["at step 1"] * 4}
    assert all(v in out for v in tr.rollout.extra["verdict"])

    def short(completions, log_extra, **kwargs):
        log_extra("verdict", ["x"])
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match=r"log_extra\('verdict', values\) received 1 values for a batch of 4"):
        make(tmp_path / "short", tok, reward=[short], max_steps=1, per_device_train_batch_size=4,
             max_completion_length=4, monitor=False).train()


def test_an_async_reward_function_is_awaited_even_inside_a_running_event_loop(tmp_path, tok):
    """TRL's GRPO takes `async def` reward functions (an LLM judge over HTTP); here the coroutine was returned as the
    "scores" and refused. It runs to completion on a worker thread's loop — also when the caller is inside a running
    event loop, as in a notebook."""
    import asyncio

    async def judge(completions, **kwargs):
        await asyncio.sleep(0)
        return [float(len(c)) for c in completions]

    async def inside_a_loop():
        tr = make(tmp_path, tok, reward=[judge], max_steps=1, per_device_train_batch_size=4, max_completion_length=4)
        tr.train()
        return tr

    tr = asyncio.run(inside_a_loop())
    assert tr.iteration == 1 and tr.rollout.raw[:, 0].tolist() == [float(len(t)) for t in tr.rollout.completions]


def test_reward_processing_classes_as_grpo_takes_them(tmp_path, tok):
    """GRPO's `reward_processing_classes` (it was an unexpected keyword): the tokenizer a sequence-classification
    reward model scores with, one entry per reward function; a count that does not match is refused."""
    from transformers import LlamaForSequenceClassification

    from rlhf_ext.testing import tiny_config, tiny_tokenizer

    rm = LlamaForSequenceClassification(tiny_config(tok, num_labels=1))
    own = tiny_tokenizer()
    own.padding_side = "left"  # distinguishable from the policy's, which the trainer would otherwise fall back to
    def trainer(classes):
        return PPOTrainer(tiny_causal_lm(tok), reward_funcs=[rm, good_counter(tok)], reward_processing_classes=classes,
                          args=PPOConfig(str(tmp_path / "ppo"), use_cpu=True, per_device_train_batch_size=4),
                          train_dataset=prompts(), processing_class=tok, peft_config=LoraConfig(**LORA))

    assert trainer([own, None]).rewards.members[0].tokenizer is own
    with pytest.raises(ValueError, match=r"reward_processing_classes has 1 entries for 2 reward function\(s\)"):
        trainer([own])


def test_missing_eos_without_stopping_charges_only_answers_without_one(tmp_path, tok):
    """stop_on_eos=False (TRL 1.12 without `stop_token`) generates to the full length; `missing_eos_penalty` then
    charges, as TRL 1.12 did, the responses with no EOS anywhere — not every response."""
    seen = []

    def zero(prompts, completions, completion_ids, **kw):
        seen.append([tok.eos_token_id in ids for ids in completion_ids])
        return [0.0] * len(prompts)

    model = tiny_causal_lm(tok)
    with torch.no_grad():  # the EOS row (pad = EOS: initialised to 0) along the mean hidden state: some answers hold one
        h = model.model(**tok(["write a short review of the movie ."], return_tensors="pt")).last_hidden_state[0]
        model.get_input_embeddings().weight[tok.eos_token_id] = 0.15 * h.mean(0) / h.mean(0).norm() * h.norm(dim=-1).mean()
    hist = make(tmp_path, tok, reward=zero, model=model, max_steps=1, stop_on_eos=False, max_completion_length=12,
                missing_eos_penalty=1.0).train()
    with_eos = torch.tensor(seen[0], dtype=torch.float64)
    assert 0 < with_eos.mean() < 1  # both kinds in the batch, or the check below could not tell the rules apart
    assert hist[0]["response/eos_rate"] == pytest.approx(float(with_eos.mean()))
    assert hist[0]["objective/scores"] == pytest.approx(-float((1 - with_eos).mean()))
    assert hist[0]["response/length_mean"] == 12  # nothing stops: every response runs to the full length


def test_responses_stop_at_any_of_the_models_eos_ids(tmp_path, tok):
    """Llama 3 Instruct / Gemma 2 it: the tokenizer's EOS is not the token that ends an assistant turn, which the
    model's generation_config lists beside it. Sampling used to stop at the tokenizer's EOS only, running every answer
    past its turn end to the length cap."""
    turn_end = tok.convert_tokens_to_ids("<|endoftext|>")
    model = tiny_causal_lm(tok)
    model.generation_config.eos_token_id = [tok.eos_token_id, turn_end]
    with torch.no_grad():  # make the turn end likely, so that answers reach it well before the cap
        h = model.model(**tok(["write a short review of the movie ."], return_tensors="pt")).last_hidden_state[0]
        model.get_input_embeddings().weight[turn_end] = 0.15 * h.mean(0) / h.mean(0).norm() * h.norm(dim=-1).mean()
    tr = make(tmp_path, tok, model=model, max_steps=1, max_completion_length=16)
    ro = tr.policy.generate(tr.prompts[:16], tok, 16)
    stop = {tok.eos_token_id, turn_end}
    ended_at_turn_end = 0
    for ids, ended, length in zip(ro.completion_ids, ro.has_eos.tolist(), ro.lengths.tolist()):
        assert not stop & set(ids[:-1])  # nothing sampled after a stop id is part of the response
        assert ended == (bool(ids) and ids[-1] in stop) and length == len(ids) - ended
        ended_at_turn_end += bool(ids) and ids[-1] == turn_end
    assert ended_at_turn_end > 0  # the case the tokenizer's EOS alone missed
