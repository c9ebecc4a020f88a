"""Tiny models and a word-level tokenizer built in code (no network) for tests, docs and `--tiny` benchmarks.

The tokenizer mirrors SmolLM2's chat format on purpose: its pad token is its EOS `<|im_end|>`, which also
appears inside every chat-templated prompt, so tests catch any code that finds padding by token id.
"""

from __future__ import annotations

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
WORDS = (
    "the a an is was it this that and or but not very so too i you we they he she my your our of to in on for "
    "with at by from as be are were have has had do does did will would can could should movie film book song "
    "story plot actor actress music food place day night review write describe tell about short long one two "
    "three good great nice love happy wonderful excellent fun best fine bad awful terrible hate sad boring "
    "worst poor okay yes no answer user assistant system hello thanks please more less really quite just "
    "time people thing way life world work home city friend family dog cat tree sun rain water fire red blue "
    "green big small new old first last high low . , ! ?"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer():
    """A word-level fast tokenizer with a SmolLM2-style chat template (pad == eos == `<|im_end|>`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="[UNK]",
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(tokenizer=None, hidden_size: int = 32, num_layers: int = 2, **overrides):
    from transformers import LlamaConfig

    tokenizer = tokenizer or tiny_tokenizer()
    cfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_causal_lm(tokenizer=None, seed: int = 0, **kw):
    """A random 2-layer Llama (hidden 32) for the tiny tokenizer."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tokenizer, **kw))
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id
    return model


def save_tiny_model(path, tokenizer=None, seed: int = 0, **kw) -> str:
    """Write a tiny causal LM + tokenizer as a local safetensors folder (stands in for a hub checkpoint)."""
    tokenizer = tokenizer or tiny_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=seed, **kw)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)
