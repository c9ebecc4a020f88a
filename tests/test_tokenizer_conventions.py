"""The tokenizers people bring: a `[PAD]` added without resizing (reward trainer and scoring, as PPO already
handled), chat models that stop at a turn end their tokenizer's EOS is not (`as_reward_func`), BOS-adding tokenizers
cut from the left, and SentencePiece decoders that drop a completion's leading space. Each expectation is computed
here, from the tokenizer and the model directly."""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from rlhf_ext import PPOConfig, PPOTrainer, RewardEnsembleConfig, RewardEnsembleTrainer, build, load_reward_model
from rlhf_ext.plugins.shaping import as_reward_func
from rlhf_ext.testing import CHAT_TEMPLATE, WORDS, tiny_config

from .conftest import preference_rows

LORA = dict(r=4, target_modules=["q_proj", "v_proj"])


def word_tokenizer(bos: bool = False):
    """Word-level, `</s>` EOS (= pad), `<|eot|>` a chat turn end, optionally a BOS `<s>` put before every text."""
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|eot|>", "[UNK]"]
    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + WORDS)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                          special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                  unk_token="[UNK]", additional_special_tokens=["<|im_start|>", "<|im_end|>", "<|eot|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def llama(tok, vocab_size=None, seed=0, eos_ids=None):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tok, vocab_size=vocab_size or len(tok), pad_token_id=None,
                                         bos_token_id=tok.bos_token_id))
    model.generation_config.eos_token_id = eos_ids if eos_ids is not None else tok.eos_token_id
    model.generation_config.pad_token_id = None
    return model


