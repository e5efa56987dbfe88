"""Rendering and masks: the exact supervised token ids of every format, on two template styles."""

import json

import pytest

from mlx_ft.data.formats import Record, normalise
from mlx_ft.data.render import render
from mlx_ft.errors import DataError
from mlx_ft.recipe import DataConfig

EOT = "<|im_end|>"  # the tiny tokenizer's end-of-turn (= eos) token

# Mistral style: no generation prompt, the answer follows "[/INST]" directly and ends with eos.
MISTRAL_LIKE = (
    "{{ '<|endoftext|>' }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
)
# Like Qwen3: earlier assistant turns lose their reasoning, so history renders differently.
REWRITES_HISTORY = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _load_tokenizer(model_dir, template=None):
    from mlx_lm.tokenizer_utils import load

    tok = load(model_dir)
    if template is not None:
        tok._tokenizer.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return _load_tokenizer(tiny_model_dir)


def enc(tok, text):
    return tok._tokenizer.encode(text, add_special_tokens=False)


def supervised_runs(tokens, mask):
    """Contiguous runs of supervised ids: one per supervised turn."""
    runs, prev = [], False
    for t, m in zip(tokens, mask):
        if m and not prev:
            runs.append([])
        if m:
            runs[-1].append(t)
        prev = m
    return runs


def rec(raw, fmt, **cfg):
    return normalise(raw, fmt, DataConfig(**cfg), "test.jsonl:1")


CHAT = {"messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What colour is item 3?"},
    {"role": "assistant", "content": "Item 3 is red."},
    {"role": "user", "content": "Sure?"},
    {"role": "assistant", "content": "Yes, red."},
]}


def test_chat_assistant_turns_supervised_exactly(tok):
    tokens, mask = render(rec(CHAT, "chat"), tok, "assistant")
    eot = tok.convert_tokens_to_ids(EOT)
    assert len(tokens) == len(mask)
    # Each assistant turn: its content and its <|im_end|>; never the "\n" after it, the
    # "<|im_start|>assistant\n" header before it, nor anything of the user turns.
    assert supervised_runs(tokens, mask) == [enc(tok, "Item 3 is red.") + [eot], enc(tok, "Yes, red.") + [eot]]
    assert [t for t, m in zip(tokens, mask) if m] == enc(tok, "Item 3 is red.") + [eot] + enc(tok, "Yes, red.") + [eot]
    assert tok.decode(tokens) == tok.apply_chat_template(CHAT["messages"], tokenize=False)


def test_chat_train_on_last_and_all(tok):
    eot = tok.convert_tokens_to_ids(EOT)
    tokens, mask = render(rec(CHAT, "chat"), tok, "last")
    assert supervised_runs(tokens, mask) == [enc(tok, "Yes, red.") + [eot]]
    tokens, mask = render(rec(CHAT, "chat"), tok, "all")
    assert mask == [False] + [True] * (len(tokens) - 1)  # token 0 is never a target


def test_tools_supervises_tool_calls_not_tool_results(tok):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"city": {"type": "string"}}}}]
    raw = {"tools": tools, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "Sunny, 21 C."},
    ]}
    record = rec(raw, "tools")
    assert record.format == "tools" and record.tools == tools
    tokens, mask = render(record, tok, "assistant")
    eot = tok.convert_tokens_to_ids(EOT)
    call = '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert supervised_runs(tokens, mask) == [enc(tok, call) + [eot], enc(tok, "Sunny, 21 C.") + [eot]]
    assert "Tools:" in tok.decode(tokens)  # the tool schemas went through the template


def test_completions_with_custom_keys(tok):
    record = rec({"question": "2+2?", "answer": "4"}, "completions", prompt_key="question", completion_key="answer")
    tokens, mask = render(record, tok, "assistant")
    assert supervised_runs(tokens, mask) == [enc(tok, "4") + [tok.convert_tokens_to_ids(EOT)]]


def test_alpaca_input_goes_to_the_user_turn(tok):
    record = rec({"instruction": "Name the colour.", "input": "Item 5", "output": "Item 5 is blue."}, "alpaca")
    assert record.messages[0] == {"role": "user", "content": "Name the colour.\n\nItem 5"}
    tokens, mask = render(record, tok, "assistant")
    assert supervised_runs(tokens, mask) == [enc(tok, "Item 5 is blue.") + [tok.convert_tokens_to_ids(EOT)]]


