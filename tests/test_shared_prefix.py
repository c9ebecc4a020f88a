"""Shared prompt prefix (`rlhf_ext/shared_prefix.py`): the tokens every row of a batch begins with run once per
pass. What must hold:

  * the shared length is the longest common prompt prefix after each row's pads, capped so the state predicting the
    first response token stays in the remainder — checked against a count over Python lists on random batches;
  * on every architecture of the support table (run from `test_architectures.py`) the shared pass gives the full pass's logits, values, log-probs and
    gradients (fp32: float rounding), on a left-padded batch with a response cut short, with the trained adapter
    mattering — and it reads fewer token rows (the embedding's input is counted);
  * sampling shares it too: the head is prefilled once and generate() starts from that cache — the same tokens
    drawn as without it (fp32, every architecture);
  * it is off, or not taken, where it cannot be exact — gradient checkpointing, the frozen-prefix cache, a batch
    longer than a sliding window, `share_prompt_prefix=False` — and where it does not pay (fewer than 8 common
    tokens, or fewer than 64 token rows saved);
  * a PPO run with it trains as a run without it, number for number up to rounding.
The hard-KL property matrix (`test_kl_guarantee.py`) runs with it on: its 16 prompts a batch share an 8-token
chat header (its 4-minibatch cases, 4 rows a pass, do not share).
"""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import PPOConfig, PPOTrainer
from rlhf_ext.models import load_model
from rlhf_ext.cpu_linear import row_bucket
from rlhf_ext.shared_prefix import MIN_SHARED_TOKENS, leading_pads, packs, shared_prefix_length, worth_sharing
from rlhf_ext.testing import ARCHITECTURES, save_tiny_model, save_tiny_model_for


def _count_shared(ids, mask, n_resp):
    """The independent count: strip each row's pads, compare the prompts token by token."""
    rows = [[t for t, m in zip(r[: len(r) - n_resp], mr[: len(mr) - n_resp]) if m] for r, mr in
            zip(ids.tolist(), mask.tolist())]
    if len(rows) < 2:
        return 0
    n = 0
    while n < min(map(len, rows)) - 1 and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


def _batch(rng, B, shared, suffixes, n_resp, vocab=50, cut=True):
    """Left-padded prompts (a common head of `shared` tokens + suffixes of the given lengths) + n_resp response
    tokens; the last row's response ends one token early when `cut`."""
    head = [rng.randrange(vocab) for _ in range(shared)]
    prompts = [head + [rng.randrange(vocab) for _ in range(k)] for k in suffixes[:B]]
    P = max(map(len, prompts))
    ids = torch.zeros(B, P + n_resp, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):P] = torch.tensor(p)
        mask[b, P - len(p):] = 1
    ids[:, P:] = torch.randint(vocab, (B, n_resp), generator=torch.Generator().manual_seed(rng.randrange(10**6)))
    if cut:
        mask[-1, -1] = 0
    return ids, mask


def test_shared_length_matches_a_count_over_lists():
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        B, n_resp = rng.randint(1, 5), rng.randint(1, 4)
        ids, mask = _batch(rng, B, rng.randint(0, 12), [rng.randint(0, 4) for _ in range(B)], n_resp, vocab=3)
        got, want = shared_prefix_length(ids, mask, n_resp), _count_shared(ids, mask, n_resp)
        assert got == want, (ids, mask, n_resp, got, want)
        seen.add(min(got, 3))
    assert seen == {0, 1, 2, 3}  # the small vocabulary makes accidental matches past the head, too