def test_reward_trainer_and_scoring_with_a_pad_added_without_resizing(tmp_path):
    """`tokenizer.add_special_tokens({'pad_token': '[PAD]'})` without resizing, as TRL's PPO examples do: PPO
    trained, the reward trainer crashed in the embedding (IndexError) and so did score_texts on texts of two lengths.
    Padding is found by the attention mask, so each padded score must equal the text scored alone."""
    tok = word_tokenizer()
    rows = len(tok)
    tok.add_special_tokens({"pad_token": "[PAD]"})
    assert tok.pad_token_id >= rows
    model = llama(tok, vocab_size=rows)
    path = tmp_path / "base"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    args = RewardEnsembleConfig(str(tmp_path / "rm"), ensemble_size=2, ensemble_mode="adapters", max_steps=2,
                                per_device_train_batch_size=8, report_to="none", save_strategy="no", use_cpu=True,
                                disable_tqdm=True, normalization_samples=8)
    tr = RewardEnsembleTrainer(str(path), args=args, train_dataset=Dataset.from_list(preference_rows(16, 0)),
                               processing_class=tok, peft_config=LoraConfig(**LORA))
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    tr.train()
    moved = [n for n, p in tr.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in moved), moved  # it trained (lora_B starts at 0: it moved)
    tr.save_model(str(tmp_path / "rm_out"))
    rm = load_reward_model(str(tmp_path / "rm_out"), tokenizer=tok)
    prompts, completions = ["write a short review ."] * 2, ["good", "a very good movie and a fine story"]
    together = rm.score_texts(prompts, completions)
    alone = torch.cat([rm.score_texts([p], [c]) for p, c in zip(prompts, completions)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_as_reward_func_ends_completions_where_the_model_stops():
    """Gemma 2 it / Llama 3.1 / Qwen2.5 stop at a turn end besides their tokenizer's EOS (both in
    generation_config.eos_token_id), and TRL's trainers pass completion_ids ending with it. `as_reward_func` read only
    the tokenizer's EOS: an answer ended at the turn end was charged missing_eos and one token longer."""
    tok = word_tokenizer()
    eot, eos, good = (tok.convert_tokens_to_ids(t) for t in ("<|eot|>", "</s>", "good"))
    model = llama(tok, eos_ids=[eos, eot])
    ids = [[good, good, eot], [good, good, eos], [good, good, good]]  # ended at the turn end / at EOS / cut off
    missing = as_reward_func(build("shaper", "missing_eos", penalty=1.0), tok, name="m", model=model)
    length = as_reward_func(build("shaper", "linear", alpha=0.1, free_tokens=0), tok, name="l", model=model)
    assert missing(completion_ids=ids) == [0.0, 0.0, -1.0]
    assert length(completion_ids=ids) == pytest.approx([-0.2, -0.2, -0.3])
    plain = as_reward_func(build("shaper", "missing_eos", penalty=1.0), tok, name="m")  # no model: said once
    with pytest.warns(UserWarning, match=r"<\|eot\|>.*model=model"):
        assert plain(completion_ids=ids) == [-1.0, 0.0, -1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain(completion_ids=ids)


def test_a_prompt_cut_from_the_left_keeps_its_bos(tmp_path):
    """prompt_overflow='truncate' and the reward ensemble's max_length cut kept the last tokens only: the policy and
    the reward model saw a text without the BOS they never saw one without (ExternalRewardModel kept it)."""
    tok = word_tokenizer(bos=True)
    long = "the song that you love and hate ."
    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=2, max_steps=1, max_completion_length=2,
                     max_prompt_length=5, prompt_overflow="truncate", use_cpu=True, save_strategy="no",
                     disable_tqdm=True, monitor=False)
    with pytest.warns(UserWarning, match="max_prompt_length"):
        tr = PPOTrainer(llama(tok), reward_funcs=lambda completions, **k: [0.0] * len(completions), args=args,
                        train_dataset=Dataset.from_dict({"prompt": [long] * 2}), processing_class=tok,
                        peft_config=LoraConfig(**LORA))
    ids = tok(long)["input_ids"]
    assert tr.prompts[0][1] == [ids[0]] + ids[-4:] and ids[0] == tok.bos_token_id

    rm_args = RewardEnsembleConfig(str(tmp_path / "rm"), ensemble_size=1, max_steps=1, per_device_train_batch_size=4,
                                   report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                                   normalization_samples=4, max_length=64)
    rtr = RewardEnsembleTrainer(llama(tok), args=rm_args, train_dataset=Dataset.from_list(preference_rows(8, 0)),
                                processing_class=tok, peft_config=LoraConfig(**LORA))
    rtr.train()
    ens = rtr.model.eval()
    seq = tok(long + " good")["input_ids"] + [tok.eos_token_id]
    ens.max_length = 6
    with pytest.warns(UserWarning, match="BOS kept"):
        got = ens.score_sequences([seq])
    want = ens.score_sequences([[seq[0]] + seq[-5:]])  # within max_length: scored as it is
    assert torch.equal(got, want)


def sentencepiece_tokenizer():
    """Llama 2 / Mistral style: Metaspace pieces ('▁good'), BOS added, pad = EOS."""
    from tokenizers import SentencePieceBPETokenizer

    sp = SentencePieceBPETokenizer()
    corpus = [" ".join(WORDS[i:i + 12]) for i in range(0, len(WORDS), 3)] + ["Human: write a review. Assistant: good"]
    sp.train_from_iterator(corpus * 20, vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    sp.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.pad_token = tok.eos_token
    return tok


def test_completions_keep_the_space_a_sentencepiece_token_carries(tmp_path):
    """A SentencePiece decoder drops a sequence's leading space: '▁good' decoded alone is 'good', and prompt +
    completion — what reward models and functions read — fused 'Assistant:good'. The text a reward function gets,
    put after the prompt, must be the text the policy's tokens make."""
    tok = sentencepiece_tokenizer()
    prompt = "Human: write a short review of the movie. Assistant:"
    seen = {}

    def reward(prompts, completions, completion_ids, **kw):
        seen.update(completions=completions, completion_ids=completion_ids)
        return [0.0] * len(prompts)

    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=8, max_steps=1, max_completion_length=4,
                     use_cpu=True, save_strategy="no", disable_tqdm=True, stop_on_eos=False, monitor=False)
    tr = PPOTrainer(llama(tok), reward_funcs=[reward], args=args, train_dataset=Dataset.from_dict({"prompt": [prompt] * 8}),
                    processing_class=tok, peft_config=LoraConfig(**LORA))
    tr.train()
    p_ids = tok(prompt)["input_ids"]
    spaced = 0
    for text, ids in zip(seen["completions"], seen["completion_ids"]):
        assert prompt + text == tok.decode(p_ids + list(ids), skip_special_tokens=True)
        spaced += tok.convert_ids_to_tokens(ids[0]).startswith("\u2581")
    assert spaced > 0  # some completion began with a spaced piece: the case that lost its space
