"""What the PPO core promises beside the KL bound: every adapter it trains learns, log-probs are the sampling
distribution, controllers recover, rewards are comparable across members."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import PPOConfig, PPOTrainer
from rlhf_ext.models import load_model
from rlhf_ext.plugins.kl import build_controller
from rlhf_ext.plugins.shaping import ResponseInfo
from rlhf_ext.reward.pipeline import RewardPipeline

from .test_ppo import good_counter, make, prompts


def _lora_factors(tr, kind):
    return {n: p.detach().clone() for n, p in tr.policy.peft.named_parameters() if kind in n and ".policy" in n}


def test_embedding_lora_trains(tmp_path, tok):
    """PEFT names embedding LoRA `lora_embedding_A.<adapter>` (no trailing dot): it used to stay frozen."""
    tr = make(tmp_path, tok, max_steps=2)
    tr = PPOTrainer(tr.policy.peft.get_base_model().__class__(tr.policy.peft.get_base_model().config), good_counter(tok),
                    args=tr.args, train_dataset=prompts(), processing_class=tok,
                    peft_config=LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    before = _lora_factors(tr, "lora_embedding")
    assert before and all(p.requires_grad for n, p in tr.policy.peft.named_parameters() if "lora_embedding" in n and ".policy" in n)
    tr.train()
    after = _lora_factors(tr, "lora_embedding")
    assert all(not torch.equal(before[n], after[n]) for n in before)


def test_4bit_ppo_trains_every_adapter_below_4bit_layers(tmp_path, tok, tiny4_path):
    """LoRA on q/v only (every one of them sits on a 4-bit linear), after generate() has run in eval mode: every
    LoRA-B must leave zero. On AVX512-BF16 CPUs this used to fail silently (bitsandbytes repacked the weights)."""
    model = load_model(tiny4_path, "causal", load_in_4bit=True)
    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=8, max_steps=2, learning_rate=3e-2,
                     max_completion_length=6, kl_controller="fixed", use_cpu=True, save_strategy="no",
                     disable_tqdm=True, logging_steps=1000)
    tr = PPOTrainer(model, good_counter(tok), args=args, train_dataset=prompts(), processing_class=tok,
                    peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    import bitsandbytes as bnb

    adapted = [m for n, m in tr.policy.peft.named_modules() if n.endswith(("q_proj", "v_proj")) and hasattr(m, "lora_B")]
    assert adapted and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in adapted)
    before = _lora_factors(tr, "lora_B")
    assert len(before) == 4 and all(float(p.abs().max()) == 0 for p in before.values())
    tr.train()
    after = _lora_factors(tr, "lora_B")
    assert all(float(after[n].abs().max()) > 0 for n in before), [n for n in before if float(after[n].abs().max()) == 0]


def test_gradient_reach_check_names_dead_modules(tmp_path, tok):
    """A layer whose output is cut from the graph (what a backward-less 4-bit kernel does) stops training: the first
    optimizer step raises, naming the adapter matrices that got no gradient."""
    tr = make(tmp_path, tok, max_steps=1)
    layer = tr.policy.peft.get_base_model().model.layers[0].self_attn.v_proj
    layer.register_forward_hook(lambda m, i, o: o.detach())
    with pytest.raises(RuntimeError, match=r"received no gradient at the first optimizer step.*layers\.0\.self_attn\.v_proj\.lora_B"):
        tr.train()


def test_batches_without_any_learning_signal_are_not_taken_for_a_detached_graph(tmp_path, tok):
    """A sparse reward nobody earns at first (0 for every completion) with value_head_init="zeros": advantages, returns
    and values are all exactly 0, so is every gradient. Those steps used to count towards the reach check's 8 tries:
    two such iterations (one with num_mini_batches=2) stopped the run with "7 of 7 adapter matrices received no
    gradient at the first optimizer step … a detached graph". Such steps are not counted; the run trains on once a
    reward appears."""
    calls = {"n": 0}

    def sparse(completions, **kw):
        calls["n"] += 1
        return [0.0] * len(completions) if calls["n"] <= 2 else [float(i % 2) for i in range(len(completions))]

    tr = make(tmp_path, tok, reward=sparse, value_head_init="zeros", num_mini_batches=2, max_steps=4,
              per_device_train_batch_size=8)
    before = _lora_factors(tr, "lora_B")
    hist = tr.train()
    assert [h["grad_norm"] for h in hist[:2]] == [0.0, 0.0] and hist[-1]["grad_norm"] > 0
    after = _lora_factors(tr, "lora_B")
    assert all(not torch.equal(before[n], after[n]) for n in before)


def test_a_matrix_reached_once_is_not_dead_when_its_gradient_is_zero_later():
    """The check lists the matrices that never had a gradient, not those whose gradient happened to be 0 at its last
    try (PPO's value clip saturated in a later epoch); with a gradient missing throughout it still stops, saying how
    many steps it looked at."""
    from rlhf_ext.adapters import REACH_TRIES, GradientReachCheck

    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2, 2))
    check = GradientReachCheck({"x.lora_B.policy.weight": a, "y.lora_B.policy.weight": b}, "PPOTrainer")
    a.grad, b.grad = torch.ones(2, 2), torch.zeros(2, 2)
    check()
    a.grad = torch.zeros(2, 2)
    for _ in range(REACH_TRIES * 2):
        check(signal=False)  # a step whose whole gradient is 0: not counted
    assert check.tries == 1 and not check.done
    b.grad = torch.ones(2, 2)
    check()
    assert check.done
    c = torch.nn.Parameter(torch.zeros(2, 2))
    check = GradientReachCheck({"x.lora_B.policy.weight": a, "z.lora_B.policy.weight": c}, "PPOTrainer")
    a.grad, c.grad = torch.ones(2, 2), torch.zeros(2, 2)
    with pytest.raises(RuntimeError, match=rf"1 of 2 adapter matrices received no gradient in the first {REACH_TRIES} "
                                           r"optimizer steps.*: z\.lora_B"):
        for _ in range(REACH_TRIES):
            check()
            a.grad = torch.zeros(2, 2)


def test_logprobs_match_sampling_with_logit_softcapping(tmp_path, tok):
    """Gemma-2 soft-caps its logits inside the model's forward; computing log-probs from the LM head directly used
    to differ from what generate() sampled by up to 14 nats. Now the start-up check measures the gap, and an
    independent comparison with generate's own scores agrees."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5,
                       max_position_embeddings=128, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=None)
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # logits well outside ±0.5: the soft-cap matters
    tr = make(tmp_path, tok, model=model, max_steps=1, temperature=0.7)
    assert tr.startup["sampling_vs_training"] < 1e-4
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        g = tr.policy.peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), output_scores=True,
                                    return_dict_in_generate=True,
                                    **tr.policy.generation_kwargs(tok, 5, 1.0, stop_on_eos=False))
        sampled = torch.stack(g.scores, 1).log_softmax(-1)
        mine = tr.policy.logits(g.sequences, torch.ones_like(g.sequences), 5).log_softmax(-1)
    assert (sampled - mine).abs().max() < 1e-4
    tr.train()


