"""`serve` tool calling: ``tools`` / ``tool_choice`` through the model's own chat template (a Qwen 2.5
template with tool support written into the tiny GGUF) or, for a template without it, the system message;
grammar-constrained calls; OpenAI's ``tool_calls`` shape, streaming included; tool messages in history."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import jsonschema
import openai
import pytest

from gguf_factory.runtime import load
from gguf_factory.serve import ModelPool
from gguf_factory.serve.generation import render
from gguf_factory.serve.tools import ToolPlan, parse_calls, prepare, template_renders_tools, with_tool_calls
from serve_helpers import assert_error, assert_idle_soon, client_of, pool_of, serving
from test_hardening import with_template

QWEN25_TOOLS = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a bot.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools>\\n\\nReturn calls as <tool_call>\\n{\\"name\\": ..., \\"arguments\\": ...}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""  # noqa: E501
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "tell_joke", "parameters": {"type": "object", "properties": {
        "topic": {"enum": ["food", "cats"]}}, "required": ["topic"]}}},
]  # fmt: skip
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HISTORY = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
            }
        ],
    },  # fmt: skip
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]


@pytest.fixture(scope="module")
def qwen_gguf(tiny_f16_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_template(tiny_f16_gguf, tmp_path_factory.mktemp("tools") / "qwen.gguf", QWEN25_TOOLS)


@pytest.fixture(scope="module")
def pool(tiny_f16_gguf: Path, qwen_gguf: Path) -> Iterator[ModelPool]:
    with pool_of({"qwen": qwen_gguf, "plain": tiny_f16_gguf}, n_ctx=1024) as p:
        yield p


@pytest.fixture(scope="module")
def url(pool: ModelPool) -> Iterator[str]:
    with serving(pool, max_tokens_limit=128) as u:
        yield u


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return client_of(url)


def check_call(call: Any, names: tuple[str, ...] = ("get_weather", "tell_joke")) -> dict[str, Any]:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


@pytest.mark.parametrize("model", ["qwen", "plain"])
def test_required_and_named_calls(client: openai.OpenAI, model: str) -> None:
    for seed in range(3):
        r = client.chat.completions.create(
            model=model, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed,
            max_tokens=128,
        )  # fmt: skip
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        assert len(choice.message.tool_calls) == 1
        check_call(choice.message.tool_calls[0])
    named = {"type": "function", "function": {"name": "tell_joke"}}
    r = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=128
    )
    [call] = r.choices[0].message.tool_calls
    assert check_call(call, ("tell_joke",))["topic"] in ("food", "cats")


def test_streamed_call(client: openai.OpenAI, url: str) -> None:
    stream = client.chat.completions.create(
        model="qwen", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=128, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0
    check_call(deltas[0])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0
    plain = client.chat.completions.create(
        model="qwen", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=128
    )
    assert plain.choices[0].message.tool_calls[0].function.arguments == deltas[0].function.arguments


def test_tool_messages_in_history(client: openai.OpenAI, qwen_gguf: Path, pool: ModelPool) -> None:
    r = client.chat.completions.create(model="qwen", messages=HISTORY, tools=TOOLS, max_tokens=16)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    with_history = r.usage.prompt_tokens
    r = client.chat.completions.create(model="qwen", messages=ASK, tools=TOOLS, max_tokens=4)
    assert with_history > r.usage.prompt_tokens
    r = client.chat.completions.create(model="qwen", messages=HISTORY, max_tokens=4)  # no tools: still fine
    assert r.choices[0].message.content is not None
    with load(qwen_gguf, n_ctx=1024) as m:
        plan = ToolPlan(TOOLS, "auto")
        msgs, variables = prepare(m, HISTORY, plan)
        text = render(m, msgs, **variables)
        assert '"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}' in text, text
        assert '<tool_response>\n{"temp": 21}\n</tool_response>' in text
        assert '"name": "tell_joke"' in text  # the tools, rendered by the model's own template
        assert template_renders_tools(m)
    with pool.use("plain") as m:
        assert not template_renders_tools(m)
        msgs, variables = prepare(m, ASK, ToolPlan(TOOLS, "auto"))
        assert variables == {} and msgs[0]["role"] == "system" and "<tools>" in msgs[0]["content"]


def test_auto_and_none(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="qwen", messages=ASK, tools=TOOLS, max_tokens=32)
    choice = r.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        check_call(choice.message.tool_calls[0])
    else:
        assert choice.message.content is not None
    r = client.chat.completions.create(
        model="qwen", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content is not None
    # the deprecated functions / function_call names
    legacy = {"functions": [t["function"] for t in TOOLS], "function_call": {"name": "get_weather"}}
    r = client.chat.completions.create(model="qwen", messages=ASK, max_tokens=128, extra_body=legacy)
    check_call(r.choices[0].message.tool_calls[0], ("get_weather",))


def test_parse_calls() -> None:
    names = ["get_weather"]
    tagged = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>'
    [call] = parse_calls(tagged, names)
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}
    two = parse_calls(tagged + "\n" + tagged.replace("Oslo", "Rome"), names)
    assert [json.loads(c["function"]["arguments"])["city"] for c in two] == ["Oslo", "Rome"]
    assert parse_calls('{"name": "get_weather", "parameters": {"city": "X"}}', names)[0]["function"][
        "arguments"] == '{"city": "X"}'  # fmt: skip
    for text in ("just words", '{"name": "other", "arguments": {}}', "<tool_call>{broken</tool_call>", ""):
        assert parse_calls(text, names) == []
    out = {"choices": [{"message": {"content": tagged}, "finish_reason": "stop"}]}
    choice = with_tool_calls(out, ToolPlan(TOOLS, "auto"))["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None


def test_parse_mistral_calls() -> None:
    """Mistral's formats: ``[TOOL_CALLS]`` + a JSON list (v3 tokenizers, Mistral 7B v0.3 / Nemo), the
    same list with the control token dropped by detokenization, and ``[TOOL_CALLS]name[ARGS]{...}`` (v11
    tokenizers, Mistral Small 3.2 / Magistral), once per call."""
    names = ["get_weather", "get_time"]

    def args(calls: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
        return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]

    v3 = (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
        '{"name": "get_time", "arguments": {}}]'
    )
    assert args(parse_calls(v3, names)) == [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert args(parse_calls(v3.replace("[TOOL_CALLS] ", ""), names)) == args(parse_calls(v3, names))
    assert args(parse_calls(v3 + "</s>", names))[0] == ("get_weather", {"city": "Oslo"})
    v11 = '[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}'
    assert args(parse_calls(v11, names)) == [("get_weather", {"city": "Rome"}), ("get_time", {"tz": "CET"})]
    for text in (
        "[TOOL_CALLS]",
        "[TOOL_CALLS] []",
        '[TOOL_CALLS] [{"name": "other", "arguments": {}}]',
        '[TOOL_CALLS]get_weather{"city": "Rome"}',  # no [ARGS]
        '[TOOL_CALLS]get_weather[ARGS]{"city": ',
        "[1, 2]",
        "[{broken",
    ):
        assert parse_calls(text, names) == [], text
    one = '[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}'
    out = {"choices": [{"message": {"content": one}, "finish_reason": "stop"}]}
    choice = with_tool_calls(out, ToolPlan(TOOLS, "auto"))["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None


def test_tool_errors(url: str, pool: ModelPool) -> None:
    def post(**body: Any) -> httpx.Response:
        return httpx.post(
            f"{url}/v1/chat/completions", json={"model": "qwen", "messages": ASK, **body}, timeout=60
        )

    missing = {"type": "function", "function": {"name": "nope"}}
    assert assert_error(post(tools=TOOLS, tool_choice=missing), 400, says="nope")["param"] == "tool_choice"
    assert assert_error(post(tool_choice="required"), 400, says="no tools")["param"] == "tool_choice"
    bad_name = [{"type": "function", "function": {"name": "no spaces please"}}]
    assert assert_error(post(tools=bad_name), 400)["param"] == "tools.0.function.name"
    assert assert_error(post(tools=[{"type": "retrieval"}]), 400)["param"] == "tools.0"
    twice = [TOOLS[0], TOOLS[0]]
    assert_error(post(tools=twice), 400, says="defined twice")
    loose = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 1}}}}}]  # fmt: skip
    err = assert_error(post(tools=loose, tool_choice="required"), 400, says="minimum")
    assert err["param"] == "tools.0.function.parameters.properties.n.minimum"
    assert post(tools=loose, max_tokens=4).status_code == 200  # auto: the model is free, nothing to enforce
    assert_error(post(tool_choice="maybe", tools=TOOLS), 400, says="required")
    no_id = [*ASK, {"role": "tool", "content": "21"}]
    assert_error(post(messages=no_id), 400, says="tool_call_id")
    assert_error(post(messages=[{"role": "assistant"}]), 400, says="needs content")
    rf = {"type": "json_object"}
    assert assert_error(post(tools=TOOLS, tool_choice="required", response_format=rf), 400)["param"] == (
        "response_format"
    )
    assert_idle_soon(pool)
