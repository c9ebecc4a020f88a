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


# ------------------------------------------------------------------------------ the architecture matrix
# name -> (transformers config class, causal-LM class, config overrides). Each entry mirrors what distinguishes the
# real family (fused projections, Conv1D, soft-capping, sliding windows, NoPE layers, MoE…) at a tiny width.
# `sliding_window=4` is shorter than the test sequences, so a wrong per-layer attention type would show.
ARCHITECTURES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 64})),
    "qwen2.5": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8, tie_word_embeddings=True)),  # q/k norms
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1,
        norm_topk_prob=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(head_dim=8, sliding_window=4)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=8, query_pre_attn_scalar=8, sliding_window=4, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0, layer_types=["sliding_attention", "full_attention"])),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=8, query_pre_attn_scalar=8, sliding_window=4, final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict()),  # fused qkv_proj and gate_up_proj
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict()),  # Conv1D, learned absolute positions
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})),  # fused query_key_value
    "opt": ("OPTConfig", "OPTForCausalLM", dict()),  # learned positions with offset 2, decoder.layers
    # OPT-350m: embeddings narrower than the layers (project_in / project_out), post-layer-norm blocks; init_std 0.2
    # because at 0.02 the narrow tied head gives logits of ~1e-2 that nothing in the top layer can move
    "opt-350m": ("OPTConfig", "OPTForCausalLM", dict(word_embed_proj_dim=16, do_layer_norm_before=False, init_std=0.2)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict()),  # post-norms, q/k norms
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(no_rope_layer_interval=2)),  # a NoPE layer
    # attention sinks, a mixture of experts, sliding and full attention alternating
    "gpt-oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 8, "rope_theta": 150000.0})),  # YaRN, as released
    # Llama 4's text model: chunked attention, a routed + shared expert; its body is `.model` under the prefix
    # "language_model"
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", dict(
        head_dim=8, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=64)),
    # multi-head latent attention (low-rank q and kv projections, a decoupled rotary part); dense first layer, then
    # routed experts
    "deepseek-v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=4,
        n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, moe_intermediate_size=16, n_group=1,
        topk_group=1)),
    # hybrids: layers whose token mixer keeps a running state instead of keys and values
    "qwen3.5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(  # Gated DeltaNet linear attention + attention
        head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention"])),
    "qwen3.5-moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", dict(  # the same, with routed + shared experts
        head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        layer_types=["linear_attention", "full_attention"])),
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", dict(layer_types=["conv", "full_attention"])),  # short convolutions
    "granite4": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", dict(  # Mamba 2 layers
        layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_n_groups=1, mamba_d_state=8, mamba_d_head=16,
        mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16, num_local_experts=0, shared_intermediate_size=64)),
    "falcon-h1": ("FalconH1Config", "FalconH1ForCausalLM", dict(  # attention and Mamba 2 side by side in each layer
        head_dim=8, mamba_expand=2, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
        mamba_chunk_size=16)),
    # more families, each through the same matrix
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(head_dim=8, num_local_experts=4, num_experts_per_tok=2)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict()),  # Phi-1/2: partial rotary, parallel attention and MLP, fc1/fc2
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict()),  # partial rotary, LayerNorm
    "falcon": ("FalconConfig", "FalconForCausalLM", dict()),  # Falcon-7B's layout: multi-query, fused q/k/v
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(rotary_dim=4)),  # rotary on part of each head, interleaved
    "bloom": ("BloomConfig", "BloomForCausalLM", dict()),  # ALiBi: no position embedding, a bias per head
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=8)),
    # Command R: parallel attention and MLP, LayerNorm, logits scaled by `logit_scale` — 1 here, as OPT-350m's
    # init_std: at the released 0.0625 a tiny random model's logits are ~1e-3 and one PPO iteration hardly moves them
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=1.0)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict()),  # embedding, residual and logit multipliers
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict()),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(head_dim=8)),  # partial rotary, post-norms
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict()),  # LayerNorm without parameters
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
}


def tiny_arch_config(arch: str, tokenizer=None, hidden_size: int = 32, num_layers: int = 2, **overrides):
    """A tiny config of architecture `arch` (a key of ARCHITECTURES) from transformers' own config class: `hidden_size`
    wide, `num_layers` layers, 4 attention heads (2 KV heads where the family has GQA), vocab = the tiny tokenizer."""
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}.")
    tokenizer = tokenizer or tiny_tokenizer()
    cfg_name, _, extra = ARCHITECTURES[arch]
    ids = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               bos_token_id=None)
    if cfg_name == "GPT2Config":
        cfg = dict(n_embd=hidden_size, n_layer=num_layers, n_head=4, n_inner=2 * hidden_size, n_positions=256, **ids)
    elif cfg_name == "OPTConfig":
        cfg = dict(hidden_size=hidden_size, word_embed_proj_dim=hidden_size, num_hidden_layers=num_layers,
                   num_attention_heads=4, ffn_dim=2 * hidden_size, max_position_embeddings=256, **ids)
    elif cfg_name == "GPTNeoXConfig":
        cfg = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
                   intermediate_size=2 * hidden_size, max_position_embeddings=256, **ids)
    else:
        cfg = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **ids)
    cfg.update(extra)
    if "head_dim" in extra:
        cfg["head_dim"] = hidden_size // 4
        if "query_pre_attn_scalar" in extra:
            cfg["query_pre_attn_scalar"] = hidden_size // 4
    if "mamba_d_head" in extra:  # Mamba's heads span its inner width, expand × hidden
        cfg["mamba_d_head"] = extra["mamba_expand"] * hidden_size // extra["mamba_n_heads"]
        if "mamba_d_ssm" in extra:
            cfg["mamba_d_ssm"] = extra["mamba_expand"] * hidden_size
    if "shared_intermediate_size" in extra:  # Granite 4's dense MLP, as wide as the other families'
        cfg["shared_intermediate_size"] = 2 * hidden_size
    if "word_embed_proj_dim" in extra:
        cfg["word_embed_proj_dim"] = hidden_size // 2
    if "layer_types" in extra:
        cfg["layer_types"] = [extra["layer_types"][i % len(extra["layer_types"])] for i in range(num_layers)]
    cfg.update(overrides)
    return getattr(transformers, cfg_name)(**cfg)


def tiny_model_for(arch: str, tokenizer=None, seed: int = 0, **kw):
    """A random tiny causal LM of architecture `arch` (see ARCHITECTURES) for the tiny tokenizer; no network."""
    import transformers

    config = tiny_arch_config(arch, tokenizer, **kw)
    torch.manual_seed(seed)
    model = getattr(transformers, ARCHITECTURES[arch][1])(config)
    embedding = model.get_input_embeddings()
    if getattr(embedding, "padding_idx", None) is not None:  # a checkpoint's EOS / pad row is trained, not the zeros
        with torch.no_grad():  # of a fresh init (a recurrent layer gated by its input then outputs zeros there)
            embedding.weight[embedding.padding_idx].normal_(0.0, getattr(config, "initializer_range", 0.02))
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def save_tiny_model_for(path, arch: str, tokenizer=None, seed: int = 0, **kw) -> str:
    """`tiny_model_for` written as a local safetensors folder with the tokenizer (stands in for a hub checkpoint)."""
    tokenizer = tokenizer or tiny_tokenizer()
    tiny_model_for(arch, tokenizer, seed=seed, **kw).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)
