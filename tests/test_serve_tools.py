"""`serve` tool calling: ``tools`` / ``tool_choice`` through the model's own chat template (a Qwen 2.5
template with tool support written into the tiny GGUF) or, for a template without it, the system message;
grammar-constrained calls; OpenAI's ``tool_calls`` shape, streaming included; tool messages in history."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import jsonschema
import openai
import pytest

from gguf_factory.runtime import load
from gguf_factory.serve import ModelPool
from gguf_factory.serve.app import _tool_events
from gguf_factory.serve.generation import chat_completion, render
from gguf_factory.serve.tools import (
    CallReader,
    ToolPlan,
    parse_calls,
    prepare,
    template_renders_tools,
    with_tool_calls,
)
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
    with serving(pool, max_tokens_limit=256) as u:
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


def test_streamed_call(client: openai.OpenAI) -> None:
    """The official client's stream of a required call: the name in the first delta, the arguments in
    fragments after it, together the non-streaming reply's arguments."""
    ask = {"model": "qwen", "messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 128,
           "temperature": 0}  # fmt: skip
    stream = client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name in SCHEMAS and first.function.arguments == ""
    assert len(rest) > 1 and all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0
    [call] = client.chat.completions.create(**ask).choices[0].message.tool_calls
    assert call.function.name == first.function.name
    assert call.function.arguments == "".join(d.function.arguments for d in rest)
    check_call(call)


# --- streaming: the reply read as it is generated ---------------------------------------------------------
@dataclass
class Streamed:
    """A raw chat stream put together: its content deltas, each call's first delta and argument
    fragments (by index), its finish reasons and its usage."""

    content: list[str] = field(default_factory=list)
    firsts: dict[int, dict[str, Any]] = field(default_factory=dict)
    fragments: dict[int, list[str]] = field(default_factory=dict)
    finishes: list[str] = field(default_factory=list)
    usage: dict[str, int] | None = None

    def arguments(self, index: int) -> str:
        return "".join(self.fragments[index])


def stream_raw(url: str, **body: Any) -> Streamed:
    """A tools request streamed over raw HTTP (SSE), each event checked for OpenAI's chunk shape."""
    body = {"model": "qwen", "messages": ASK, "tools": TOOLS, "temperature": 0, "max_tokens": 128, **body}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    out = Streamed()
    for e in events[1:]:
        assert e["object"] == "chat.completion.chunk"
        if not e["choices"]:
            out.usage = e["usage"]
            continue
        choice = e["choices"][0]
        delta = choice["delta"]
        if choice["finish_reason"]:
            assert delta == {}
            out.finishes.append(choice["finish_reason"])
        if "content" in delta:
            assert delta["content"] and set(delta) == {"content"}
            out.content.append(delta["content"])
        for call in delta.get("tool_calls", []):
            i = call["index"]
            if i not in out.firsts:
                out.firsts[i], out.fragments[i] = call, []
            else:
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
                out.fragments[i].append(call["function"]["arguments"])
    return out


def whole(url: str, **body: Any) -> dict[str, Any]:
    """The same request, not streamed: its choice."""
    body = {"model": "qwen", "messages": ASK, "tools": TOOLS, "temperature": 0, "max_tokens": 128, **body}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def assert_streamed_calls(streamed: Streamed, calls: list[dict[str, Any]]) -> None:
    """The stream sent ``calls`` (a non-streaming reply's): each one's first delta with its id, type and
    name, then its arguments in more than one fragment, together exactly the same text."""
    assert sorted(streamed.firsts) == list(range(len(calls)))
    for i, call in enumerate(calls):
        first = streamed.firsts[i]
        assert first["id"].startswith("call_") and first["type"] == "function"
        assert first["function"] == {"name": call["function"]["name"], "arguments": ""}
        assert len(streamed.fragments[i]) > 1, streamed.fragments[i]
        assert streamed.arguments(i) == call["function"]["arguments"]
    assert len({f["id"] for f in streamed.firsts.values()}) == len(calls)


