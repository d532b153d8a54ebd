"""Tool definitions, tool calls and tool results in an Ollama TEMPLATE: the probe data, how a chat
template's renders are cut into per-part formats, and the JSON both sides write.

Nothing here renders a template: :mod:`.ollama_template` asks the sandboxed worker for renders of probe
conversations and hands the texts to the functions here, which find the probe's marker strings and JSON
objects in them. A tool list is rendered at one place as ``json(t1) + sep + json(t2) + ...``; an
assistant message with tool calls as its content part, then ``open + name + mid + json(arguments)`` per
call (``sep`` between calls) and ``close``; a run of tool messages as ``first + c1 + sep + c2 + ... +
last``. Anything else raises :class:`ToolsUnsupported` with the reason, and the export goes without tools.

Ollama's template data (facts of its Go source, template/template.go and api/types.go): ``.Tools`` is a
list of tools, each with ``.Type`` and ``.Function`` (``.Name``, ``.Description``, ``.Parameters``); a
message has ``.Role``, ``.Content``, ``.ToolCalls`` (each with ``.ID`` and ``.Function``: ``.Index``,
``.Name``, ``.Arguments``, a map), ``.ToolName`` (a tool result's tool name: Ollama 0.9.6 on; its OpenAI
endpoint fills it from a tool message's ``name``) and ``.ToolCallID`` (the id of the call a tool result
answers: Ollama 0.12.10 on, as is a call's ``.ID``); the ``json`` template function
is Go's ``json.Marshal``: compact, map keys sorted, struct fields in their declared order, ``<``, ``>`` and
``&`` escaped. A Jinja template's ``tojson`` is Python's ``json.dumps`` (``", "`` and ``": "`` separators
unless told otherwise, keys in the caller's order). The two cannot be byte-identical in general, so the
Go template writes Go's JSON and every comparison of the two renders compares the JSON after parsing
(:func:`json_normalized`); the text around the JSON is compared byte for byte. The Python model of the
Jinja render (used to verify the decomposition against the Jinja template itself) writes the JSON in the
layout the template was seen to use (:data:`JSON_LAYOUTS`), so that check stays byte-exact; only for a
layout json.dumps does not give on its own (e.g. objects nested in an indented list) does it compare the
JSON after parsing there too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

TOOLS_SLOT = "\x00tools\x00"  # stands for the tool list inside a ChatFormat piece

# json.dumps keyword arguments of the layouts a template's ``tojson`` may use
JSON_LAYOUTS: list[dict[str, Any]] = [
    {"sort_keys": s, **kw}
    for s in (False, True)
    for kw in ({}, {"separators": (",", ":")}, {"indent": 2}, {"indent": 4})
]


class ToolsUnsupported(Exception):
    """The chat template's tool parts cannot be reproduced by a Go template (the message says why)."""


def _m(kind: str, n: int) -> str:
    return f"Zq{kind}{n}mK"  # kinds F D P Q N K V E: apart from the role markers (S U A T)


def _id(kind: str, n: int) -> str:
    """An id marker: 9 alphanumeric characters (Mistral's templates refuse other ids), kinds I C."""
    return f"Zq{kind}{n:04d}mK"


# Slots in a tool part's literal text: the Ollama field that stands there (``cur``: of this tool call or
# tool message; ``prev``: of the one before it in the run, or of the last one at the run's end).
CALL_ID, PREV_CALL_ID = "\x00id\x00", "\x00pid\x00"
TOOL_NAME, PREV_TOOL_NAME = "\x00name\x00", "\x00pname\x00"
CALL_REF, PREV_CALL_REF = "\x00ref\x00", "\x00pref\x00"
SLOTS = (CALL_ID, PREV_CALL_ID, TOOL_NAME, PREV_TOOL_NAME, CALL_REF, PREV_CALL_REF)
# what each probe field is, and the Ollama field that carries it
FIELDS = {
    "id": "a tool call's id (tool_calls[i].id; Ollama's .ID)",
    "name": "a tool result's tool name (message.name; Ollama's .ToolName)",
    "tool_call_id": "a tool result's call id (message.tool_call_id; Ollama's .ToolCallID)",
}


def probe_tool(n: int) -> dict[str, Any]:
    """A tool definition in Ollama's shape whose strings are markers."""
    return {
        "type": "function",
        "function": {
            "name": _m("F", n),
            "description": _m("D", n),
            "parameters": {
                "type": "object",
                "properties": {_m("P", n): {"type": "string", "description": _m("Q", n)}},
                "required": [_m("P", n)],
            },
        },
    }


def probe_call(n: int) -> dict[str, Any]:
    function = {"name": _m("N", n), "arguments": {_m("K", n): _m("V", n)}}
    return {"id": _id("I", n), "type": "function", "function": function}