def _trainer(tmp_path, tok, path, model=None, **cfg):
    """8 prompts per iteration that share a 16-token head (chat header + an instruction): worth sharing."""
    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=8, max_steps=2, learning_rate=0.05,
                     num_ppo_epochs=2, max_completion_length=6, use_cpu=True, save_strategy="no", disable_tqdm=True,
                     logging_steps=10**6, seed=0, monitor=False, **cfg)
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": "write a short review of the movie . write a "
                                                                      f"short review of the {w} ."}]
                                         for w in "movie book song film food place day night".split()]})
    return PPOTrainer(model or load_model(path, "causal"), reward_funcs=lambda completion_ids, **kw:
                      [float(len(c)) for c in completion_ids], args=args, train_dataset=data, processing_class=tok)


def _token_rows(model):
    """Counts the token rows the model's embedding reads (input_ids.numel() per call)."""
    seen = []
    emb = model.get_base_model().get_input_embeddings()
    handle = emb.register_forward_pre_hook(lambda m, a: seen.append(a[0].numel()))
    return seen, handle


def _pass(policy, ids, mask, n_resp, share: bool):
    """The training pass with sharing on or off → outputs and the gradient of a loss of all three on every trained
    parameter."""
    policy.share_prefix = share
    params = [p for p in policy.parameters() if p.requires_grad]
    logits, values, logp = policy(ids, mask, n_resp)
    m = mask[:, -n_resp:].float()
    loss = (logp * m).sum() + (values * m).sum() + (logits.float().pow(2).mean(-1) * m).sum() / 100
    grads = torch.autograd.grad(loss, params)
    return [t.detach() for t in (logits, values, logp)], grads


# Hybrid support-table architectures and their layers whose cache is a running state (not keys and values)
RECURRENT = {"qwen3.5": "linear_attention", "qwen3.5-moe": "linear_attention", "lfm2": "conv",
             "granite4": "linear_attention",  # transformers' name for Granite 4's Mamba layers
             "falcon-h1": "hybrid"}  # Falcon-H1: attention and Mamba side by side in every layer