@pytest.mark.parametrize("model", ["qwen", "plain"])
def test_streamed_required_and_named_calls_raw(url: str, model: str) -> None:
    """``required`` and a named function, streamed over raw SSE: the call's name as soon as it is complete,
    its arguments in fragments, no content, ``tool_calls``; the same call as the non-streaming reply."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    for tool_choice in ("required", named):
        choice = whole(url, model=model, tool_choice=tool_choice)
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        streamed = stream_raw(
            url, model=model, tool_choice=tool_choice, stream_options={"include_usage": True}
        )
        assert_streamed_calls(streamed, choice["message"]["tool_calls"])
        assert streamed.content == [] and streamed.finishes == ["tool_calls"]
        name = streamed.firsts[0]["function"]["name"]
        assert tool_choice == "required" or name == "get_weather"
        jsonschema.validate(json.loads(streamed.arguments(0)), SCHEMAS[name])
        assert streamed.usage is not None and streamed.usage["completion_tokens"] > 0


@pytest.mark.parametrize("model", ["qwen", "plain"])
def test_streamed_auto_text(url: str, model: str) -> None:
    """``auto`` with a reply that is plain text (the tiny model's, leading newlines included for "plain"):
    content deltas as generated, together the non-streaming content, no calls."""
    choice = whole(url, model=model, max_tokens=64)
    text = choice["message"]["content"]
    assert "tool_calls" not in choice["message"] and text.strip(), choice
    streamed = stream_raw(url, model=model, max_tokens=64)
    assert len(streamed.content) > 1 and "".join(streamed.content) == text
    assert streamed.firsts == {} and streamed.finishes == [choice["finish_reason"]]


TWO_CALLS = r'''root ::= "Let me look. <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"" [a-z]{2,8} "\", \"unit\": \"" ("c" | "f") "\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"tell_joke\", \"arguments\": {\"topic\": \"cats\"}}\n</tool_call>"'''  # noqa: E501
"""A grammar (llama.cpp's ``grammar`` extension) under which an ``auto`` reply is text, then two calls."""


def test_streamed_auto_text_then_calls(url: str) -> None:
    """An ``auto`` reply sampled under a grammar that makes it text then two calls: the text streams as
    content up to the tag, then calls 0 and 1 as a non-streaming reply reads them."""
    choice = whole(url, grammar=TWO_CALLS, max_tokens=256)
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "tell_joke"]
    streamed = stream_raw(url, grammar=TWO_CALLS, max_tokens=256)
    assert "".join(streamed.content) == "Let me look. "
    assert_streamed_calls(streamed, calls)
    assert streamed.finishes == ["tool_calls"]
    assert json.loads(streamed.arguments(1)) == {"topic": "cats"}


def test_tool_stream_disconnect(url: str, pool: ModelPool) -> None:
    """A client that hangs up mid-stream: the model is handed back, the server serves the next request."""
    body = {"model": "qwen", "messages": ASK, "tools": TOOLS, "tool_choice": "required", "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    assert_idle_soon(pool)
    assert whole(url, tool_choice="required")["finish_reason"] == "tool_calls"


def test_tool_stream_closes_generation_and_reports_errors(pool: ModelPool) -> None:
    """The tool stream is the one SSE path: closed early (a client gone), it closes llama.cpp's
    generation; a generation that fails mid-stream is one error event and ``[DONE]``."""
    plan = ToolPlan(TOOLS, "required")
    with pool.use("qwen") as m:
        msgs, variables = prepare(m, ASK, plan)
        settings = {
            "grammar": plan.grammar(tagged=True),
            "variables": variables,
            "max_tokens": 64,
            "temperature": 0,
        }
        chunks = chat_completion(m, msgs, stream=True, **settings)
        events = _tool_events(plan)(chunks, "c1", 7, "qwen", m, 3, False)
        assert [next(events).startswith("data: ") for _ in range(3)] == [True] * 3
        events.close()
        assert chunks.gi_frame is None  # closed: llama.cpp generates no further

        def failing() -> Iterator[dict[str, Any]]:
            real = chat_completion(m, msgs, stream=True, **settings)
            try:
                yield from itertools.islice(real, 6)
            finally:
                real.close()
            raise ValueError("the model failed")

        out = list(_tool_events(plan)(failing(), "c2", 7, "qwen", m, 3, True))
    assert out[-1] == "data: [DONE]\n\n"
    assert json.loads(out[-2][6:])["error"]["message"] == "the model failed"
    assert all('finish_reason": "tool_calls' not in e for e in out)


# --- the reader, on crafted pieces -------------------------------------------------------------------------
def read(pieces: list[str], names: tuple[str, ...] = ("get_weather",)) -> tuple[list[list[dict]], CallReader]:
    """What a reader lets go for each piece, and at the end; call ids replaced by ``ID``."""
    reader = CallReader(names)
    out = [reader.feed(p) for p in pieces] + [reader.close()]
    for deltas in out:
        for d in deltas:
            for call in d.get("tool_calls", []):
                if "id" in call:
                    assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"])
                    call["id"] = "ID"
    return out, reader


def head(index: int, name: str) -> dict[str, Any]:
    function = {"name": name, "arguments": ""}
    return {"tool_calls": [{"index": index, "id": "ID", "type": "function", "function": function}]}


def frag(index: int, text: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "function": {"arguments": text}}]}