def calls_message(first: int, count: int, content: str = "") -> dict[str, Any]:
    """An assistant message with ``count`` tool calls (probe_call(first), ...)."""
    calls = [probe_call(first + k) for k in range(count)]
    return {"role": "assistant", "content": content, "tool_calls": calls}


def tool_message(content: str, n: int = 0) -> dict[str, Any]:
    """A tool result; with ``n``, with a tool name and a call id (markers) as OpenAI-style clients send."""
    if not n:
        return {"role": "tool", "content": content}
    return {"role": "tool", "content": content, "name": _m("E", n), "tool_call_id": _id("C", n)}


def fill(text: str, values: dict[str, str]) -> str:
    """``text`` with each slot replaced by its value (a missing field: empty, as Go prints it)."""
    for slot in SLOTS:
        if slot in text:
            text = text.replace(slot, values.get(slot, ""))
    return text


def slotted(text: str, values: dict[str, str]) -> str:
    """``text`` (a piece of a render) with each probe value replaced by its slot."""
    for slot, value in values.items():
        if value:
            text = text.replace(value, slot)
    return text


def call_values(calls: list[dict[str, Any]], k: int) -> dict[str, str]:
    """The slots' values in the text around call ``k`` (-1: none) after call ``k - 1`` (-1: none)."""
    out = {}
    if 0 <= k < len(calls):
        out[CALL_ID] = calls[k].get("id") or ""
    if k - 1 >= 0:
        out[PREV_CALL_ID] = calls[k - 1].get("id") or ""
    return out


def result_values(messages: list[dict[str, Any]], i: int, prev: bool) -> dict[str, str]:
    out = {TOOL_NAME: messages[i].get("name") or "", CALL_REF: messages[i].get("tool_call_id") or ""}
    if prev and i > 0:
        out[PREV_TOOL_NAME] = messages[i - 1].get("name") or ""
        out[PREV_CALL_REF] = messages[i - 1].get("tool_call_id") or ""
    return out


_FIELD_OF_KIND = {"I": "id", "E": "name", "C": "tool_call_id"}


def leftover_field(text: str) -> str | None:
    """The probe field whose marker ``text`` still holds where no Ollama field can stand (None: none)."""
    for kind, what in _FIELD_OF_KIND.items():
        if re.search(f"Zq{kind}\\d+mK", text):
            return FIELDS[what]
    return None


# ---------------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------------

_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def go_json(obj: Any) -> str:
    """JSON as Go's json.Marshal writes it for a map: compact, keys sorted, HTML characters escaped.
    (For Ollama's tool structs the field order differs: compare after parsing.)"""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return "".join(_GO_ESCAPES.get(ch, ch) for ch in text)


def dumps(obj: Any, layout: dict[str, Any] | None) -> str:
    """``obj`` as a Jinja template's ``tojson`` with these keyword arguments writes it (None: a layout
    json.dumps does not give; compact, to be compared after parsing)."""
    if layout is None:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return json.dumps(obj, ensure_ascii=False, **layout)


def _objects(text: str, start: int = 0) -> Iterator[tuple[int, int, Any]]:
    """(start, end, value) of each JSON object in ``text``, left to right, outermost first."""
    decoder = json.JSONDecoder()
    i = text.find("{", start)
    while i >= 0:
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        yield i, end, value
        i = text.find("{", i + 1)


def find_json(text: str, obj: Any, start: int = 0) -> tuple[int, int] | None:
    """The span of the first JSON object in ``text`` (from ``start``) that parses to ``obj``."""
    for s, e, value in _objects(text, start):
        if value == obj:
            return s, e
    return None


def json_normalized(text: str) -> str:
    """``text`` with each JSON object rewritten canonically (keys sorted, compact): two texts that differ
    only in how their JSON objects are laid out (key order, spacing, escapes) normalize alike."""
    out: list[str] = []
    pos = 0
    for s, e, value in _objects(text):
        if s < pos:
            continue  # inside an object already rewritten
        out += [text[pos:s], json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)]
        pos = e
    return "".join(out) + text[pos:]


def json_layout(text: str, obj: Any) -> dict[str, Any] | None:
    """The ``tojson`` keyword arguments that write ``obj`` as ``text`` (None: none of JSON_LAYOUTS)."""
    for layout in JSON_LAYOUTS:
        if dumps(obj, layout) == text:
            return layout
    return None


def _last_json(text: str, obj: Any, what: str) -> int:
    """Where the JSON of ``obj`` that ends ``text`` starts."""
    for s, e, value in _objects(text):
        if e == len(text) and value == obj:
            return s
    raise ToolsUnsupported(f"the chat template does not write {what} one after the other: {text[:200]!r}")