def test_eos_may_be_the_first_token(tmp_path, tok):
    """No min_new_tokens: masking EOS at step 0 while the log-probs don't would make sampling ≠ π."""
    tr = make(tmp_path, tok, max_steps=1)
    assert tr.policy.generation_kwargs(tok, 8, 1.0, True)["min_new_tokens"] is None
    with torch.no_grad():  # make EOS the likeliest first token
        tr.policy.peft.get_base_model().lm_head.weight[tok.eos_token_id] *= 0
        tr.policy.peft.get_base_model().lm_head.weight[tok.eos_token_id] += 5 * tr.policy.peft.get_base_model().model.norm.weight
    ro = tr._rollout(tr._next_prompts())
    empty = [i for i, c in enumerate(ro.completion_ids) if c == [tok.eos_token_id]]
    assert empty and all(ro.lengths[i] == 0 and ro.has_eos[i] for i in empty)


def test_lagrangian_anti_windup():
    """10 iterations at KL 1000 (δ 1), then KL 0: β must leave β_max at once and keep falling."""
    ctl = build_controller("lagrangian", 0.05, 1.0, lr=0.02, beta_max=10.0)
    for _ in range(10):
        ctl.update(1000.0)
    assert ctl.beta == 10.0
    betas = [ctl.update(0.0) for _ in range(5)]
    assert betas[0] < 10.0 and all(b2 < b1 for b1, b2 in zip(betas, betas[1:]))
    assert ctl.integral <= ctl.beta_max


