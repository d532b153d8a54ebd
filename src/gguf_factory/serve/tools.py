"""Tool calling for the server: OpenAI's ``tools`` / ``tool_choice`` over the model's own chat template.

A template that renders ``tools`` itself (found by rendering a probe tool in the bounded worker) gets them
as its ``tools`` variable; for one that does not, the tools are described in the system message, in the
Hermes / Qwen 2.5 format (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``). ``tool_choice``:

- ``none``: the tools are not shown to the model; a plain reply.
- ``auto`` (the default with tools): the model decides; a reply holding a call in the format its template
  teaches (``<tool_call>`` tags, or a bare ``{"name", "arguments"}`` object) becomes ``tool_calls``.
- ``required`` / a named function: the reply is sampled under a grammar (the tools' parameter schemas
  through :mod:`.structured`), so it *is* a call, with arguments matching the function's schema.

Replies with calls have OpenAI's shape: ``message.tool_calls`` (``id``, ``type: function``,
``function.name``, ``function.arguments`` as a JSON string), ``content: null``,
``finish_reason: "tool_calls"``. History may hold assistant messages with ``tool_calls`` and ``tool``
messages; a call's arguments are handed to the template as an object, as Hugging Face templates expect.

A reply is read by :class:`CallReader` as it is generated, for a stream (text as ``content`` once it cannot
start a call, a call's name once complete, its arguments in fragments as they come) and whole, in one
piece, for :func:`parse_calls`: one reading, so a stream's calls are exactly the non-streaming reply's.
``function.arguments`` is the model's own text of the arguments (checked with :func:`json.loads`, not
re-serialized): that is what a stream can send before the call ends, and so the fragments of a stream
put together equal a non-streaming reply's ``arguments`` (a string the model wrote as its arguments gives
its content, sent in one fragment once complete). A stream cannot take back what it sent: text before a
call goes out as content (a non-streaming reply with calls has ``content: null``), and a call that turns
out malformed or is cut short stays as sent (with ``finish_reason: "length"`` when cut), where a
non-streaming reply would be that text as content.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..runtime import ChatModel
from .structured import BadField, check_schema, schema_grammar

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
PROBE_TOOL = "gguf_factory_probe_tool"
TAG_OPEN, TAG_CLOSE = "<tool_call>", "</tool_call>"
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict[str, Any]]  # OpenAI tool definitions, checked
    choice: str  # auto | required | named
    name: str | None = None  # the named function

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    def grammar(self, tagged: bool) -> str | None:
        """The grammar a call is sampled under (``required``/named), or None (``auto``)."""
        if self.choice == "auto":
            return None
        chosen = [t for t in self.tools if self.choice == "required" or t["function"]["name"] == self.name]
        alternatives = []
        for t in chosen:
            f = t["function"]
            alternatives.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
            )
        schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
        grammar = schema_grammar(schema, "tools")
        if not tagged:
            return grammar
        renamed = re.sub(r"(?<![\w-])root(?![\w-])", "call", grammar)
        return f'root ::= "{TAG_OPEN}\\n" call "\\n{TAG_CLOSE}"\n{renamed}'


def plan_tools(
    tools: Any, tool_choice: Any, functions: Any = None, function_call: Any = None
) -> ToolPlan | None:
    """The tool plan a request asks for (None: no tools in play). Raises :class:`BadField`."""
    if functions is not None:  # OpenAI's deprecated names
        if tools is not None:
            raise BadField("functions", "give tools or functions, not both")
        if not isinstance(functions, list):
            raise BadField("functions", "must be a list of function definitions")
        tools = [{"type": "function", "function": f} for f in functions]
        if function_call is not None:
            tool_choice = (
                {"type": "function", "function": function_call}
                if isinstance(function_call, dict)
                else function_call
            )
    elif function_call is not None:
        raise BadField("function_call", "give functions with function_call")
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise BadField("tool_choice", "names a tool, but the request has no tools")
        return None
    if not isinstance(tools, list):
        raise BadField("tools", 'must be a list of {"type": "function", "function": {...}}')
    checked, seen = [], set()
    for i, t in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise BadField(where, 'each tool must be {"type": "function", "function": {"name": ...}}')
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise BadField(f"{where}.function.name", "give a name of 1-64 letters, digits, _ . or -")
        if name in seen:
            raise BadField(f"{where}.function.name", f"{name!r} is defined twice")
        seen.add(name)
        params = f.get("parameters", EMPTY_PARAMETERS)
        if not isinstance(params, dict):
            raise BadField(f"{where}.function.parameters", "must be a JSON schema object")
        desc = f.get("description")
        if desc is not None and not isinstance(desc, str):
            raise BadField(f"{where}.function.description", "must be a string")
        function = {"name": name, "parameters": params} | ({"description": desc} if desc else {})
        checked.append({"type": "function", "function": function})
    choice, name = "auto", None
    if tool_choice is None or tool_choice == "auto":
        pass
    elif tool_choice == "none":
        return None
    elif tool_choice == "required":
        choice = "required"
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in seen:
            raise BadField("tool_choice", f"names the function {name!r}, which is not among the tools")
        choice = "named"
    else:
        raise BadField(
            "tool_choice", 'use "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
        )
    plan = ToolPlan(checked, choice, name)
    if choice != "auto":  # the call is sampled under the parameters' grammar: they must be enforceable
        for i, t in enumerate(checked):
            if choice == "required" or t["function"]["name"] == name:
                check_schema(t["function"]["parameters"], f"tools.{i}.function.parameters")
    return plan


# --- the template ------------------------------------------------------------------------------------
def template_renders_tools(model: ChatModel) -> bool:
    """Whether the model's chat template shows ``tools`` to the model (a probe tool's name appears in the
    rendered prompt), rendered in the bounded worker; cached on the model."""
    cached = getattr(model, "_renders_tools", None)
    if cached is None:
        probe = [{"type": "function", "function": {"name": PROBE_TOOL, "parameters": EMPTY_PARAMETERS}}]
        try:
            text = model.formatter().render([{"role": "user", "content": "hi"}], tools=probe)  # type: ignore[attr-defined]
            cached = PROBE_TOOL in text
        except Exception:  # a template that refuses the probe cannot take tools either
            cached = False
        model._renders_tools = cached  # type: ignore[attr-defined]
    return bool(cached)


def template_tags_calls(model: ChatModel) -> bool:
    """Whether calls are written in ``<tool_call>`` tags: the template's own format, or the fallback's."""
    template = model.chat_template or ""
    return TAG_OPEN in template or not template_renders_tools(model)


def for_template(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as Hugging Face templates take them: a call's arguments as an object, not a string."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        if calls:
            fixed = []
            for c in calls:
                c = json.loads(json.dumps(c))
                fn = c.get("function") or {}
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        fn["arguments"] = json.loads(args)
                    except ValueError:
                        pass
                fixed.append(c)
            m["tool_calls"] = fixed
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out


def fallback_system_text(tools: Sequence[Mapping[str, Any]]) -> str:
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "You may call one or more functions to help with the user's request. The functions, one JSON "
        f"signature per line, within <tools></tools> tags:\n<tools>\n{lines}\n</tools>\n\nTo call a "
        f'function, reply with a JSON object in {TAG_OPEN}{TAG_CLOSE} tags:\n{TAG_OPEN}\n{{"name": '
        f'<function-name>, "arguments": <args-json-object>}}\n{TAG_CLOSE}'
    )


def prepare(
    model: ChatModel, messages: Sequence[Mapping[str, Any]], plan: ToolPlan | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and template variables a request is rendered with."""
    msgs = for_template(messages)
    if plan is None:
        return msgs, {}
    if template_renders_tools(model):
        return msgs, {"tools": plan.tools}
    text = fallback_system_text(plan.tools)
    if msgs and msgs[0].get("role") == "system":
        msgs[0] = {**msgs[0], "content": f"{msgs[0]['content']}\n\n{text}"}
    else:
        msgs.insert(0, {"role": "system", "content": text})
    return msgs, {}