# ---------------------------------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------------------------------


@dataclass
class ToolsFormat:
    """The tool list, where TOOLS_SLOT stands: ``json(t1) + sep + json(t2) + ...``; each item the JSON of
    the whole tool or (``function_only``) of its ``function`` object."""

    sep: str
    function_only: bool
    layout: dict[str, Any] | None

    def item(self, tool: dict[str, Any]) -> Any:
        return tool["function"] if self.function_only else tool

    def render(self, tools: list[dict[str, Any]], go: bool) -> str:
        return self.sep.join(go_json(self.item(t)) if go else dumps(self.item(t), self.layout) for t in tools)


@dataclass
class CallFormat:
    """An assistant message with tool calls: ``with_content[0] + content + with_content[1]`` (or
    ``no_content`` when the content is empty, or always when ``with_content`` is None: the template drops
    it), then ``open``, per call ``name + mid + json(arguments)`` with ``sep`` between calls, ``close``, and
    the end of turn ``suffix`` (left out when Ollama continues the last message)."""

    no_content: str
    with_content: tuple[str, str] | None
    open: str
    mid: str
    sep: str
    close: str
    suffix: str
    layout: dict[str, Any] | None
    single: bool = False  # the template refuses more than one call in a message: calls are joined by ``sep``

    def render(self, message: dict[str, Any], close: bool, go: bool) -> list[str]:
        """Slots in ``open`` stand for the first call's fields, in ``mid`` for this call's, in ``sep`` for
        this and the previous call's, in ``close`` and ``suffix`` (as the previous call's) for the last
        one's."""
        calls = message["tool_calls"]
        content = message.get("content") or ""
        out = [self.with_content[0], content, self.with_content[1]] if content and self.with_content else []
        out = out or [self.no_content]
        out.append(fill(self.open, call_values(calls, 0)))
        for k, call in enumerate(calls):
            f = call["function"]
            args = go_json(f["arguments"]) if go else dumps(f["arguments"], self.layout)
            values = call_values(calls, k)
            out += [fill(self.sep, values) if k else "", f["name"], fill(self.mid, values), args]
        end = call_values(calls, len(calls))
        out += [fill(self.close, end), fill(self.suffix, end) if close else ""]
        return out


@dataclass
class ResultFormat:
    """Tool results: a run of consecutive tool messages is ``first + c1 + sep + c2 + ... + last``; each
    content as it is or (``json_content``) as a JSON string. Slots stand for the message's tool name and
    call id (in ``sep`` also for the previous message's)."""

    first: str
    sep: str
    last: str
    json_content: bool = False

    def render(self, messages: list[dict[str, Any]], i: int, go: bool = False) -> list[str]:
        prev_tool = i > 0 and messages[i - 1]["role"] == "tool"
        next_tool = i + 1 < len(messages) and messages[i + 1]["role"] == "tool"
        values = result_values(messages, i, prev_tool)
        content = messages[i]["content"]
        if self.json_content:
            content = go_json(content) if go else json.dumps(content, ensure_ascii=False)
        opening = fill(self.sep if prev_tool else self.first, values)
        return [opening, content, "" if next_tool else fill(self.last, values)]


# ---------------------------------------------------------------------------------------------------
# derivation from rendered texts
# ---------------------------------------------------------------------------------------------------


def _around(text: str, marker: str, what: str) -> tuple[str, str]:
    n = text.count(marker)
    if n != 1:
        how = "does not write" if n == 0 else "repeats"
        raise ToolsUnsupported(f"the chat template {how} {what} (the turn renders {text[:200]!r})")
    before, _, after = text.partition(marker)
    return before, after


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n :]


def tools_format(one: str, two: str, tools: list[dict[str, Any]]) -> tuple[ToolsFormat, str]:
    """The tool-list format and the first tool's text, from one conversation rendered with ``tools[:1]``
    (``one``) and with ``tools[:2]`` (``two``)."""
    t1, t2 = tools[0], tools[1]
    function_only = False
    span = find_json(one, t1)
    if span is None:
        span, function_only = find_json(one, t1["function"]), True
    if span is None:
        name = t1["function"]["name"]
        at = one.find(name)
        raise ToolsUnsupported(
            "the chat template writes tool definitions other than as the JSON of the tool or of its "
            f"function: {one[max(0, at - 60) : at + 60]!r}"
        )
    fmt = ToolsFormat(sep="", function_only=function_only, layout=None)
    s, e = span
    fmt.layout = json_layout(one[s:e], fmt.item(t1))
    head, tail = one[:e], one[e:]
    if not (two.startswith(head) and two.endswith(tail)) or len(two) < len(head + tail):
        raise ToolsUnsupported(f"the chat template writes a second tool unlike the first: {two[:200]!r}")
    rest = two[len(head) : len(two) - len(tail)]
    fmt.sep = rest[: _last_json(rest, fmt.item(t2), "two tools")]
    return fmt, one[s:e]