def _trained_adapter_and_batch(policy, tok):
    """Random LoRA B factors (a trained adapter, so that the shared tokens' gradients matter) and a left-padded batch
    of 5 rows sharing a 20-token head, 4 response tokens, one response cut short → (ids, mask)."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for n, p in policy.peft.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return _batch(random.Random(1), 5, 20, [1, 3, 2, 4, 1], 4, vocab=len(tok))


def check_shared_pass_equals_full_pass(arch, tmp_path, tok, record_property):
    """Run per architecture by `tests/test_architectures.py::test_shared_prompt_prefix_exact` (a support-table
    column)."""
    # sliding windows as real models have them (4096+): the tiny support-table models' 4-token window would make
    # every batch too long to share (tested below)
    extra = {"sliding_window": 64} if "sliding_window" in ARCHITECTURES[arch][2] else {}
    tr = _trainer(tmp_path, tok, save_tiny_model_for(tmp_path / arch, arch, tok, **extra))
    record_property("shared_prefix", tr.startup["shared_prompt_prefix"])
    pol = tr.policy
    if arch in RECURRENT:  # off, naming the layers; and forced on it could not have run exactly
        assert tr.startup["shared_prompt_prefix"].startswith("off (") and f"recurrent layers ({RECURRENT[arch]})" in \
            tr.startup["shared_prompt_prefix"]
        ids, mask = _batch(random.Random(1), 5, 20, [1, 3, 2, 4, 1], 4, vocab=len(tok))
        with torch.no_grad():
            full = pol.logits(ids, mask, 4)
            pol.share_prefix = True
            try:
                forced = pol.logits(ids, mask, 4)
            except Exception:  # noqa: BLE001 — the cache of a recurrent layer cannot be repeated
                forced = None
            pol.share_prefix = False
        m = mask[:, -4:].bool()
        assert forced is None or (forced[m] - full[m]).abs().max() > 1e-4
        return
    assert tr.startup["shared_prompt_prefix"] == "on"
    ids, mask = _trained_adapter_and_batch(pol, tok)
    (lf, vf, pf), gf = _pass(pol, ids, mask, 4, share=False)
    seen, handle = _token_rows(pol.peft)
    try:
        (ls, vs, ps), gs = _pass(pol, ids, mask, 4, share=True)
    finally:
        handle.remove()
    assert sum(seen) < ids.numel()  # the shared tokens were read once: the shared path ran
    (g_on, rows_on), (g_off, rows_off) = (_sample(pol, tok, ids[:, :-4], mask[:, :-4], 5, share) for share in (1, 0))
    assert rows_on < rows_off and torch.equal(g_on.resp, g_off.resp)  # sampling from a prefilled head: same draws
    m = mask[:, -4:].bool()
    with torch.no_grad():
        ref = pol.logits(ids, mask, 4, reference=True)
    assert (lf[m] - ref[m]).abs().max() > 1e-2  # the adapter changes this batch's logits
    assert torch.allclose(ls[m], lf[m], atol=2e-5), float((ls[m] - lf[m]).abs().max())
    assert torch.allclose(vs[m], vf[m], atol=2e-5) and torch.allclose(ps[m], pf[m], atol=2e-5)
    for a, b in zip(gs, gf):
        assert torch.allclose(a, b, atol=1e-5 + 1e-4 * float(b.abs().max())), float((a - b).abs().max())
    assert sum(float(b.abs().sum()) > 0 for b in gf) >= len(gf) // 2  # the loss reaches the adapters
    check_reward_scoring_shares_exactly(pol.peft, tok, tr.policy_adapter)


def _sample(policy, tok, ids, mask, n_new: int, share: bool):
    """`policy.generate` on the left-padded prompts (ids, mask) with sharing on or off, from one seed → (the rollout,
    token rows the embedding read)."""
    policy.share_prefix = bool(share)
    seen, handle = _token_rows(policy.peft)
    try:
        torch.manual_seed(3)
        g = policy.generate([(None, r[m.bool()].tolist()) for r, m in zip(ids, mask)], tok, n_new, stop_on_eos=False)
    finally:
        handle.remove()
    return g, sum(seen)


def _reads_fewer_rows(policy, ids, mask, n_resp) -> bool:
    seen, handle = _token_rows(policy.peft)
    try:
        policy.logits(ids, mask, n_resp)
    finally:
        handle.remove()
    return sum(seen) < ids.numel()


def test_off_where_it_cannot_be_exact_or_does_not_pay(tmp_path, tok):
    path = save_tiny_model(tmp_path / "m", tok)
    assert "gradient checkpointing" in _trainer(tmp_path, tok, path, gradient_checkpointing=True).startup[
        "shared_prompt_prefix"]
    checkpointed = load_model(path, "causal")
    checkpointed.gradient_checkpointing_enable()  # by the user, not through the config: the passes would not share
    assert "gradient checkpointing" in _trainer(tmp_path, tok, path, model=checkpointed).startup["shared_prompt_prefix"]
    assert "frozen-prefix cache" in _trainer(tmp_path, tok, path, lora_top_layers=1).startup["shared_prompt_prefix"]
    assert _trainer(tmp_path, tok, path, share_prompt_prefix=False).startup["shared_prompt_prefix"].startswith("off")
    # A sliding window shorter than the batch: the full pass runs (the window counts columns, and sharing moves them)
    win = _trainer(tmp_path, tok, save_tiny_model_for(tmp_path / "mistral", "mistral", tok, sliding_window=32))
    assert win.startup["shared_prompt_prefix"] == "on"
    rng = random.Random(2)
    assert _reads_fewer_rows(win.policy, *_batch(rng, 5, 17, [1, 2, 3, 1, 2], 4, vocab=len(tok)), 4)  # 24 < 32
    assert not _reads_fewer_rows(win.policy, *_batch(rng, 5, 33, [1, 2, 3, 1, 2], 4, vocab=len(tok)), 4)  # 40
    # sampling counts the tokens still to come: 20 prompt + 6 new < 32 shares, 20 + 12 does not
    ids, mask = _batch(rng, 5, 17, [1, 2, 3, 1, 2], 0, vocab=len(tok), cut=False)
    for n_new, shares in ((6, True), (12, False)):
        (_, on), (_, off) = (_sample(win.policy, tok, ids, mask, n_new, share) for share in (1, 0))
        assert (on < off) == shares, n_new
    win.policy.share_prefix = True
    # Where it does not pay: fewer than MIN_SHARED_TOKENS common tokens, or fewer than MIN_SAVED_ROWS rows saved
    pol = _trainer(tmp_path, tok, path).policy
    for rows, head, shares in ((20, MIN_SHARED_TOKENS - 1, False), (3, 20, False), (5, 16, True)):
        ids, mask = _batch(rng, rows, head, [2] * rows, 3, vocab=len(tok))
        ids[:, head] = torch.arange(rows) % len(tok)  # the rows part right after the head
        assert shared_prefix_length(ids, mask, 3) == head
        assert worth_sharing(rows, head) == shares == _reads_fewer_rows(pol, ids, mask, 3), (rows, head)


def test_window_shorter_than_the_check_turns_it_off(tmp_path, tok):
    tr = _trainer(tmp_path, tok, save_tiny_model_for(tmp_path / "mistral", "mistral", tok))  # the 4-token window
    assert tr.startup["shared_prompt_prefix"].startswith("off") and "sliding window" in tr.startup[
        "shared_prompt_prefix"]


def test_start_up_check_catches_sampling_that_departs_from_the_training_pass(tmp_path, tok, monkeypatch):
    """The start-up check samples from a prefilled head and compares what it sampled from with the training pass: a
    prefill that held other tokens' keys and values (here: every shared token shifted by one id) turns sharing off,
    saying why, and the run goes on without it."""
    from rlhf_ext.ppo import policy as policy_module
    from rlhf_ext.shared_prefix import leading_pads, prefilled_prompts

    def wrong_head(trunk, ids, mask, n_shared):
        g_ids, g_mask, cache = prefilled_prompts(trunk, ids, mask, n_shared)
        shifted = ids.clone()
        pads = leading_pads(mask)
        for b in range(ids.shape[0]):
            shifted[b, pads[b]:pads[b] + n_shared] = (ids[b, pads[b]:pads[b] + n_shared] + 1) % len(tok)
        return g_ids, g_mask, prefilled_prompts(trunk, shifted, mask, n_shared)[2]

    path = save_tiny_model(tmp_path / "m", tok)
    assert _trainer(tmp_path / "right", tok, path).startup["shared_prompt_prefix"] == "on"
    monkeypatch.setattr(policy_module, "prefilled_prompts", wrong_head)
    with pytest.warns(UserWarning, match="share_prompt_prefix is off: .*does not sample the training pass's"):
        tr = _trainer(tmp_path / "wrong", tok, path)
    assert "mean per-token KL" in tr.startup["shared_prompt_prefix"] and not tr.policy.share_prefix
    assert len(tr.train()) == 2
    monkeypatch.undo()
    # a check that reads NaN (non-finite logits) or fails outright also leaves it off, saying which; only the
    # sharing check's 5-row batch is affected (the sampling check at start-up samples 2 prompts)
    original = policy_module.PolicyAndValue._sampled_vs_training
    for effect, says in ((lambda: (float("nan"), float("nan"), 0), "mean per-token KL nan"),
                         (lambda: 1 / 0, "ZeroDivisionError: division by zero")):
        def odd(self, p_ids, *rest, effect=effect):
            return effect() if p_ids.shape[0] == 5 else original(self, p_ids, *rest)

        monkeypatch.setattr(policy_module.PolicyAndValue, "_sampled_vs_training", odd)
        with pytest.warns(UserWarning, match="share_prompt_prefix is off"):
            tr = _trainer(tmp_path / "odd", tok, path)
        assert says in tr.startup["shared_prompt_prefix"] and not tr.policy.share_prefix


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_ppo_with_sharing_trains_as_without(tmp_path, tok, critic):
    path = save_tiny_model(tmp_path / "m", tok)
    runs = {}
    for share in (True, False):
        # SGD: Adam's first step is sign(g), which turns the rounding of a near-zero gradient into a step of ±lr
        tr = _trainer(tmp_path / str(share), tok, path, share_prompt_prefix=share, critic=critic, optim="sgd")
        seen, handle = _token_rows(tr.policy.peft)
        hist = tr.train()
        handle.remove()
        runs[share] = (hist, sum(seen), {n: p.detach().clone() for n, p in tr.model.named_parameters()
                                         if p.requires_grad})
    (h_on, rows_on, p_on), (h_off, rows_off, p_off) = runs[True], runs[False]
    assert rows_on < rows_off  # sharing read fewer token rows
    for a, b in zip(h_on, h_off):
        assert a["objective/scores"] == b["objective/scores"]  # the same samples
        for key in ("loss/policy", "loss/value", "objective/kl", "val/mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert all(p_on[n].abs().max() > 1e-6 for n in p_on if "lora_B" in n)  # every adapter trained (B starts at 0)
    for n in p_off:  # the q adapters move least (~3e-5 here): relative agreement, to rounding
        assert torch.allclose(p_on[n], p_off[n], rtol=1e-3, atol=1e-8), (n, float((p_on[n] - p_off[n]).abs().max()))


def _ensemble(tok, mode: str, pooling: str):
    """A RewardEnsemble on a tiny Llama with trained-looking adapters: "heads" (one adapter, a 2-output head) or
    "adapters" (two adapters, a head each)."""
    from peft import get_peft_model
    from torch import nn

    from rlhf_ext.reward.ensemble import RewardEnsemble
    from rlhf_ext.testing import tiny_causal_lm

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    names = ["a"] if mode == "heads" else ["a", "b"]
    model = get_peft_model(tiny_causal_lm(tok).model, lora, adapter_name="a")
    for name in names[1:]:
        model.add_adapter(name, lora)
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape) * 0.5)
    heads = nn.ModuleDict({a: nn.Linear(32, 2 if mode == "heads" else 1) for a in names})
    spec = {"mode": mode, "members": ["m0", "m1"], "adapters": names, "pooling": pooling}
    return RewardEnsemble(model, tok, spec, heads).eval()


@pytest.mark.parametrize("mode,pooling", [("heads", "last"), ("heads", "response"), ("adapters", "mean")])
def test_reward_scoring_with_a_shared_head_scores_as_each_text_alone(tok, mode, pooling):
    """A reward ensemble hosted on the policy's base shares the prompt head in scoring (PPOTrainer turns it on where
    the policy's start-up check passed). Each text scored alone (one row, no padding, no sharing) is the independent
    value; the shared batch must match it to rounding, read fewer token rows, and a batch that does not share must
    take the plain path."""
    ens = _ensemble(tok, mode, pooling)
    header = tok.apply_chat_template([{"role": "system", "content": "you are a helpful movie critic . " * 6}],
                                     tokenize=True, return_dict=True)["input_ids"]
    rng = random.Random(0)
    words = [i for i in range(len(tok)) if i not in tok.all_special_ids]
    seqs = []
    for k in (3, 7, 1, 5, 2, 6):  # conversations that differ after the system header; right-padded when scored
        user = [rng.choice(words) for _ in range(k)]
        seqs.append(tok.apply_chat_template([{"role": "user", "content": tok.decode(user)},
                                             {"role": "assistant", "content": tok.decode(user[::-1])}],
                                            tokenize=True, return_dict=True)["input_ids"])
    seqs = [header + s for s in seqs]
    alone = torch.cat([ens.score_sequences([s]) for s in seqs])
    full, rows_full = _scored(ens, seqs, share=False)
    shared, rows_shared = _scored(ens, seqs, share=True)
    # a 10-token common head: not worth a pass for 6 rows ((6 − 1)·10 < 64 rows saved), though it would be for the 12
    # rows of a mixed-adapter batch — which must not share (one shared row cannot carry two adapters)
    differ = [header[:10] + s[len(header):] for s in seqs]
    assert not worth_sharing(len(differ), 10) and worth_sharing(2 * len(differ), 10)
    plain, rows_plain = _scored(ens, differ, share=True)
    passes = len(ens.adapters) if mode == "adapters" else 1  # "adapters": one mixed batch of K copies, unshared
    assert rows_full == passes * len(seqs) * max(map(len, seqs))
    assert rows_plain == passes * len(differ) * max(map(len, differ))  # not worth sharing: the plain padded pass
    # shared: per member, the head once and each row's own tokens after it (the packed pass skips the right pads, all
    # but as many as round the row count to row_bucket's sizes)
    L = next(i for i in range(min(map(len, seqs))) if len({s[i] for s in seqs}) > 1)  # the common head, counted
    assert L >= len(header) and packs(ens.model)
    live, grid = L + sum(len(s) - L for s in seqs), L + len(seqs) * (max(map(len, seqs)) - L)
    assert live < grid and rows_shared == passes * min(row_bucket(live), grid)
    assert torch.allclose(full, alone, atol=1e-5), float((full - alone).abs().max())
    assert torch.allclose(shared, alone, atol=1e-5), float((shared - alone).abs().max())
    assert (alone[:, 0] - alone[:, 0].mean()).abs().max() > 1e-3  # the texts score differently: pooling matters
    differ_alone = torch.cat([ens.score_sequences([s]) for s in differ])
    assert torch.allclose(plain, differ_alone, atol=1e-5)


def _scored(ens, seqs, share: bool):
    """`ens.score_sequences(seqs)` with sharing on or off → (scores, token rows the trunk's embedding read)."""
    from rlhf_ext.models import trunk_of

    seen = []
    handle = trunk_of(ens.model).get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].numel()))
    try:
        ens.share_prefix = share
        return ens.score_sequences(seqs), sum(seen)
    finally:
        handle.remove()