def test_sharegpt_multi_turn(tok):
    raw = {"conversations": [{"from": "system", "value": "Answer briefly."},
                             {"from": "human", "value": "What colour is item 1?"},
                             {"from": "gpt", "value": "Item 1 is green."},
                             {"from": "human", "value": "Sure?"},
                             {"from": "gpt", "value": "Yes, green."}]}
    tokens, mask = render(rec(raw, "sharegpt"), tok, "assistant")
    eot = tok.convert_tokens_to_ids(EOT)
    assert supervised_runs(tokens, mask) == [enc(tok, "Item 1 is green.") + [eot], enc(tok, "Yes, green.") + [eot]]


def test_text_supervises_everything_and_ends_with_eos(tok):
    tokens, mask = render(rec({"body": "Item 1 is green. Item 2 is red."}, "text", text_key="body"), tok, "assistant")
    assert tokens == enc(tok, "Item 1 is green. Item 2 is red.") + [tok.eos_token_id]
    assert mask == [False] + [True] * (len(tokens) - 1)


def test_second_template_style_without_generation_prompt(tiny_model_dir):
    tok = _load_tokenizer(tiny_model_dir, MISTRAL_LIKE)
    msgs = [m for m in CHAT["messages"] if m["role"] != "system"]
    tokens, mask = render(Record("t:1", "chat", messages=msgs), tok, "assistant")
    eot = tok.convert_tokens_to_ids(EOT)
    # The space before the answer belongs to the answer here: the model has to produce it.
    assert supervised_runs(tokens, mask) == [enc(tok, " Item 3 is red.") + [eot], enc(tok, " Yes, red.") + [eot]]
    assert tok.decode(tokens).startswith("<|endoftext|>[INST] What colour")


def test_template_that_rewrites_history_is_an_error_not_a_wrong_mask(tiny_model_dir):
    tok = _load_tokenizer(tiny_model_dir, REWRITES_HISTORY)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>hmm</think>Hello."},
            {"role": "user", "content": "Again"}, {"role": "assistant", "content": "<think>ok</think>Hello again."}]
    with pytest.raises(DataError, match=r"t:1: .*assistant message 1.*train_on = 'last'"):
        render(Record("t:1", "chat", messages=msgs), tok, "assistant")
    tokens, mask = render(Record("t:1", "chat", messages=msgs), tok, "last")  # the way out the error names
    assert supervised_runs(tokens, mask) == [enc(tok, "<think>ok</think>Hello again.") + [tok.convert_tokens_to_ids(EOT)]]


def test_template_errors_name_the_record(tiny_model_dir):
    tok = _load_tokenizer(tiny_model_dir, "{{ raise_exception('roles must alternate') }}")
    bad = Record("data.jsonl:7", "chat", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(DataError, match=r"data.jsonl:7: the tokenizer's chat template cannot render.*alternate"):
        render(bad, tok, "assistant")


def test_json_roundtrip_of_tool_arguments_is_stable(tok):
    # Guard for the test above: the template's tojson writes ", " and ": " like json.dumps.
    call = {"name": "weather", "arguments": {"city": "Paris"}}
    text = tok.apply_chat_template([{"role": "assistant", "content": None, "tool_calls": [{"function": call}]}],
                                   tokenize=False)
    assert json.dumps(call) in text


def test_sentencepiece_tokenizer(tmp_path):
    """A Llama-2-style SentencePiece tokenizer: '▁' pieces after special tokens stay scaffolding."""
    from conftest import chat_corpus, corpus_texts

    from mlx_ft.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "spm", corpus_texts(chat_corpus(60)), tokenizer="spm")
    tok = _load_tokenizer(model_dir)
    tokens, mask = render(rec(CHAT, "chat"), tok, "assistant")
    runs = supervised_runs(tokens, mask)
    assert [tok.decode(r) for r in runs] == ["Item 3 is red.<|im_end|>", "Yes, red.<|im_end|>"]
    assert all(r[-1] == tok.convert_tokens_to_ids(EOT) for r in runs)
    pieces = tok._tokenizer.convert_ids_to_tokens(tokens)
    after = [i + 1 for i, p in enumerate(pieces[:-1]) if p == EOT]
    assert after and not any(mask[i] for i in after)  # the '▁' / newline after <|im_end|>


def test_conversation_opening_with_assistant(tok):
    msgs = [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Item 1 is red."}]
    tokens, mask = render(Record("t:1", "chat", messages=msgs), tok, "assistant")
    eot = tok.convert_tokens_to_ids(EOT)
    # Token 0 (<|im_start|>) is never a target, and the header is not supervised either.
    assert supervised_runs(tokens, mask) == [enc(tok, "Hello.") + [eot], enc(tok, "Item 1 is red.") + [eot]]
    calls_only = [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}] + msgs[1:]
    with pytest.raises(DataError, match=r"t:1: the conversation opens with an assistant message without text"):
        render(Record("t:1", "chat", messages=calls_only), tok, "assistant")