def call_format(
    empty1: str,
    empty2: str | None,
    with_text: str,
    content: str,
    calls: list[dict[str, Any]],
    suffix: str,
    prefix: str = "",
) -> CallFormat:
    """The tool-call format from an assistant turn with the first of ``calls`` (``empty1``), with both
    (``empty2``; None: the template refuses two calls in a message), without content, and with ``content``
    and both calls (one when ``empty2`` is None: ``with_text``); ``suffix`` and ``prefix`` are the plain
    assistant turn's end and start. A call's id is found where the template writes it (a slot)."""
    f1 = calls[0]["function"]
    pre, rest = _around(empty1, f1["name"], "a tool call's name")
    span = find_json(rest, f1["arguments"])
    if span is None:
        raise ToolsUnsupported(f"the chat template writes tool-call arguments not as JSON: {rest[:99]!r}")
    mid, args, post = rest[: span[0]], rest[span[0] : span[1]], rest[span[1] :]
    layout = json_layout(args, f1["arguments"])
    mid_s, post_s = slotted(mid, call_values(calls, 0)), slotted(post, call_values(calls, 1))
    first = pre + f1["name"] + mid + args
    sep = ""
    call_text = empty1[len(pre) :]
    if empty2 is not None:
        f2 = calls[1]["function"]
        post2 = fill(post_s, call_values(calls, 2))
        ok = empty2.startswith(first) and empty2.endswith(post2) and len(empty2) >= len(first + post2)
        rest = empty2[len(first) : len(empty2) - len(post2)] if ok else ""
        second = f2["name"] + fill(mid_s, call_values(calls, 1))
        at = rest.find(second)
        if at < 0 or _last_json(rest[at + len(second) :], f2["arguments"], "two tool calls") != 0:
            raise ToolsUnsupported(
                f"the chat template writes a 2nd tool call unlike the first: {empty2[:160]!r}"
            )
        sep = slotted(rest[:at], call_values(calls, 1))
        call_text = empty2[len(pre) :]
    if content in with_text:
        before, after = _around(with_text, content, "an assistant message's content")
        if not after.endswith(call_text):
            raise ToolsUnsupported(f"the chat template writes content after tool calls: {with_text[:200]!r}")
        between = after[: len(after) - len(call_text)]
        opening = _common_suffix(pre, between)
        with_content: tuple[str, str] | None = (before, between[: len(between) - len(opening)])
    elif with_text == pre + call_text:  # the template leaves content out next to tool calls
        opening, with_content = (pre[len(prefix) :] if pre.startswith(prefix) else pre), None
    else:
        raise ToolsUnsupported(f"the chat template changes content next to tool calls: {with_text[:200]!r}")
    end = suffix if suffix and post_s.endswith(suffix) else ""
    return CallFormat(
        no_content=pre[: len(pre) - len(opening)],
        with_content=with_content,
        open=slotted(opening, call_values(calls, 0)),
        mid=mid_s,
        sep=sep,
        close=post_s[: len(post_s) - len(end)],
        suffix=end,
        layout=layout,
        single=empty2 is None,
    )


def result_format(one: str, two: str, results: list[dict[str, Any]], quoted: str) -> ResultFormat:
    """The tool-result format from a run of one tool message (``one``: ``results[0]``), of two (``two``:
    ``results``), and of one whose content is ``results[0]``'s followed by a double quote (``quoted``:
    tells content written as a JSON string from content between quotes)."""
    c1, c2 = results[0]["content"], results[1]["content"]
    first, last = _around(one, c1, "a tool message's content")
    json_content = False
    if first.endswith('"') and last.startswith('"'):
        if quoted == first + json.dumps(c1 + '"', ensure_ascii=False)[1:-1] + last:
            first, last, json_content = first[:-1], last[1:], True

    def enc(c: str) -> str:
        return json.dumps(c, ensure_ascii=False) if json_content else c

    v1, v2 = result_values(results, 0, False), result_values(results, 1, True)
    first_s, last_s = slotted(first, v1), slotted(last, v1)
    head, tail = first + enc(c1), enc(c2) + fill(last_s, v2)
    if not (two.startswith(head) and two.endswith(tail)) or len(two) < len(head + tail):
        raise ToolsUnsupported(
            f"the chat template writes two tool results other than one after the other: {two[:200]!r}"
        )
    sep = slotted(two[len(head) : len(two) - len(tail)], v2)
    return ResultFormat(first=first_s, sep=sep, last=last_s, json_content=json_content)