def check_reward_scoring_shares_exactly(peft, tok, adapter: str):
    """A reward member hosted on this base (the given adapter, a random head) scores a batch whose texts share a
    24-token head as it scores each text alone, reading fewer token rows (the support table's architectures)."""
    from torch import nn

    from rlhf_ext.reward.ensemble import RewardEnsemble

    from rlhf_ext.architectures import final_hidden_size

    hidden = final_hidden_size(peft)  # OPT-350m projects its output below hidden_size
    torch.manual_seed(4)
    ens = RewardEnsemble(peft, tok, {"mode": "heads", "members": ["m"], "adapters": [adapter]},
                         nn.ModuleDict({adapter: nn.Linear(hidden, 1)}), owns_base=False)
    rng = random.Random(5)
    head = [rng.randrange(len(tok)) for _ in range(24)]
    seqs = [head + [rng.randrange(len(tok)) for _ in range(k)] for k in (3, 6, 1, 4, 2)]
    alone = torch.cat([ens.score_sequences([s]) for s in seqs])
    shared, rows_shared = _scored(ens, seqs, share=True)
    assert rows_shared < len(seqs) * max(map(len, seqs))  # the shared path ran
    assert torch.allclose(shared, alone, atol=2e-5), float((shared - alone).abs().max())


@pytest.mark.parametrize("arch,critic,dtype", [("llama3", "shared", "float32"), ("qwen3", "separate", "float32"),
                                               ("llama3", "shared", "bfloat16"), ("phi3", "shared", "float32"),
                                               ("smollm3", "shared", "float32"), ("gpt2", "shared", "float32")])