def said(t: str) -> dict[str, str]:
    return {"content": t}


def test_reader_holds_back_only_what_may_start_a_call() -> None:
    out, reader = read(["Hi <tool", "box> and ", "<", "b>"])
    assert out == [[said("Hi ")], [said("<toolbox> and ")], [], [said("<b>")], []]
    assert reader.finish_reason("stop") == "stop" and reader.tool_calls() == []
    out, reader = read(["Hi <tool", '_call>\n{"name": "get_wea', 'ther", "arguments": {"ci', 'ty": "Oslo"}}',
                        "\n</tool_call>", "\n"])  # fmt: skip
    assert out == [[said("Hi ")], [], [head(0, "get_weather"), frag(0, '{"ci')], [frag(0, 'ty": "Oslo"}')],
                   [], [], []]  # fmt: skip
    assert reader.finish_reason("stop") == "tool_calls" and reader.finish_reason("length") == "length"
    assert [c["function"] for c in reader.tool_calls()] == [
        {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    ]
    # a reply that starts with "{": held while it may be a call object
    out, _ = read(["  {", '"name": "other"', ', "x": 1}'])
    assert out == [[], [said('  {"name": "other"')], [said(', "x": 1}')], []]
    out, _ = read(['{"name": "get_weather", "parameters": {"city"', ': "X"}}', " "])
    assert out == [[head(0, "get_weather"), frag(0, '{"city"')], [frag(0, ': "X"}')], [], []]
    out, _ = read(['{"arguments": {"city": "X"}, ', '"name": "get_weather"}'])  # the name last
    assert out == [[], [head(0, "get_weather"), frag(0, '{"city": "X"}')], []]
    out, _ = read(["[TOOL", "S are fun"])
    assert out == [[], [said("[TOOLS are fun")], []]
    # whitespace: content in a plain reply, not around calls
    assert read(["\n\n", "Hello"])[0] == [[], [said("\n\nHello")], []]
    assert read(["\n", " "])[0] == [[], [], [said("\n ")]]
    out, _ = read(['<tool_call>{"name": "get_weather"}</tool_call>', "\n", "bye", "\n"])
    assert out == [[head(0, "get_weather"), frag(0, "{}")], [], [said("\nbye")], [said("\n")], []]


def test_reader_mistral_and_several_calls() -> None:
    names = ("get_weather", "get_time")
    out, reader = read(
        ["[TOOL_", "CALLS]get_weather[AR", 'GS]{"city": 1}', "[TOOL_CALLS]get_time[ARGS]{}"], names
    )
    weather, time = [head(0, "get_weather"), frag(0, '{"city": 1}')], [head(1, "get_time"), frag(1, "{}")]
    assert out == [[], [], weather, time, []]
    assert [c["function"]["name"] for c in reader.tool_calls()] == ["get_weather", "get_time"]
    out, reader = read(
        ['[{"name": "get_time", "arguments": "{\\"tz\\"', ': 1}"}, {"name": "get_weather"}]'], names
    )
    assert out == [[head(0, "get_time")], [frag(0, '{"tz": 1}'), head(1, "get_weather"), frag(1, "{}")], []]
    out, reader = read(['[TOOL_CALLS]get_weather[ARGS]{"city": '], names)  # cut short: sent, but no call
    assert out == [[head(0, "get_weather"), frag(0, '{"city": ')], []] and reader.tool_calls() == []


ODD = '{"s": "a\\"}b{", "n": [1, {"x": -2.5e3}]}'  # brackets and an escaped quote inside a string
REPLIES = [  # a reply; its content; the calls it sends; whether they parse (parse_calls gives them)
    ('Sure! <tool_call>\n{"arguments": {"city": "Oslo"}, "name": "get_weather"}\n</tool_call>\n'
     f'<tool_call>\n{{"name": "get_time", "arguments": {ODD}}}\n</tool_call>\n',
     "Sure! ", [("get_weather", '{"city": "Oslo"}'), ("get_time", ODD)], True),
    ('{"name": "get_weather", "parameters": {"city": "X"}}', "", [("get_weather", '{"city": "X"}')], True),
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time"}]',
     "", [("get_weather", '{"city": "Oslo"}'), ("get_time", "{}")], True),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]get_time[ARGS] "{\\"tz\\": 1}"',
     "", [("get_weather", '{"city": "Rome"}'), ("get_time", '{"tz": 1}')], True),
    ('  {"name": "other", "arguments": {}} then <tool', '  {"name": "other", "arguments": {}} then <tool',
     [], False),
    ("\n\nplain text [1, 2] <b>", "\n\nplain text [1, 2] <b>", [], False),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"a": 1}, junk} tail', "junk} tail",
     [("get_weather", '{"a": 1}')], False),
    ('<tool_call>{"name": "get_time", "arguments": {"a": ', "", [("get_time", '{"a": ')], False),
]  # fmt: skip