def test_callable_members_are_normalised_when_mixed():
    """A callable with scores in [0, 10] beside a member whose scores are ~0.01: mixing raw scales would let the
    callable dominate min/uwo. 'auto' normalises callables with a running mean/std when there are several columns."""
    big = lambda prompts, completions, completion_ids, **kw: [float(len(c) % 11) for c in completions]  # noqa: E731
    small = lambda prompts, completions, completion_ids, **kw: [0.01 * (len(c) % 3) for c in completions]  # noqa: E731
    comps = [f"x{'y' * i}" for i in range(40)]
    ids = [[1] * (i + 1) for i in range(40)]
    pipe = RewardPipeline([big, small], aggregation="uwo", aggregation_kwargs={"lam": 1.0})
    _, _, raw, norm = pipe.score(None, comps, ids)
    assert norm.std(0).min() > 0.5 and norm.std(0).max() < 1.5  # both columns on the unit scale
    assert abs(float(norm[:, 0].mean())) < 0.5
    alone = RewardPipeline([big])
    _, _, raw, norm = alone.score(None, comps, ids)
    assert torch.equal(raw, norm)  # a lone callable keeps its scale (as in TRL)
    state = pipe.state_dict()
    fresh = RewardPipeline([big, small], aggregation="uwo")
    fresh.load_state_dict(state)
    assert fresh.members[0].running_mean == pipe.members[0].running_mean


def test_length_shapers_count_content_tokens_not_eos():
    info = ResponseInfo.from_ids([[5, 6, 2], [5, 6, 7]], eos_token_id=2)
    assert info.lengths.tolist() == [2.0, 3.0] and info.has_eos.tolist() == [True, False]


def test_gradient_checkpointing_recomputes_the_same_dropout_free_function(tmp_path, tok):
    """With dropout in the base config and in LoRA, disable_dropout zeroes every rate, training passes stay in train
    mode, and checkpointing — which transformers gates on `training` — recomputes the decoder layers in the backward
    pass in the same mode as the forward."""
    from rlhf_ext.testing import tiny_causal_lm

    tr = make(tmp_path, tok, model=tiny_causal_lm(tok, attention_dropout=0.3), max_steps=1, gradient_checkpointing=True)
    layer = tr.policy.peft.get_base_model().model.layers[0]
    calls, mlp_forward = [], layer.mlp.forward

    def counted(*a, **k):  # (module hooks do not fire on the recomputation; a wrapped forward does)
        calls.append(layer.self_attn.training or layer.mlp.training)
        return mlp_forward(*a, **k)

    layer.mlp.forward = counted
    ro = tr._rollout(tr._next_prompts())
    calls.clear()
    logits, values, _ = tr.policy(ro.ids, ro.mask, ro.R)
    (logits.logsumexp(-1).mean() + values.mean()).backward()
    assert len(calls) == 2 and calls[0] == calls[1]  # forward, then the recomputation in the same mode
    assert layer.self_attn.attention_dropout == 0.0
    assert all(m.p == 0.0 for m in tr.policy.peft.modules() if isinstance(m, torch.nn.Dropout))
    assert tr.startup["train_vs_eval"] == 0.0


