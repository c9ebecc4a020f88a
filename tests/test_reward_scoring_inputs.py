"""What a reward model scores during PPO, token for token: the chat template rendered with the prompts'
chat_template_kwargs, one BOS for token-id prompts, and a warning — not silence — where its input is cut to its
max_length, is in the other format than it trained on, or has no assistant header for pooling='response'."""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer, RewardPipeline
from rlhf_ext.data import tokenize_prompts
from rlhf_ext.reward.ensemble import reward_input_ids
from rlhf_ext.testing import CHAT_TEMPLATE, tiny_tokenizer

from .conftest import preference_rows

# a SmolLM3-style switch: the system block depends on enable_thinking
THINKING = "{% if enable_thinking is defined and not enable_thinking %}{{ 'good ' }}{% endif %}" + CHAT_TEMPLATE


def test_chat_template_kwargs_reach_the_reward_models_rendering():
    tok = tiny_tokenizer()
    tok.chat_template = THINKING
    prompt, completion = [{"role": "user", "content": "a movie ."}], [{"role": "assistant", "content": "great ."}]
    good = tok.convert_tokens_to_ids("good")
    assert reward_input_ids(tok, prompt, completion, {"enable_thinking": False})[0] == good
    assert good not in reward_input_ids(tok, prompt, completion)

    class Member:  # a reward model member: records what the pipeline hands it
        names, mean, std, seen = ["rm"], torch.zeros(1), torch.ones(1), []

        def score_completions(self, prompts, completions, completion_ids, **kw):
            self.seen.append(kw)
            return torch.zeros(len(completions), 1)

    pipe = RewardPipeline([Member()])
    pipe.chat_template_kwargs = {"enable_thinking": False}  # what PPOTrainer sets from PPOConfig.chat_template_kwargs
    pipe.score([prompt], [completion], [[1]])
    assert Member.seen[-1] == {"chat_template_kwargs": {"enable_thinking": False}}


def test_token_id_prompts_reach_the_rewards_without_a_second_bos(tmp_path):
    """TRL 1.12's input_ids prompts were decoded with their BOS; tokenizing that text again (as reward models do)
    added another: the reward model saw two. The policy still samples after the ids as given."""
    from rlhf_ext import PPOConfig

    tok = tiny_tokenizer()
    tok.bos_token = "<|endoftext|>"
    body = tok("write a short review of the movie .", add_special_tokens=False)["input_ids"]
    ds = Dataset.from_dict({"input_ids": [[tok.bos_token_id] + body]})
    args = PPOConfig(str(tmp_path), use_cpu=True, per_device_train_batch_size=1, report_to="none")
    ((text, ids, *_),) = tokenize_prompts(ds, tok, args)
    assert text == tok.decode(body) and not text.startswith(tok.bos_token) and list(ids) == [tok.bos_token_id] + body


@pytest.fixture(scope="module")
def short_rm(tmp_path_factory, tiny_path, tok):
    """A K=1 reward artifact trained with max_length 24 on conversational pairs."""
    out = tmp_path_factory.mktemp("rm")
    args = RewardEnsembleConfig(str(out), max_steps=1, max_length=24, use_cpu=True, report_to="none",
                                save_strategy="no", disable_tqdm=True, normalization_samples=8,
                                per_device_train_batch_size=8)
    tr = RewardEnsembleTrainer(tiny_path, args=args, train_dataset=Dataset.from_list(preference_rows(16, 0)),
                               processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj"]))
    tr.train()
    tr.save_model()
    return str(out)


def test_scoring_past_max_length_or_in_the_other_format_warns_once(short_rm):
    from rlhf_ext.reward.artifact import load_reward_model

    rm = load_reward_model(short_rm)
    prompt = [{"role": "user", "content": "write a short review of the movie . " * 6}]
    with pytest.warns(UserWarning, match=r"1 of 1 sequences to score are longer than the reward model's max_length"):
        rm.score_completions([prompt], [[{"role": "assistant", "content": "good ."}]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model: PPO scores every batch
        rm.score_completions([prompt], [[{"role": "assistant", "content": "good ."}]])
    with pytest.warns(UserWarning, match="trained on conversational .* scoring plain text"):
        rm.score_completions(["a movie ."], [" good ."])


def test_response_pooling_says_when_a_row_has_no_assistant_header():
    """A header whose last token merges with the answer's first ("Assistant: " + "good" → "Ġgood") is never found:
    the row was pooled over all its tokens, prompt included, without a word."""
    from types import SimpleNamespace

    from rlhf_ext.reward.ensemble import RewardEnsemble, pool_mean

    model = SimpleNamespace(header=[7, 8], pool=pool_mean)
    ids = torch.tensor([[1, 2, 7, 8, 5, 6], [1, 2, 3, 4, 5, 6]])  # the second row: no header
    hidden, mask = torch.randn(2, 6, 4), torch.ones(2, 6, dtype=torch.long)
    with pytest.warns(UserWarning, match=r"assistant header \[7, 8\] was not found in some rows"):
        pooled = RewardEnsemble._pool(model, hidden, ids, mask)
    assert torch.allclose(pooled[0], hidden[0, 4:].mean(0)) and torch.allclose(pooled[1], hidden[1].mean(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RewardEnsemble._pool(model, hidden, ids, mask)  # once


def test_an_artifact_without_a_recorded_base_says_to_pass_it(tmp_path, tok):
    """Trained from a model instance with no name or path: loading it alone was a bare TypeError (None as a path)."""
    from rlhf_ext.reward.artifact import load_reward_model
    from rlhf_ext.testing import tiny_causal_lm

    args = RewardEnsembleConfig(str(tmp_path), max_steps=1, use_cpu=True, report_to="none", save_strategy="no",
                                disable_tqdm=True, normalization_samples=8, per_device_train_batch_size=8)
    tr = RewardEnsembleTrainer(tiny_causal_lm(tok), args=args, train_dataset=Dataset.from_list(preference_rows(8, 0)),
                               processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj"]))
    tr.train()
    tr.save_model()
    with pytest.raises(ValueError, match="does not record where its base model comes from.*base_model=get_peft_model"):
        load_reward_model(str(tmp_path))