# --- the reply ---------------------------------------------------------------------------------------
MISTRAL_CALLS, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"
OPENERS = (TAG_OPEN, MISTRAL_CALLS)  # what may start calls anywhere in a reply
ARGUMENT_KEYS = ("arguments", "parameters")  # Llama 3.1 writes "parameters"
SPACE = " \t\r\n"
NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def parse_calls(text: str, names: Sequence[str]) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls`` from a whole reply, in the formats chat templates teach: ``<tool_call>``
    blocks (Hermes, Qwen), Mistral's ``[TOOL_CALLS]`` followed by a JSON list of calls (v3 tokenizers) or
    by ``name[ARGS]{...}`` (v11), a bare JSON list of calls (Mistral's, its control token dropped), or a
    reply that starts with a call object (Llama 3.1's ``{"name", "parameters"}``); [] when the reply holds
    no call of a known function, or a call that does not parse. Read by :class:`CallReader` in one piece,
    as a stream is read in many: both give the same calls."""
    reader = CallReader(names)
    reader.feed(text)
    reader.close()
    return reader.tool_calls()


@dataclass
class _Call:
    index: int
    name: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    arguments: str = ""  # the arguments' text sent so far
    done: bool = False  # its arguments are complete and parse as JSON


class CallReader:
    """A reply read as it is generated, for OpenAI's chat stream: :meth:`feed` it the text as it comes
    and :meth:`close` it at the end; each returns the deltas that text lets go.

    Text that cannot start a call goes out as ``content`` at once. A possible start (a prefix of
    ``<tool_call>`` or ``[TOOL_CALLS]`` anywhere; ``{`` or ``[`` where the reply starts) is held back only
    until it is a call or cannot be one, then sent as content. A call's first delta (``index``, ``id``,
    ``type``, ``function.name``, empty ``arguments``) goes out once its name is complete and known, then
    ``{"index", "function": {"arguments": fragment}}`` deltas with its arguments' text as it is generated.
    Whitespace at the reply's start, between and after calls is not content. A reply is read the same
    whatever its pieces (only where the deltas fall changes), so a stream's calls are :func:`parse_calls`'.

    The JSON is walked here only to find where a value ends (strings and brackets matched, a word such as
    a number ended by what follows it); every value is checked by :func:`json.loads` once complete.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)
        self.text, self.pos, self.ended = "", 0, False
        self.calls: list[_Call] = []
        self.stray = False  # a call was opened (a tag, a marker, a list of calls) and ended badly
        self._deltas: list[dict[str, Any]] = []
        self._quiet, self._pending = True, ""  # whitespace held while it is not (yet) content
        self._steps = self._reply()

    def feed(self, text: str) -> list[dict[str, Any]]:
        """The deltas ``text``, the reply's next piece, lets go."""
        self.text += text
        return self._advance()

    def close(self) -> list[dict[str, Any]]:
        """The deltas held back until the reply's end."""
        self.ended = True
        return self._advance()

    def tool_calls(self) -> list[dict[str, Any]]:
        """The calls in OpenAI's shape, once the reply is read: [] unless each one's arguments are complete
        JSON and each call opened was one."""
        if not self.ended or self.stray or not all(c.done for c in self.calls):
            return []
        return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.calls]  # fmt: skip

    def finish_reason(self, generated: str) -> str:
        """The finish reason of the reply read: ``tool_calls`` once a call was sent, unless it was cut."""
        return "tool_calls" if self.calls and generated != "length" else generated

    def _advance(self) -> list[dict[str, Any]]:
        with contextlib.suppress(StopIteration):
            next(self._steps)
        deltas, self._deltas = self._deltas, []
        return deltas

    # --- what goes out ---
    def _content(self, text: str) -> None:
        if self._quiet:
            text, self._pending = self._pending + text, ""
            if not text.strip():
                self._pending = text
                return
            self._quiet = False
        if text and self._deltas and "content" in self._deltas[-1]:
            self._deltas[-1]["content"] += text
        elif text:
            self._deltas.append({"content": text})

    def _open(self, name: str) -> _Call:
        call = _Call(len(self.calls), name)
        self.calls.append(call)
        self._quiet, self._pending = True, ""
        function = {"name": name, "arguments": ""}
        self._deltas.append({"tool_calls": [{"index": call.index, "id": call.id, "type": "function",
                                             "function": function}]})  # fmt: skip
        return call

    def _send(self, call: _Call, arguments: str) -> None:
        """Send what ``arguments`` (the call's so far) adds to what was sent."""
        fragment = arguments[len(call.arguments) :]
        if fragment:
            call.arguments = arguments
            self._deltas.append({"tool_calls": [{"index": call.index, "function": {"arguments": fragment}}]})

    def _finish(self, call: _Call, arguments: str | None) -> None:
        """``call``'s arguments are complete (None: they were cut short or are no JSON)."""
        if arguments is not None:
            self._send(call, arguments)
            call.done = _is_json(arguments)

    def _reject(self, start: int, opener: str, stray: bool = True) -> None:
        """What followed ``opener`` (at ``start``) was no call: the opener is content, read on after it."""
        self.stray = self.stray or stray
        self.pos = start + len(opener)
        self._content(opener)

    # --- the reply's parts: generators that wait (yield) for more text ---
    def _reply(self) -> Generator[None, None, None]:
        start = self.pos
        bare = (yield from self._space()) and self.text[self.pos] in "{["
        self._content(self.text[start : self.pos])  # whitespace: held while nothing else has come
        if bare and not (yield from self._ahead(MISTRAL_CALLS)):
            yield from self._bare()
        while (found := (yield from self._text())) is not None:
            at, opener = found
            yield from self._tagged(at) if opener == TAG_OPEN else self._mistral(at)
        if not self.calls and self._pending:
            self._deltas.append({"content": self._pending})

    def _text(self) -> Generator[None, None, tuple[int, str] | None]:
        """Content up to the next opener (at, opener; ``pos`` past it), or to the reply's end (None)."""
        while True:
            found = _next_opener(self.text, self.pos)
            end = found[0] if found else _held_from(self.text, self.pos)
            self._content(self.text[self.pos : end])
            self.pos = end
            if found:
                self.pos += len(found[1])
                return found
            if not (yield from self._have(len(self.text))):
                self._content(self.text[self.pos :])
                self.pos = len(self.text)
                return None

    def _bare(self) -> Generator[None, None, None]:
        """A reply that starts (after whitespace) with a call object, or a list of them."""
        start, opener = self.pos, self.text[self.pos]
        if opener == "{":
            sent = (yield from self._call_object()) is not None
        else:
            sent = yield from self._call_list()
        if not sent:
            self._reject(start, opener, stray=False)

    def _tagged(self, start: int) -> Generator[None, None, None]:
        """After ``<tool_call>``: a call object, then ``</tool_call>`` (or the reply's end)."""
        call = None
        if (yield from self._space()) and self.text[self.pos] == "{":
            call = yield from self._call_object()
        if call is None:
            self._reject(start, TAG_OPEN)
        elif (yield from self._space()) and not (yield from self._literal(TAG_CLOSE)):
            self.stray = True

    def _mistral(self, start: int) -> Generator[None, None, None]:
        """After ``[TOOL_CALLS]``: a JSON list of call objects (v3), or ``name[ARGS]`` and arguments (v11)."""
        if (yield from self._space()) and self.text[self.pos] == "[":
            sent = yield from self._call_list()
        else:
            sent = yield from self._named_arguments()
        if not sent:
            self._reject(start, MISTRAL_CALLS)

    def _named_arguments(self) -> Generator[None, None, bool]:
        name = yield from self._word()
        if name not in self.names or not (
            (yield from self._space()) and (yield from self._literal(MISTRAL_ARGS))
        ):
            return False
        call = self._open(name)
        arguments = (yield from self._arguments(call)) if (yield from self._space()) else None
        self._finish(call, arguments)
        return True

    def _call_list(self) -> Generator[None, None, bool]:
        """A JSON list of call objects at ``pos``; False (nothing sent) when its first item is no call."""
        self.pos += 1  # [
        sent = False
        while (yield from self._space()) and self.text[self.pos] == "{":
            if (yield from self._call_object()) is None:
                break
            sent = True
            if not (yield from self._space()) or self.text[self.pos] not in ",]":
                break
            self.pos += 1
            if self.text[self.pos - 1] == "]":
                return True
        self.stray = self.stray or sent  # calls were sent, but the list did not end as a list of calls
        return sent

    def _call_object(self) -> Generator[None, None, _Call | None]:
        """The call object at ``pos`` (``{"name": ..., "arguments": ...}``, its members in any order), its
        call sent as soon as its name is known; None (nothing sent) when it names no known function."""
        self.pos += 1  # {
        call: _Call | None = None
        arguments, has_arguments = "{}", False  # "{}": a call without arguments
        while (yield from self._space()) and (key := (yield from self._key())) is not None:
            if key in ARGUMENT_KEYS and not has_arguments:
                has_arguments = True
                found = yield from self._arguments(call)
                if found is None:
                    break
                arguments = found
            elif key == "name" and call is None:
                name = yield from self._string()
                if name not in self.names:
                    return None
                call = self._open(name)
                if has_arguments:
                    self._send(call, arguments)
            elif not (yield from self._skip_value()):
                break
            if not (yield from self._space()) or self.text[self.pos] not in ",}":
                break
            self.pos += 1
            if self.text[self.pos - 1] == "}":
                if call is not None:
                    self._finish(call, arguments)
                return call
        return call  # the object did not end well: a call sent stays unfinished

    # --- JSON values ---
    def _arguments(self, call: _Call | None) -> Generator[None, None, str | None]:
        """The arguments at ``pos`` (moved past them): an object's own text (any JSON value's), or a
        string's content; sent to ``call`` as they come (a string's once complete). None: cut short, or a
        string that is no JSON string."""
        start = self.pos
        end = yield from self._value_end(call if self.text[start] in "{[" else None)
        if end is None:
            return None
        self.pos = end
        arguments = self.text[start:end]
        if arguments.startswith('"'):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if call is not None:
            self._send(call, arguments)
        return arguments

    def _string(self) -> Generator[None, None, str | None]:
        """The JSON string at ``pos``, decoded (moved past it); None when there is none."""
        if not (yield from self._have(self.pos)) or self.text[self.pos] != '"':
            return None
        end = yield from self._value_end()
        if end is None:
            return None
        try:
            value = json.loads(self.text[self.pos : end])
        except ValueError:
            return None
        self.pos = end
        return str(value)

    def _key(self) -> Generator[None, None, str | None]:
        """An object member's key and the ``:`` after it (moved past them, to the value); None if none."""
        key = yield from self._string()
        if key is None or not ((yield from self._space()) and (yield from self._literal(":"))):
            return None
        return key if (yield from self._space()) else None

    def _skip_value(self) -> Generator[None, None, bool]:
        """Move past the JSON value at ``pos``; False when it is cut short or no JSON."""
        end = yield from self._value_end()
        if end is None or not _is_json(self.text[self.pos : end]):
            return False
        self.pos = end
        return True

    def _value_end(self, stream_to: _Call | None = None) -> Generator[None, None, int | None]:
        """Where the JSON value at ``pos`` ends (past its last character): strings and brackets matched,
        a word (a number, ``true``...) ended by what follows it; None when the reply ends inside a string
        or bracket (then all of it has been read: ``pos`` is its end). While more is awaited, what has come
        of the value is sent as ``stream_to``'s arguments."""
        i, depth, in_string = self.pos, 0, False
        word = self.text[i] not in '"{['
        while True:
            if i >= len(self.text):
                if stream_to is not None:
                    self._send(stream_to, self.text[self.pos : i])
                if not (yield from self._have(i)):
                    if word:
                        return i
                    self.pos = len(self.text)
                    return None
            c = self.text[i]
            if in_string:
                if c == "\\":
                    i += 1
                elif c == '"':
                    in_string = False
                    if depth == 0:
                        return i + 1
            elif word:
                if c in ",]}" or c in SPACE:
                    return i
            elif c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1

    # --- waiting for text ---
    def _have(self, i: int) -> Generator[None, None, bool]:
        """Wait until the reply has a character at ``i``; False when it ends first."""
        while len(self.text) <= i:
            if self.ended:
                return False
            yield
        return True

    def _space(self) -> Generator[None, None, bool]:
        """Move past whitespace; whether something follows it (False: the reply ended)."""
        while (yield from self._have(self.pos)):
            if self.text[self.pos] not in SPACE:
                return True
            self.pos += 1
        return False

    def _word(self) -> Generator[None, None, str]:
        """The function name at ``pos`` (moved past it): letters, digits, ``_ . -``."""
        start = self.pos
        while (yield from self._have(self.pos)) and self.text[self.pos] in NAME_CHARS:
            self.pos += 1
        return self.text[start : self.pos]

    def _ahead(self, word: str) -> Generator[None, None, bool]:
        """Whether ``word`` comes next; waits only while what has come may still be it."""
        while True:
            have = self.text[self.pos : self.pos + len(word)]
            if have == word:
                return True
            if not word.startswith(have) or not (yield from self._have(self.pos + len(have))):
                return False

    def _literal(self, word: str) -> Generator[None, None, bool]:
        """Whether ``word`` comes next, moved past it if so."""
        if not (yield from self._ahead(word)):
            return False
        self.pos += len(word)
        return True


def _next_opener(text: str, pos: int) -> tuple[int, str] | None:
    """The first opener in ``text`` from ``pos``: where it starts, and which."""
    found = [(text.find(o, pos), o) for o in OPENERS]
    return min(((i, o) for i, o in found if i >= 0), default=None)


def _held_from(text: str, pos: int) -> int:
    """Where the end of ``text`` (from ``pos``) may be an opener's start: what is held back from there."""
    longest = max(len(o) for o in OPENERS)
    for i in range(max(pos, len(text) - longest + 1), len(text)):
        if any(o.startswith(text[i:]) for o in OPENERS):
            return i
    return len(text)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def with_tool_calls(out: dict[str, Any], plan: ToolPlan) -> dict[str, Any]:
    """A chat completion whose reply holds calls, in OpenAI's ``tool_calls`` shape."""
    choice = out["choices"][0]
    text = choice["message"].get("content") or ""
    calls = parse_calls(text, plan.names)
    if calls and choice.get("finish_reason") != "length":
        choice["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
        choice["finish_reason"] = "tool_calls"
    return out