@pytest.mark.parametrize(("reply", "content", "calls", "parse"), REPLIES)
def test_reader_same_in_any_pieces(
    reply: str, content: str, calls: list[tuple[str, str]], parse: bool
) -> None:
    """However a reply comes in pieces (whole, a character at a time, split anywhere in two), the same
    content and calls go out; the calls' argument fragments put together are :func:`parse_calls`'."""
    names = ("get_weather", "get_time")

    def put_together(pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
        out, reader = read(pieces, names)
        deltas = [d for ds in out for d in ds]
        sent = [(c["function"]["name"], "") for d in deltas for c in d.get("tool_calls", []) if "id" in c]
        for d in deltas:
            for c in d.get("tool_calls", []):
                name, args = sent[c["index"]]
                sent[c["index"]] = (name, args + c["function"]["arguments"])
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in reader.tool_calls()] == (
            sent if parse else []
        )
        return "".join(d.get("content", "") for d in deltas), sent

    splits = [[reply], list(reply)] + [[reply[:i], reply[i:]] for i in range(1, len(reply))]
    for pieces in splits:
        assert put_together(pieces) == (content, calls), pieces
    parsed = [(c["function"]["name"], c["function"]["arguments"]) for c in parse_calls(reply, names)]
    assert parsed == (calls if parse else [])


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
