"""Conversational data as people bring it — content as a list of parts, tool calls, a per-row `tools` column, long
multi-turn histories, fields a template does not render — in both trainers, each rendering checked against the
tokenizer's own `apply_chat_template`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer
from rlhf_ext.data import tokenize_prompts
from rlhf_ext.reward.ensemble import reward_input_ids
from rlhf_ext.testing import tiny_tokenizer

# A Qwen2.5-like template: a default system prompt, `tools`, assistant `tool_calls`, role `tool`, content as a
# string or a list of parts
TEMPLATE = (
    "{%- macro text(c) -%}{%- if c is string -%}{{ c }}{%- elif c is not none -%}{%- for p in c -%}"
    "{%- if p.type == 'text' -%}{{ p.text }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{%- if messages[0].role == 'system' -%}{{ '<|im_start|>system\n' + text(messages[0].content) }}"
    "{%- else -%}{{ '<|im_start|>system\nyou are helpful' }}{%- endif -%}"
    "{%- if tools -%}{{ '\ntools' }}{%- for t in tools -%}{{ ' ' + t.name }}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- for m in messages -%}{%- if not (loop.first and m.role == 'system') -%}"
    "{{ '<|im_start|>' + m.role + '\n' + text(m.content) }}"
    "{%- for c in m.tool_calls or [] -%}{{ ' call ' + c.function.name }}{%- endfor -%}{{ '<|im_end|>\n' }}"
    "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}")


@pytest.fixture
def chat_tok():
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def parts(text):
    return [{"type": "text", "text": text}]


def _args(**kw):
    base = dict(max_prompt_length=256, prompt_overflow="error", per_device_train_batch_size=1, disable_tqdm=True,
                process_index=0, chat_template_kwargs=None)
    return SimpleNamespace(**{**base, **kw})


def test_content_as_a_list_of_parts_is_rendered_as_the_template_renders_it(chat_tok, tmp_path, tiny_path):
    """`" ".join(m["content"] …)` raised "expected str instance, list found" in both trainers."""
    prompt = [{"role": "user", "content": parts("write a good review of the movie")}]
    ((row_prompt, row_ids),) = tokenize_prompts(Dataset.from_dict({"prompt": [prompt]}), chat_tok, _args())
    assert row_ids == chat_tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
    pairs = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": parts(f"a great movie {i}")}],
              "rejected": [{"role": "assistant", "content": parts(f"awful {i}")}]} for i in range(8)]
    args = RewardEnsembleConfig(str(tmp_path / "rm"), ensemble_size=2, max_steps=1, per_device_train_batch_size=8,
                                report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                                normalization_samples=8)
    tr = RewardEnsembleTrainer(tiny_path, args=args, train_dataset=Dataset.from_list(pairs), processing_class=chat_tok,
                               peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    first = tr.train_dataset[0]
    assert first["chosen_ids"] == chat_tok.apply_chat_template(pairs[0]["prompt"] + pairs[0]["chosen"], tokenize=True,
                                                               return_dict=True)["input_ids"]
    tr.train()


def test_a_tool_call_is_a_response_and_mixed_content_forms_are_named(chat_tok, tmp_path, tiny_path):
    from rlhf_ext.reward.preference_data import validate_preference_dataset

    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "paris"}}}]}
    rows = [{"prompt": [{"role": "user", "content": "weather in paris"}], "chosen": [call],
             "rejected": [{"role": "assistant", "content": "no idea"}]}] * 2
    assert len(validate_preference_dataset(Dataset.from_list(rows))) == 2  # was: "'chosen' is empty"
    mixed = [{"prompt": [{"role": "user", "content": parts("hi")}], "chosen": [{"role": "assistant", "content": "a"}],
              "rejected": [{"role": "assistant", "content": "b"}]}]
    with pytest.raises(ValueError, match=r"row 0: its messages mix text content and lists of content parts"):
        validate_preference_dataset(Dataset.from_list(mixed))


def test_a_rows_tools_reach_the_policy_prompt_and_the_reward_model(chat_tok):
    """TRL's reward trainer renders a row's `tools` into the template; PPO's prompts and the reward models scoring at
    PPO time rendered without them — the reward model judged another text than the one it trained on."""
    tools = [{"name": "get_weather", "parameters": {}}]
    prompt = [{"role": "user", "content": "weather in paris"}]
    data = Dataset.from_dict({"prompt": [prompt], "tools": [json.dumps(tools)]})
    ((row_prompt, row_ids),) = tokenize_prompts(data, chat_tok, _args())
    want = chat_tok.apply_chat_template(prompt, tools=tools, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    assert row_ids == want != chat_tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                           return_dict=True)["input_ids"]
    completion = [{"role": "assistant", "content": "sunny"}]
    assert reward_input_ids(chat_tok, prompt, completion, tools=json.dumps(tools)) == chat_tok.apply_chat_template(
        prompt + completion, tools=tools, tokenize=True, return_dict=True)["input_ids"]


def test_a_long_history_loses_its_earliest_turns_and_keeps_the_system_message(chat_tok):
    """`prompt_overflow="truncate"` cut the rendered ids from the left: the system message went first, the prompt
    began mid-message, and the reward models still judged the whole history."""
    system = {"role": "system", "content": "always answer in french"}
    history = [{"role": r, "content": f"{'question' if r == 'user' else 'answer'} {i} " + "good " * 20}
               for i in range(6) for r in ("user", "assistant")]
    prompt = [system, *history, {"role": "user", "content": "and now ?"}]
    render = lambda m: chat_tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True,  # noqa: E731
                                                    return_dict=True)["input_ids"]
    limit = len(render([system, *history[-4:], prompt[-1]])) + 1
    with pytest.warns(UserWarning, match=r"1 conversation\(s\) by their earliest turns \(the system message kept\)"):
        ((row_prompt, row_ids),) = tokenize_prompts(Dataset.from_dict({"prompt": [prompt]}), chat_tok,
                                  _args(max_prompt_length=limit, prompt_overflow="truncate"))
    assert row_prompt == [system, *history[-4:], prompt[-1]]  # whole turns, from a user turn on
    assert row_ids == render(row_prompt) and len(row_ids) <= limit


def test_pairs_that_tokenize_alike_are_dropped_with_a_count(chat_tok, tmp_path, tiny_path):
    """Pairs differing only in a field the template does not render (reasoning_content) trained as ties."""
    rows = [{"prompt": [{"role": "user", "content": "review the movie"}],
             "chosen": [{"role": "assistant", "content": f"good {i}", "reasoning_content": "think a"}],
             "rejected": [{"role": "assistant", "content": f"good {i}" if i % 2 else f"bad {i}",
                           "reasoning_content": "think b"}]} for i in range(8)]
    args = RewardEnsembleConfig(str(tmp_path / "rm"), ensemble_size=2, max_steps=1, per_device_train_batch_size=4,
                                report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                                normalization_samples=4)
    with pytest.warns(UserWarning, match=r"dropped 4 pair\(s\) whose chosen and rejected responses tokenize alike"):
        tr = RewardEnsembleTrainer(tiny_path, args=args, train_dataset=Dataset.from_list(rows),
                                   processing_class=chat_tok,
                                   peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert len(tr.train_dataset) == 4
    assert all(r["chosen_ids"] != r["rejected_ids"] for r in tr.train_dataset)