def test_packed_pass_equals_the_cached_pass(arch, critic, dtype, tmp_path, tok, monkeypatch):
    """Where `packs` (PACKED_MODEL_TYPES, SDPA), the shared head and the rows' remainders run as one sequence
    (`packed_forward`) of their live tokens only (no pads, nothing after a cut-short response): the same logits,
    values, log-probs and gradients as the cached pass (the head as a batch of its
    own, its keys and values repeated to the rows) — the independent computation, run by switching `packs` off —, a
    reward member's hidden states too, one pass through the embedding instead of two, and transformers' attention
    mapping left as it was. Elsewhere (GPT-2) the cached pass runs."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import rlhf_ext.shared_prefix as sp
    from rlhf_ext.models import trunk_of

    model = load_model(save_tiny_model_for(tmp_path / arch, arch, tok), "causal", dtype=dtype)
    tr = _trainer(tmp_path, tok, None, model=model, critic=critic, bf16=dtype == "bfloat16")
    pol = tr.policy
    assert tr.startup["shared_prompt_prefix"] == "on" and tr.startup["training_vs_reference"] == 0.0
    assert sp.packs(trunk_of(pol.peft)) == (arch != "gpt2")
    ids, mask = _trained_adapter_and_batch(pol, tok)
    packed_calls = []
    real = sp.packed_forward
    monkeypatch.setattr(sp, "packed_forward", lambda *a, **k: packed_calls.append(1) or real(*a, **k))
    seen, handle = _token_rows(pol.peft)
    (lp, vp, pp), gp = _pass(pol, ids, mask, 4, share=True)
    handle.remove()
    assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping  # restored
    if arch == "gpt2":
        assert not packed_calls
        return
    assert len(packed_calls) == (2 if critic == "separate" else 1) and len(seen) == len(packed_calls)
    # the head once, then each row's own tokens, as many masked columns more as round the count to row_bucket's sizes
    L, B = shared_prefix_length(ids, mask, 4), ids.shape[0]
    live, grid = L + int(mask.sum()) - B * L, L + B * (ids.shape[1] - int(leading_pads(mask).min()) - L)
    assert 0 < L and live < grid and seen[0] == min(row_bucket(live), grid)
    real_packs = sp.packs
    monkeypatch.setattr(sp, "packs", lambda model: False)
    seen, handle = _token_rows(pol.peft)
    (lc, vc, pc), gc = _pass(pol, ids, mask, 4, share=True)
    handle.remove()
    assert len(seen) == 2 * len(packed_calls)  # the cached pass: the head, then the remainders
    m = mask[:, -4:].bool()
    tol = 2e-5 if dtype == "float32" else 2e-2
    for a, b in ((lp, lc), (vp, vc), (pp, pc)):
        assert torch.allclose(a[m].float(), b[m].float(), atol=tol), float((a[m].float() - b[m].float()).abs().max())
    for a, b in zip(gp, gc):
        assert torch.allclose(a.float(), b.float(), atol=tol * (1 + float(b.abs().max()))), float((a - b).abs().max())
    assert sum(float(b.abs().sum()) > 0 for b in gc) >= len(gc) // 2  # the loss reaches the adapters
    # a batch with few masked columns runs its whole grid: leaving 2 of 50 rows out would not repay the gathers
    monkeypatch.setattr(sp, "packs", real_packs)
    ids, mask = _batch(random.Random(2), 5, 20, [2, 2, 2, 2, 1], 4, vocab=len(tok))
    L = shared_prefix_length(ids, mask, 4)
    grid = L + 5 * (ids.shape[1] - int(leading_pads(mask).min()) - L)
    assert grid - (L + int(mask.sum()) - 5 * L) < sp.MIN_LEFT_OUT * grid
    seen, handle = _token_rows(pol.peft)
    _pass(pol, ids, mask, 4, share=True)
    handle.remove()
    assert seen[0] == grid