def test_train_only_behaviour_that_cannot_be_switched_off_is_refused(tmp_path, tok):
    """Noise the trainer does not know how to switch off (here: jitter in training mode, as MoE routers have) would
    make ratios and the KL guard inexact: refused at start-up, unless the user keeps it knowingly."""
    from torch import nn

    from rlhf_ext.testing import tiny_causal_lm

    class Jitter(nn.Module):
        def forward(self, x):
            return x + 0.1 * torch.randn_like(x) if self.training else x

    def jittery():
        m = tiny_causal_lm(tok)
        m.model.norm = nn.Sequential(m.model.norm, Jitter())
        return m

    with pytest.raises(ValueError, match="different logits in training mode than in eval mode"):
        make(tmp_path, tok, model=jittery(), max_steps=1)
    hist = make(tmp_path, tok, model=jittery(), max_steps=1, disable_dropout=False, kl_controller="hard",
                kl_target=1.0).train()
    assert hist[0]["kl/after_update"] <= 1.0


def test_theta_old_is_the_policy_not_a_dropout_draw(tmp_path, tok):
    """disable_dropout=False keeps dropout in the training passes, but θ_old (and the reference) are the policy
    itself, in eval mode: with the policy untouched (lr 0) the KL penalty reads exactly 0 (before: 0.0098, two θ_old
    passes differing by up to 0.048 in log-prob)."""

    from rlhf_ext.testing import tiny_causal_lm

    model = tiny_causal_lm(tok, attention_dropout=0.3)
    args = PPOConfig(str(tmp_path / "o"), per_device_train_batch_size=8, max_steps=2, max_completion_length=6,
                     learning_rate=0.0, disable_dropout=False, kl_controller="fixed", init_kl_coef=0.1,
                     use_cpu=True, save_strategy="no", disable_tqdm=True, monitor=False)
    data = Dataset.from_dict({"prompt": [f"write a short review of the {w} ." for w in "movie book song film".split() * 2]})
    tr = PPOTrainer(model, reward_funcs=lambda completions, **k: [1.0] * len(completions), args=args,
                    train_dataset=data, processing_class=tok,
                    peft_config=LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"]))
    hist = tr.train()
    assert all(h["objective/kl"] == 0.0 for h in hist)


@pytest.mark.parametrize("minibatches", [1, 4])
def test_exact_kl_measurement_is_chunked_by_minibatch_rows(tmp_path, tok, monkeypatch, minibatches):
    """The guard's KL measurement never materialises full-batch [B, R, V] logits when training uses minibatches,
    and the chunked value equals the one-shot value."""
    from rlhf_ext.ppo.policy import PolicyAndValue

    tr = make(tmp_path, tok, max_steps=1, kl_controller="hard", kl_target=0.5, num_mini_batches=minibatches)
    tr.train()
    ro, seen = tr.rollout, []
    plain = PolicyAndValue.logits

    def spy(self, ids, *a, **k):
        seen.append(ids.shape[0])
        return plain(self, ids, *a, **k)

    monkeypatch.setattr(PolicyAndValue, "logits", spy)
    chunked = tr._measure(ro)
    whole = float(tr.policy.sequence_kl(plain(tr.policy, ro.ids, ro.mask, ro.R, ro.h_low), ro.ref_logits_full,
                                        ro.resp_mask).mean())
    assert seen == [ro.ids.shape[0] // minibatches] * minibatches
    assert abs(chunked - whole) <= 1e-6 * max(1.0, whole)


def _reward_form_gradient(estimator, logits, ref_logp):
    """E_{a~π}[−k(a) ∇log π(a)] in exact expectation over a categorical π = softmax(logits): what a per-token
    penalty reward −k contributes to the policy gradient."""
    logp = logits.log_softmax(-1)
    k = estimator(logp.detach(), ref_logp)  # the penalty for each action, as a (detached) reward
    surrogate = (logp.exp().detach() * (-k) * logp).sum()
    return torch.autograd.grad(surrogate, logits)[0]


def test_only_k1_as_a_reward_has_the_gradient_of_the_kl():
    """Independent computation: the exact gradient of −KL(π‖π_ref) on a categorical, by autograd; k1's reward-form
    gradient equals it, k2's and k3's do not — which is why the penalty uses k1 whatever kl_estimator says."""
    from rlhf_ext.registry import build

    g = torch.Generator().manual_seed(0)
    worst = {}
    for _ in range(20):
        logits = (torch.randn(50, generator=g) * 2).requires_grad_()
        ref_logp = (torch.randn(50, generator=g) * 2).log_softmax(-1)
        logp = logits.log_softmax(-1)
        true = torch.autograd.grad(-(logp.exp() * (logp - ref_logp)).sum(), logits)[0]
        for name in ("k1", "k2", "k3"):
            got = _reward_form_gradient(build("kl_estimator", name), logits, ref_logp)
            cos = float(torch.nn.functional.cosine_similarity(got, true, dim=0))
            worst[name] = min(worst.get(name, 1.0), cos)
            if name == "k1":
                assert torch.allclose(got, true, atol=1e-5)
    assert worst["k1"] > 0.9999 and worst["k2"] < 0.9 and worst["k3"] < 0.9


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_penalty_is_k1_whatever_the_logged_estimator(tmp_path, tok, estimator):
    tr = make(tmp_path, tok, max_steps=1, kl_estimator=estimator, init_kl_coef=0.5)
    tr.train()
    ro = tr.rollout
    old = torch.randn_like(ro.ref_logprobs) * 0.1 + ro.ref_logprobs
    values = torch.zeros_like(old)
    kl_t, adv, returns = tr._advantages(ro, old, values)
    from rlhf_ext.registry import build

    tr.kl_estimator = build("kl_estimator", "k1")
    _, adv_k1, returns_k1 = tr._advantages(ro, old, values)
    assert torch.allclose(returns, returns_k1)  # same rewards: the penalty did not change with the estimator
    assert not torch.allclose(kl_t, (old - ro.ref_logprobs) * ro.loss_mask)  # but the logged KL is the estimator's


def test_zero_initialised_value_head_starts_as_no_baseline_and_learns(tmp_path, tok):
    """`value_head_init="zeros"`: V ≡ 0 in the first iteration — the critic's explained variance is exactly 0 (the
    advantage is the plain return), not below it as with a random head — and the value head trains from there."""
    tr = make(tmp_path / "zeros", tok, max_steps=3, value_head_init="zeros")
    assert float(tr.policy.value_head.weight.abs().max()) == 0
    hist = tr.train()
    assert hist[0]["val/mean"] == 0.0 and hist[0]["val/explained_variance"] == 0.0
    assert float(tr.policy.value_head.weight.abs().max()) > 0
    first = make(tmp_path / "normal", tok, max_steps=1).train()[0]
    assert first["val/mean"] != 0.0 and first["val/explained_variance"] != 0.0  # the default: a random head
    with pytest.raises(ValueError, match="value_head_init must be 'normal' or 'zeros'"):
        PPOConfig(str(tmp_path / "bad"), use_cpu=True, value_head_init="zero")


def test_a_first_batch_nobody_earned_a_reward_on_is_a_zero_step_not_a_broken_graph(tmp_path, tok):
    """A sparse 0/1 reward no sample earns in the first rollout, with value_head_init='zeros' (the README's and the
    demo's setting): at θ₀ every advantage and return is exactly 0, so the first step's gradients are exact zeros —
    and the reach check stopped the run ('7 of 7 adapter matrices received no gradient … would never train'). The
    check now waits for a step with a signal; a graph cut for real is still refused at once (the test above)."""
    from .test_ppo import make

    calls = []

    def sparse(prompts, completions, completion_ids, **kw):
        calls.append(1)
        return [0.0 if len(calls) == 1 else 1.0 + (i % 2) for i in range(len(completions))]

    tr = make(tmp_path, tok, reward=sparse, max_steps=2, value_head_init="zeros", num_ppo_epochs=1)
    before = _lora_factors(tr, "lora_B")
    hist = tr.train()
    assert len(hist) == 2 and hist[0]["loss/policy"] == 0.0
    after = _lora_factors(tr, "lora_B")
    assert all(float(after[n].abs().max()) > 0 for n in before)  # the second iteration's signal trained them
