"""An Ollama TEMPLATE (Go text/template) derived from a GGUF's own Jinja chat template.

Nothing here knows any particular template. The Jinja template is rendered in Jinja's immutable sandbox
in a template worker process with CPU, memory and wall-clock limits (the renderer chat and serve use,
:mod:`gguf_factory.runtime.templates`) on probe conversations whose contents are unique marker strings.
Cutting each render at the markers gives, per role, the text before and after a message's content, the
generation prompt, any leading text (e.g. a BOS string) and any text the template appends when no
generation prompt is asked for. A leading system message is either a turn of its own or folded into the
first user turn (Llama 2, Gemma 3), and may replace a default system turn the template writes when there
is none (Qwen 2.5); all three are reproduced. That decomposition is then checked against more
conversations; a template it cannot reproduce byte for byte is refused with the exact mismatch
(:class:`TemplateExportError`), or, when only system messages are the problem (the template refuses
them), exported without them and with a warning.

The Go template iterates Ollama's ``.Messages`` (each has ``.Role`` and ``.Content``) and appends the
generation prompt when the last message is not the assistant's. When the last message is the
assistant's, its end-of-turn text is left out, as Ollama's own templates do, so that the model continues
that message. Ollama merges consecutive messages of the same role (joined by a blank line) before it
executes a template, tool messages aside.

Tools: a template that writes the ``tools`` it is given (probe tool definitions whose strings are markers)
is decomposed a second time with tools, and the tool parts are cut out of further renders
(:mod:`.ollama_tools`): the tool list where the template writes it (``.Tools``, each tool's JSON), an
assistant message's tool calls (``.ToolCalls``) and runs of tool results (role ``tool``). The TEMPLATE is
then ``{{ if .Tools }}`` that decomposition ``{{ else }}`` the one without tools ``{{ end }}``, and both
are verified against the Jinja template on conversations with tool calls and results, byte for byte in the
JSON layout the template uses. Ollama writes the JSON with Go's json (compact, its own key order), so the
prompt Ollama builds equals the Jinja render after parsing the JSON, not byte for byte there. Tool parts
that cannot be reproduced leave the TEMPLATE without tools (as for a template without tool support), with
a warning that names why; templates without tool support export exactly as before.

The probes carry a tool call's ``id`` and a tool result's ``name`` and ``tool_call_id`` as markers too;
where the template writes them they become Ollama's ``.ID``, ``.ToolName`` and ``.ToolCallID`` (Mistral's
call ids), and where it writes them somewhere the Go template has no such field, tools are left out with
the field named. A tool list written into the first user message only (Llama 3.1/3.2) or before the last
one only (Mistral) is rendered there (the Go template finds that message by its index), a template that
refuses two tool calls in a message is decomposed with one (a warning says what the TEMPLATE does with
more), and tool results written as JSON strings (Llama's ``tojson``) are written with Go's ``json``.

BOS: Ollama tokenizes the rendered prompt with the model's ``tokenizer.ggml.add_bos_token`` setting, as
llama.cpp does. When the file sets it and the Jinja render starts with the BOS string, that string is left
out of TEMPLATE (``strip_bos``); otherwise the model would see two BOS tokens. A template that opens
every turn with BOS (Llama 2) keeps it on every turn but the first.
"""

from __future__ import annotations

import copy
import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from ..errors import FactoryError, TemplateError
from ..runtime.templates import CHECK_MAX_CHARS, render_calls
from .ollama_tools import (
    CALL_ID,
    CALL_REF,
    PREV_CALL_ID,
    PREV_CALL_REF,
    PREV_TOOL_NAME,
    SLOTS,
    TOOL_NAME,
    TOOLS_SLOT,
    CallFormat,
    ResultFormat,
    ToolsFormat,
    ToolsUnsupported,
    call_format,
    calls_message,
    json_normalized,
    leftover_field,
    probe_tool,
    result_format,
    tool_message,
    tools_format,
)

ROLES = ("system", "user", "assistant")
RENDER_TIMEOUT = 5.0


class TemplateExportError(FactoryError):
    """The chat template cannot be turned into an Ollama TEMPLATE that renders the same text."""


Message = dict[str, Any]  # role, content, and tool_calls for an assistant message that has them
Probe = tuple[list[Message], bool]  # (messages, add_generation_prompt)
Tools = list[dict[str, Any]]
PROBE_TOOLS: Tools = [probe_tool(n) for n in (1, 2, 3, 4)]


def _marker(role: str, n: int) -> str:
    """Unique content that survives trimming and is changed by any case transform."""
    return f"Zq{role[0].upper()}{n}mK"


def _msg(role: str, n: int) -> Message:
    return {"role": role, "content": _marker(role, n)}


# ---------------------------------------------------------------------------------------------------
# sandboxed rendering of many probes in one request to a template worker
# ---------------------------------------------------------------------------------------------------

_STATUS = {"ok": "ok", "raised": "refused", "unsafe": "unsafe"}  # worker status -> ours ("error" else)


def render_probes(
    source: str,
    probes: list[Probe],
    bos: str,
    eos: str,
    timeout: float = RENDER_TIMEOUT,
    tools: Tools | None = None,
) -> list[tuple[str, str]]:
    """Render each (messages, add_generation_prompt) with ``tools`` in the Jinja sandbox, in a bounded
    template worker (:mod:`gguf_factory.runtime.templates`: time, CPU and memory limits, one request for
    all probes).

    Returns one (status, text) per probe: status "ok" (text = the render), "refused" (raise_exception),
    "unsafe" or "error". Raises :class:`TemplateExportError` when the template does not parse, reaches for
    Python internals, or the worker dies or runs out of time.
    """
    calls = [
        {"messages": msgs, "add_generation_prompt": gen, "bos_token": bos, "eos_token": eos, "tools": tools}
        for msgs, gen in probes
    ]
    try:
        r = render_calls(source, calls, timeout=timeout, max_chars=CHECK_MAX_CHARS)
    except TemplateError as e:
        raise TemplateExportError(f"rendering the chat template failed: {e}") from None
    if r.parse_status == "syntax":
        raise TemplateExportError(f"the chat template does not parse: {r.parse_detail}")
    if r.parse_status == "unsafe":
        raise TemplateExportError(f"the chat template reaches for Python internals: {r.parse_detail}")
    return [(_STATUS.get(status, "error"), text) for status, text in r.results]


# ---------------------------------------------------------------------------------------------------
# decomposition
# ---------------------------------------------------------------------------------------------------


def merge_turns(messages: list[Message]) -> list[Message]:
    """Ollama's preprocessing: consecutive messages of one role (tool aside) joined by a blank line."""
    out: list[Message] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"] and m["role"] != "tool":
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(dict(m))
    return out


@dataclass
class ChatFormat:
    """The rendered prompt is ``lead + Σ prefix[role] + content + suffix[role] + (gen_prompt | trailer)``.

    With ``fold`` = (before, after), a leading system message is not a turn of its own: its content goes
    into the first user turn as ``prefix[user] + before + system + after + user content``. With ``tools``,
    TOOLS_SLOT in a piece stands for the tool list; ``calls`` renders assistant messages with tool calls,
    ``results`` tool messages (None: not rendered), and ``mid_system`` = (before, after) a system message
    that is not the first message, when that differs from a first one (Qwen 2.5 writes the tool list into
    the first only).
    """

    lead: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    gen_prompt: str
    trailer: str  # appended instead of the generation prompt when none is asked for
    system: bool  # system messages are rendered as their own turn
    fold: tuple[str, str] | None = None
    default_system: str | None = None  # rendered after ``lead`` when the first message is not a system one
    first_bos: str = ""  # left out of the first rendered prefix (Ollama adds BOS itself)
    tools: ToolsFormat | None = None
    calls: CallFormat | None = None
    results: ResultFormat | None = None
    mid_system: tuple[str, str] | None = None
    calls_note: str | None = None  # what the TEMPLATE does where the chat template refuses tool calls
    first_user: str | None = None  # the prefix of the first user message (after a system one), if it differs
    last_user: str | None = None  # the prefix of the last user message, if it differs (Mistral's tool list)

    def _user_prefix(self, messages: list[Message], i: int) -> str:
        if self.first_user is not None and i == (1 if messages[0]["role"] == "system" else 0):
            return self.first_user
        if self.last_user is not None and not any(m["role"] == "user" for m in messages[i + 1 :]):
            return self.last_user
        return self.prefix["user"]

    def _rendered(self, role: str) -> bool:
        return role in ("user", "assistant") or (role == "system" and self.system)

    @property
    def exact_json(self) -> bool:
        """The Python model writes JSON in the template's own layout (else: compare after parsing)."""
        return all(part.layout is not None for part in (self.tools, self.calls) if part)

    def replace_text(self, old: str, new: str) -> int:
        """Replace ``old`` in every piece of literal text; how many were replaced."""
        n = 0

        def sub(s: str) -> str:
            nonlocal n
            n += s.count(old)
            return s.replace(old, new)

        self.lead, self.gen_prompt, self.trailer = sub(self.lead), sub(self.gen_prompt), sub(self.trailer)
        self.prefix = {k: sub(v) for k, v in self.prefix.items()}
        self.suffix = {k: sub(v) for k, v in self.suffix.items()}
        if self.fold:
            self.fold = (sub(self.fold[0]), sub(self.fold[1]))
        if self.default_system is not None:
            self.default_system = sub(self.default_system)
        if self.first_user is not None:
            self.first_user = sub(self.first_user)
        if self.last_user is not None:
            self.last_user = sub(self.last_user)
        return n

    def _folded(self, messages: list[Message], i: int) -> str:
        if self.fold and i == 1 and messages[0]["role"] == "system" and messages[1]["role"] == "user":
            return self.fold[0] + messages[0]["content"] + self.fold[1]
        return ""

    def _default(self, messages: list[Message]) -> str:
        if self.default_system is not None and messages and messages[0]["role"] != "system":
            return self.default_system
        return ""

    def _turn(self, messages: list[Message], i: int, close: bool, go: bool) -> list[str]:
        """The pieces of message ``i`` (``close``: with its end of turn; ``go``: JSON as Ollama writes it)."""
        m = messages[i]
        role = m["role"]
        if role == "tool":
            return self.results.render(messages, i, go) if self.results else []
        if role == "assistant" and self.calls and m.get("tool_calls"):
            return self.calls.render(m, close, go)
        if not self._rendered(role):
            return []
        if role == "system" and i > 0 and self.mid_system:
            return [self.mid_system[0], m["content"], self.mid_system[1]]
        end = self.suffix[role] if close else ""
        prefix = self._user_prefix(messages, i) if role == "user" else self.prefix[role]
        return [prefix, self._folded(messages, i), m["content"], end]

    def _fill(self, text: str, tools: Tools | None, go: bool) -> str:
        return text.replace(TOOLS_SLOT, self.tools.render(tools or [], go)) if self.tools else text

    def jinja_equivalent(self, messages: list[Message], gen: bool, tools: Tools | None = None) -> str:
        """What the Jinja template renders, according to this decomposition (JSON in its layout)."""
        out = [self.lead, self._default(messages)]
        for i in range(len(messages)):
            out += self._turn(messages, i, close=True, go=False)
        out.append(self.gen_prompt if gen else self.trailer)
        return self._fill("".join(out), tools, go=False)

    def ollama_equivalent(self, messages: list[Message], tools: Tools | None = None) -> str:
        """What the emitted Go template renders when Ollama is given ``messages`` (and ``tools``, when this
        is the format for requests with tools). JSON is compact, as Go writes it, but Go writes a tool's
        fields in the order of Ollama's structs: compare tool JSON after parsing."""
        messages = merge_turns(messages)
        out = [self.lead, self._default(messages)]
        first = True
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            turn = self._turn(messages, i, close=not (last and m["role"] == "assistant"), go=True)
            if turn and first and self.first_bos and turn[0].startswith(self.first_bos):
                turn[0] = turn[0][len(self.first_bos) :]
            first = first and not turn
            out += turn
            if last and m["role"] != "assistant":
                out.append(self.gen_prompt)
        return self._fill("".join(out), tools, go=True)


@dataclass
class OllamaTemplate:
    """The Go template and what was learnt on the way."""

    template: str
    format: ChatFormat
    stops: list[str]
    strip_bos: bool
    bos: str
    eos: str
    warnings: list[str] = field(default_factory=list)
    system_note: str | None = None  # why system messages are not supported (None: they are)
    tools_format: ChatFormat | None = None  # used when Ollama passes tools (None: no tools rendered)
    tools_note: str | None = None  # why the template's tools are not rendered (None: they are, or none)

    @property
    def tools(self) -> bool:
        """The TEMPLATE renders tools, tool calls and tool results."""
        return self.tools_format is not None

    def ollama_equivalent(self, messages: list[Message], tools: Tools | None = None) -> str:
        """What the TEMPLATE renders in Ollama (see :meth:`ChatFormat.ollama_equivalent`)."""
        fmt = self.tools_format if tools and self.tools_format else self.format
        return fmt.ollama_equivalent(messages, tools)

    def tools_summary(self) -> str:
        """One line: whether tools are rendered, and why not."""
        if self.tools_format is not None:
            return (
                "rendered (tool definitions, tool calls and tool results, where the chat template writes "
                "them; Ollama writes their JSON compactly with keys in its own order: the same JSON after "
                "parsing as the chat template's json.dumps, not the same spacing)"
            )
        if self.tools_note:
            return f"not rendered ({self.tools_note})"
        return "not rendered (the chat template has no tool support)"


def _cut(text: str, markers: list[str]) -> list[str] | None:
    """The text around each marker, in order; None unless each occurs exactly once, in that order."""
    pieces: list[str] = []
    pos = 0
    for m in markers:
        if text.count(m) != 1:
            return None
        at = text.find(m, pos)
        if at < 0:
            return None
        pieces.append(text[pos:at])
        pos = at + len(m)
    pieces.append(text[pos:])
    return pieces


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _show(s: str, limit: int = 160) -> str:
    r = repr(s)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _first_difference(expected: str, got: str) -> str:
    n = len(_common_prefix(expected, got))
    lo = max(0, n - 30)
    return (
        f"from character {n}: the template renders {_show(got[lo : n + 60])}, "
        f"expected {_show(expected[lo : n + 60])}"
    )


class _Renders:
    """Renders of one template with one tool list (None: no tools), cached across tool lists."""

    def __init__(
        self,
        source: str,
        bos: str,
        eos: str,
        tools: Tools | None = None,
        cache: dict[str, tuple[str, str]] | None = None,
    ):
        self.source, self.bos, self.eos, self.tools = source, bos, eos, tools
        self.cache: dict[str, tuple[str, str]] = {} if cache is None else cache

    def with_tools(self, tools: Tools | None) -> _Renders:
        return _Renders(self.source, self.bos, self.eos, tools, self.cache)

    def run(self, probes: list[Probe]) -> None:
        todo = list({self.key(p): p for p in probes if self.key(p) not in self.cache}.values())
        if todo:
            results = render_probes(self.source, todo, self.bos, self.eos, tools=self.tools)
            for p, r in zip(todo, results, strict=True):
                self.cache[self.key(p)] = r

    def key(self, p: Probe) -> str:
        return json.dumps([p[0], p[1], self.tools], sort_keys=True)

    def get(self, msgs: list[Message], gen: bool) -> tuple[str, str]:
        p = (msgs, gen)
        self.run([p])
        return self.cache[self.key(p)]


def _describe(msgs: list[Message], gen: bool) -> str:
    roles = ", ".join(m["role"] + (" with tool calls" if m.get("tool_calls") else "") for m in msgs)
    return f"[{roles}]" + (" with the generation prompt" if gen else "")


def _ok_text(r: _Renders, msgs: list[Message], gen: bool) -> str:
    status, text = r.get(msgs, gen)
    if status != "ok":
        what = "refuses" if status == "refused" else "fails on"
        with_tools = " with tools" if r.tools else ""
        raise TemplateExportError(
            f"the chat template {what} the conversation {_describe(msgs, gen)}{with_tools}: {text}"
        )
    return text


def _need(r: _Renders, msgs: list[Message], gen: bool) -> list[str]:
    text = _ok_text(r, msgs, gen)
    pieces = _cut(text, [m["content"] for m in msgs])
    if pieces is None:
        raise TemplateExportError(
            "the chat template transforms or repeats message content (the Ollama TEMPLATE passes it "
            f"unchanged): {_describe(msgs, gen)} renders {_show(text)}"
        )
    return pieces


def _split_tail(tail_plain: str, tail_gen: str, eos: str) -> tuple[str, str, str]:
    """(suffix, trailer, gen_prompt) from the text after the last user message without/with the prompt."""
    cp = len(_common_prefix(tail_plain, tail_gen))
    # the split is ambiguous when the trailer and the prompt start alike ("</s>" vs "<|assistant|>"):
    # prefer a trailer that is empty or the EOS string
    for k in range(cp, -1, -1):
        if tail_plain[k:] in ("", eos):
            return tail_plain[:k], tail_plain[k:], tail_gen[k:]
    return tail_plain[:cp], tail_plain[cp:], tail_gen[cp:]


def decompose(r: _Renders) -> tuple[ChatFormat, ChatFormat, str | None]:
    """The per-role decomposition of a chat template (rendered with ``r.tools``), the same without system
    messages, and why system messages are unsupported (or None)."""
    u1, a1, u2, s1 = _msg("user", 1), _msg("assistant", 1), _msg("user", 2), _msg("system", 1)
    r.run([([u1], False), ([u1], True), ([u1, a1], False), ([u1, a1, u2], False), ([s1, u1], False)])

    pre, tail_plain = _need(r, [u1], False)
    pre_g, tail_gen = _need(r, [u1], True)
    if pre_g != pre:
        raise TemplateExportError(
            "the chat template renders the first user turn differently with the generation prompt: "
            f"{_show(pre)} vs {_show(pre_g)}"
        )
    su, trailer, gen = _split_tail(tail_plain, tail_gen, r.eos)
    _, mid, tail = _need(r, [u1, a1], False)
    if not mid.startswith(su) or not tail.endswith(trailer):
        raise TemplateExportError(
            f"the chat template's user turn does not end the same way before an assistant turn "
            f"({_show(mid)}) and at the end ({_show(su)})"
        )
    pa = mid[len(su) :]
    sa = tail[: len(tail) - len(trailer)]
    pre2, _, mid2, _ = _need(r, [u1, a1, u2], False)
    if not mid2.startswith(sa):
        raise TemplateExportError(
            f"the chat template's assistant turn does not end the same way before a user turn "
            f"({_show(mid2)}) and at the end ({_show(sa)})"
        )
    pu = mid2[len(sa) :]
    first_user = last_user = None
    if pre2 == pre and pre.endswith(pu):
        lead = pre[: len(pre) - len(pu)]
    elif pre2 == pre and pu and pu in pre:  # the first user turn opens otherwise (Llama 3.2's tool list)
        lead = pre[: pre.rfind(pu)]
        first_user = pre[len(lead) :]
    elif pu and pre.endswith(pu) and pre2.startswith(pre[: len(pre) - len(pu)]):
        # the last user turn opens otherwise (Mistral's tool list): [u1, a1, u2] opens u1 as later turns do
        lead = pre[: len(pre) - len(pu)]
        pu, last_user = pre2[len(lead) :], pu
    else:
        raise TemplateExportError(
            f"the chat template starts the first user turn ({_show(pre)}) unlike later ones ({_show(pu)})"
        )
    pu0 = first_user or last_user or pu  # the user prefix in a conversation with one user message
    fmt = ChatFormat(
        lead=lead,
        prefix={"user": pu, "assistant": pa, "system": ""},
        suffix={"user": su, "assistant": sa, "system": ""},
        gen_prompt=gen,
        trailer=trailer,
        system=False,
        first_user=first_user,
        last_user=last_user,
    )
    base = copy.deepcopy(fmt)
    system_note: str | None = None
    status, text = r.get([s1, u1], False)
    if status == "refused":
        system_note = f"the chat template refuses system messages (raise_exception: {text!r})"
    elif status != "ok":
        system_note = f"the chat template fails on a system message: {text}"
    else:
        pieces = _cut(text, [s1["content"], u1["content"]])
        if pieces is None:
            system_note = f"the chat template drops or transforms system messages: renders {_show(text)}"
        elif pieces[0].startswith(lead) and pieces[1].endswith(pu0) and pieces[2] == tail_plain:
            fmt.prefix["system"] = pieces[0][len(lead) :]
            fmt.suffix["system"] = pieces[1][: len(pieces[1]) - len(pu0)]
            fmt.system = True
        elif pieces[0].startswith(lead + pu0) and pieces[2] == tail_plain:
            fmt.fold = (pieces[0][len(lead + pu0) :], pieces[1])
        elif _default_system(fmt, pieces, r.bos, tail_plain, pu0):
            pass
        else:
            system_note = (
                "the chat template renders a system message neither as a turn of its own nor inside the "
                f"first user turn: [system, user] renders {_show(text)}"
            )
    return fmt, base, system_note


def _default_system(fmt: ChatFormat, pieces: list[str], bos: str, tail_plain: str, pu: str) -> bool:
    """A system turn of its own, with a default one in the lead when the conversation has none (Qwen)."""
    lead = fmt.lead
    if not pieces[1].endswith(pu) or pieces[2] != tail_plain:
        return False
    ss = pieces[1][: len(pieces[1]) - len(pu)]
    if not (lead.startswith(pieces[0]) and lead.endswith(ss) and len(lead) >= len(pieces[0]) + len(ss)):
        return False
    new_lead = bos if bos and pieces[0].startswith(bos) else ""
    fmt.default_system = lead[len(new_lead) :]
    fmt.lead = new_lead
    fmt.prefix["system"] = pieces[0][len(new_lead) :]
    fmt.suffix["system"] = ss
    fmt.system = True
    return True


def _conv(spec: str, start: int = 10) -> list[Message]:
    """A probe conversation: s, u, a (system, user, assistant messages), t (a tool result; q: one whose
    content ends with a double quote), 1-3 (an assistant message with that many tool calls), + (one with
    content and two tool calls), * (one with content and one tool call)."""
    names = {"s": "system", "u": "user", "a": "assistant"}
    out: list[Message] = []
    for i, c in enumerate(spec, start):
        if c in names:
            out.append(_msg(names[c], i))
        elif c in "tq":
            out.append(tool_message(_marker("tool", i) + ('"' if c == "q" else ""), i))
        else:
            content = _marker("assistant", i) if c in "+*" else ""
            out.append(calls_message(10 * i, 2 if c == "+" else 1 if c == "*" else int(c), content))
    return out


def _verification_conversations(system: bool) -> list[Probe]:
    """Conversations the decomposition must reproduce (``system``: with a leading system message too)."""
    out: list[Probe] = [
        (_conv("uauau"), True),
        (_conv("uaua"), True),
        (_conv("uaua"), False),
        (_conv("u"), True),
        (_conv("ua"), True),
    ]
    if system:
        out += [(_conv("suau"), True), (_conv("suaua"), False), (_conv("su"), True), (_conv("suauau"), True)]
    return out


def _tool_conversations(system: bool, multi: bool = True) -> list[Probe]:
    """Conversations with tool calls and tool results the tool parts of a decomposition must reproduce
    (``multi``: some with several calls in a message; else each with one)."""
    specs = [("u1tau", 20, True), ("uau+tta", 30, False), ("u1t", 40, True), ("u1t3ttt", 50, True)]
    specs.append(("u1", 60, False))
    if system:
        specs += [("su1ta", 70, True), ("uasu1ta", 80, True)]
    single = str.maketrans({"+": "*", "2": "1", "3": "1"})
    return [(_conv(spec if multi else spec.translate(single), start), gen) for spec, start, gen in specs]


def _verify(fmt: ChatFormat, r: _Renders, probes: list[Probe]) -> None:
    """Each probe renders, with ``r.tools``, what ``fmt`` predicts: byte for byte, or, when the template lays
    JSON out in a way json.dumps does not give on its own, with the JSON compared after parsing."""
    r.run(probes)
    for msgs, gen in probes:
        status, text = r.get(msgs, gen)
        if status != "ok":
            raise TemplateExportError(
                f"the chat template refuses the conversation {_describe(msgs, gen)}: {text}"
            )
        expected = fmt.jinja_equivalent(msgs, gen, r.tools)
        if not fmt.exact_json:
            text, expected = json_normalized(text), json_normalized(expected)
        if text != expected:
            raise TemplateExportError(
                "the chat template cannot be expressed per role (its turns depend on their position or "
                f"neighbours): for {_describe(msgs, gen)}, {_first_difference(expected, text)}"
            )


def _check_trim(fmt: ChatFormat, r: _Renders) -> str | None:
    content = " Zq" + "T1mK \n"
    status, text = r.get([{"role": "user", "content": content}], True)
    if status == "ok" and content not in text:
        got = text[len(fmt.lead) + len(fmt.prefix["user"]) :][: len(content) + 10]
        return (
            "the chat template changes message content at its edges (e.g. trims whitespace: "
            f"{content!r} is rendered as {got!r}...); the Ollama TEMPLATE passes content unchanged, so "
            "prompts differ for messages that start or end with whitespace"
        )
    return None


# ---------------------------------------------------------------------------------------------------
# Go template text
# ---------------------------------------------------------------------------------------------------


def _go_printable(ch: str) -> bool:
    """Go's strconv.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


def _go_quote(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif " " <= ch <= "~":
            out.append(ch)
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def go_literal(s: str, between_actions: bool = False) -> str:
    """``s`` as Go template text: raw where that is safe inside a Modelfile, else a quoted string action.

    Raw text may not contain ``{{`` (an action), end with ``{`` (it would join the next action's
    delimiter), or hold ``"`` (Modelfile quoting), a carriage return or any character Ollama's Modelfile
    parser drops (those outside Go's strconv.IsPrint other than newline and tab). ``between_actions``: the
    text sits between two actions, so a ``"`` in it cannot join a neighbour's into the triple quote that ends
    a Modelfile value: it may hold single ones (Ollama looks for a tool call's opening tag in raw text).
    """
    if not s:
        return ""
    quotes_ok = '"' not in s or (between_actions and '""' not in s)
    raw_ok = (
        "{{" not in s
        and not s.endswith("{")
        and quotes_ok
        and all(ch in "\n\t" or _go_printable(ch) for ch in s)
    )
    return s if raw_ok else "{{ " + _go_quote(s) + " }}"


def _go_text(fmt: ChatFormat, s: str) -> str:
    """A piece of ``fmt`` as Go template text: its literal text, and the tool list where TOOLS_SLOT stands."""
    if TOOLS_SLOT not in s or fmt.tools is None:
        return go_literal(s)
    sep = go_literal(fmt.tools.sep)
    item = "$t.Function" if fmt.tools.function_only else "$t"
    tools = (
        "{{ range $k, $t := $.Tools }}"
        + ("{{ if $k }}" + sep + "{{ end }}" if sep else "")
        + f"{{{{ json {item} }}}}{{{{ end }}}}"
    )
    return tools.join(go_literal(part) for part in s.split(TOOLS_SLOT))


_GO_FIELDS = {
    CALL_ID: "{{ .ID }}",  # in the range over .ToolCalls
    PREV_CALL_ID: "{{ $pid }}",
    TOOL_NAME: "{{ .ToolName }}",  # in a tool message
    CALL_REF: "{{ .ToolCallID }}",
    PREV_TOOL_NAME: "{{ $pname }}",
    PREV_CALL_REF: "{{ $pref }}",
}


def _go_slots(s: str, between_actions: bool = False, fields: dict[str, str] | None = None) -> str:
    """``s`` as Go template text with its slots as the Ollama fields that stand there."""
    fields = {**_GO_FIELDS, **(fields or {})}
    parts = re.split("(" + "|".join(re.escape(slot) for slot in SLOTS) + ")", s)
    return "".join(fields[p] if p in fields else go_literal(p, between_actions) for p in parts)


def _has_slot(*texts: str) -> bool:
    return any(slot in t for t in texts for slot in SLOTS)


def _go_calls(c: CallFormat, plain: str) -> str:
    """The assistant branch: ``plain`` without tool calls, else the calls. The first ``if .ToolCalls``
    opens with the calls' literal opening text: Ollama takes its tool-call tag from there. ``$pid`` holds
    the previous call's id (after the range: the last call's)."""
    content = go_literal(c.no_content)
    if c.with_content:
        before, after = (go_literal(x) for x in c.with_content)
        with_content = "{{ if .Content }}" + before + "{{ .Content }}" + after
        content = with_content + "{{ else }}" + content + "{{ end }}"
    sep = _go_slots(c.sep)
    ids = _has_slot(c.sep, c.close, c.suffix)
    calls = (
        "{{ if .ToolCalls }}"
        + _go_slots(c.open, True, {CALL_ID: "{{ (index .ToolCalls 0).ID }}"})
        + ('{{ $pid := "" }}' if ids else "")
        + "{{ range $j, $_ := .ToolCalls }}"
        + ("{{ if $j }}" + sep + "{{ end }}" if sep else "")
        + "{{ .Function.Name }}"
        + _go_slots(c.mid)
        + "{{ json .Function.Arguments }}"
        + ("{{ $pid = .ID }}" if ids else "")
        + "{{ end }}"
        + _go_slots(c.close)
        + ("" if ids else "{{ end }}")
    )
    suffix = _go_slots(c.suffix)
    if ids:  # $pid is needed in the suffix too: close the ``if .ToolCalls`` after it
        end = "{{ if not $last }}" + suffix + "{{ end }}" if suffix else ""
        return (
            "{{ if eq (len .ToolCalls) 0 }}"
            + plain
            + "{{ else }}"
            + content
            + calls
            + end
            + "{{ end }}{{ end }}"
        )
    end = "{{ if not $last }}" + suffix + "{{ end }}" if suffix else ""
    return "{{ if eq (len .ToolCalls) 0 }}" + plain + "{{ else }}" + content + calls + end + "{{ end }}"


def _go_results(t: ResultFormat) -> str:
    """The tool branch: a run of tool messages opens after a message of another role and closes before one
    (``or`` stops at its first true argument, Go 1.18 on: no next message is looked up after the last)."""
    first, sep, last = _go_slots(t.first), _go_slots(t.sep), _go_slots(t.last)
    opening = first if first == sep else '{{ if eq $prev "tool" }}' + sep + "{{ else }}" + first + "{{ end }}"
    closing = ""
    if last:
        closing = '{{ if or $last (ne (index (slice $.Messages $i) 1).Role "tool") }}' + last + "{{ end }}"
    content = "{{ json .Content }}" if t.json_content else "{{ .Content }}"
    return opening + content + closing


def _go_role(fmt: ChatFormat, role: str) -> str:
    parts = []
    prefix = fmt.prefix[role]
    if fmt.first_bos and prefix.startswith(fmt.first_bos):
        parts.append("{{ if not $first }}" + go_literal(fmt.first_bos) + "{{ end }}")
        prefix = prefix[len(fmt.first_bos) :]
    prefix_go = _go_text(fmt, prefix)
    if role == "user" and fmt.first_user is not None:
        prefix_go = (
            "{{ if eq $i $fu }}" + _go_text(fmt, fmt.first_user) + "{{ else }}" + prefix_go + "{{ end }}"
        )
    elif role == "user" and fmt.last_user is not None:
        prefix_go = (
            "{{ if eq $i $lu }}" + _go_text(fmt, fmt.last_user) + "{{ else }}" + prefix_go + "{{ end }}"
        )
    parts.append(prefix_go)
    if fmt.fold and role == "user":
        before, after = (_go_text(fmt, x) for x in fmt.fold)
        parts.append(
            '{{ if and (eq $i 1) (eq (index $.Messages 0).Role "system") }}'
            + before
            + "{{ (index $.Messages 0).Content }}"
            + after
            + "{{ end }}"
        )
    parts.append("{{ .Content }}")
    suffix = _go_text(fmt, fmt.suffix[role])
    if role == "assistant":
        if suffix:
            parts.append("{{ if not $last }}" + suffix + "{{ end }}")
    else:
        parts.append(suffix)
    if fmt.first_bos:
        parts.append("{{ $first = false }}")
    if role == "assistant" and fmt.calls:
        return _go_calls(fmt.calls, "".join(parts))
    if role == "system" and fmt.mid_system:
        before, after = (go_literal(x) for x in fmt.mid_system)
        return "{{ if $i }}" + before + "{{ .Content }}" + after + "{{ else }}" + "".join(parts) + "{{ end }}"
    return "".join(parts)


def go_template(fmt: ChatFormat) -> str:
    """The Go text/template over ``.Messages`` (``.Tools``) that renders like ``fmt.ollama_equivalent``."""
    parts = [_go_text(fmt, fmt.lead)]
    if fmt.first_bos:
        parts.append("{{ $first := true }}")
    if fmt.results:
        parts.append('{{ $prev := "" }}')
    refs = fmt.results is not None and _has_slot(fmt.results.sep)
    if refs:
        parts.append('{{ $pname := "" }}{{ $pref := "" }}')
    if fmt.first_user is not None:  # the first message after a leading system one
        parts.append(
            '{{ $fu := 0 }}{{ if .Messages }}{{ if eq (index .Messages 0).Role "system" }}{{ $fu = 1 }}'
        )
        parts.append("{{ end }}{{ end }}")
    if fmt.last_user is not None:
        parts.append('{{ $lu := -1 }}{{ range $k, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $lu = $k }}')
        parts.append("{{ end }}{{ end }}")
    parts.append("{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}")
    if fmt.default_system is not None:
        parts.append(
            '{{ if and (eq $i 0) (ne .Role "system") }}' + _go_text(fmt, fmt.default_system) + "{{ end }}"
        )
    keyword = "if"
    roles = [r for r in ROLES if r != "system" or fmt.system] + (["tool"] if fmt.results else [])
    for role in roles:
        parts.append(f'{{{{ {keyword} eq .Role "{role}" }}}}')
        keyword = "else if"
        parts.append(_go_results(fmt.results) if fmt.results and role == "tool" else _go_role(fmt, role))
    parts.append("{{ end }}")
    if fmt.gen_prompt:
        gen = _go_text(fmt, fmt.gen_prompt)
        parts.append('{{ if and $last (ne .Role "assistant") }}' + gen + "{{ end }}")
    if fmt.results:
        parts.append("{{ $prev = .Role }}")
    if refs:
        parts.append("{{ $pname = .ToolName }}{{ $pref = .ToolCallID }}")
    parts.append("{{ end }}")
    return "".join(parts)


def full_template(fmt: ChatFormat, tools_fmt: ChatFormat | None) -> str:
    """The TEMPLATE: ``tools_fmt`` when Ollama passes tools, ``fmt`` otherwise (or only ``fmt``)."""
    if tools_fmt is None:
        return go_template(fmt)
    return "{{ if .Tools }}" + go_template(tools_fmt) + "{{ else }}" + go_template(fmt) + "{{ end }}"


def _stops(fmt: ChatFormat, eos: str) -> list[str]:
    found: list[str] = []
    for s in (fmt.suffix["assistant"], fmt.suffix["user"], fmt.suffix["system"] if fmt.system else "", eos):
        s = s.strip()
        if s and s not in found:
            found.append(s)
    return found


def _settle_system(
    r: _Renders, fmt: ChatFormat, base: ChatFormat, system_note: str | None
) -> tuple[ChatFormat, str | None]:
    """Verify the decomposition; system messages are kept only when they verify too."""
    _verify(base, r, _verification_conversations(False))
    if system_note is not None:
        return base, system_note
    try:
        _verify(fmt, r, _verification_conversations(True))
    except TemplateExportError as e:
        return base, f"system messages: {e}"
    return fmt, None


def _turn_text(r: _Renders, fmt: ChatFormat, head: list[Message], msgs: list[Message]) -> str:
    """What ``msgs`` renders after what ``head`` (its first messages) renders, less the trailer."""
    text, before = _ok_text(r, msgs, False), _ok_text(r, head, False)
    if before.endswith(fmt.trailer):
        before = before[: len(before) - len(fmt.trailer)]
    if not (text.startswith(before) and text.endswith(fmt.trailer)) or len(text) < len(before + fmt.trailer):
        raise ToolsUnsupported(
            f"the chat template renders {_describe(msgs, False)} other than as {_describe(head, False)} "
            f"and one more turn: {_first_difference(before, text)}"
        )
    return text[len(before) : len(text) - len(fmt.trailer)]


def _tool_parts(fmt: ChatFormat, r: _Renders) -> None:
    """Set ``fmt.calls`` and ``fmt.results`` from renders with ``r.tools`` (raises ToolsUnsupported). A
    template that refuses two calls in a message (Llama 3.1/3.2) is decomposed with one."""
    r.run([(_conv(spec), False) for spec in ("u", "u1", "u2", "u+", "u*", "u1t", "u1q", "u2tt", "u1tt")])
    status, refusal = r.get(_conv("u2"), False)
    multi = status != "refused"
    one = _turn_text(r, fmt, _conv("u"), _conv("u1"))
    two = _turn_text(r, fmt, _conv("u"), _conv("u2")) if multi else None
    spec = "u+" if multi else "u*"
    calls = _conv(spec)[1]
    fmt.calls = call_format(
        one,
        two,
        _turn_text(r, fmt, _conv("u"), _conv(spec)),
        calls["content"],
        calls["tool_calls"],
        fmt.suffix["assistant"],
        fmt.prefix["assistant"],
    )
    head = _conv("u2" if multi else "u1")
    run_of_two = _conv("u2tt" if multi else "u1tt")
    fmt.results = result_format(
        _turn_text(r, fmt, _conv("u1"), _conv("u1t")),
        _turn_text(r, fmt, head, run_of_two),
        run_of_two[len(head) :],
        _turn_text(r, fmt, _conv("u1"), _conv("u1q")),
    )
    for part in (fmt.calls, fmt.results):
        for name, text in vars(part).items():
            field = leftover_field(text) if isinstance(text, str) else None
            if field is None and isinstance(text, tuple):
                field = leftover_field("".join(text))
            if field is not None:
                where = "tool calls" if part is fmt.calls else "tool results"
                raise ToolsUnsupported(
                    f"the chat template writes {field} in its {where} ({name}: {text!r}) where the Ollama "
                    "template data has no such field"
                )
    fmt.calls_note = (
        None
        if multi
        else (
            f"the chat template refuses more than one tool call in a message ({refusal}); the TEMPLATE "
            "writes such calls one after another with nothing between them"
        )
    )


def _mid_system(fmt: ChatFormat, r: _Renders) -> tuple[str, str] | None:
    """How a system message after the first message renders, where that differs from a first one."""
    msgs = _conv("us")
    if r.get(msgs, False)[0] == "refused":
        return None  # nothing to reproduce
    turn = _turn_text(r, fmt, _conv("u"), msgs)
    pieces = _cut(turn, [msgs[1]["content"]])
    if pieces is None:
        raise ToolsUnsupported(
            f"with tools, the chat template drops or changes a system message after the first: {_show(turn)}"
        )
    before, after = pieces
    return None if (before, after) == (fmt.prefix["system"], fmt.suffix["system"]) else (before, after)


def _tools_format(r: _Renders, system_note: str | None) -> ChatFormat:
    """The decomposition with tools: the tool list where the template writes it, tool calls and tool
    results, verified on conversations with other tool lists (raises TemplateExportError or
    ToolsUnsupported)."""
    one, two = r.with_tools(PROBE_TOOLS[:1]), r.with_tools(PROBE_TOOLS[:2])
    fmt, base, note = decompose(one)
    if system_note is None and note is not None:
        raise ToolsUnsupported(f"with tools, {note}")
    if system_note is not None:
        fmt = base
    fmt.tools, first = tools_format(
        _ok_text(one, _conv("u"), True), _ok_text(two, _conv("u"), True), PROBE_TOOLS[:2]
    )
    if not fmt.replace_text(first, TOOLS_SLOT):
        raise ToolsUnsupported(f"the chat template writes the tool list across message turns: {first!r}")
    _tool_parts(fmt, one)
    system = system_note is None
    if system and fmt.system:
        fmt.mid_system = _mid_system(fmt, one)
    _verify(fmt, r.with_tools(PROBE_TOOLS[3:]), _verification_conversations(system))
    multi = fmt.calls is not None and not fmt.calls.single
    _verify(fmt, r.with_tools(PROBE_TOOLS[:3]), _tool_conversations(system, multi))
    return fmt


def _derive_tools(
    r: _Renders, fmt: ChatFormat, system_note: str | None, warnings: list[str]
) -> tuple[ChatFormat | None, str | None]:
    """(the format for requests with tools or None, why the template's tools are not rendered or None).
    Adds tool calls and tool results to ``fmt`` (requests without tools) when they verify there too."""
    try:
        status, text = r.with_tools(PROBE_TOOLS[:1]).get(_conv("u"), True)
        if status == "ok" and PROBE_TOOLS[0]["function"]["name"] not in text:
            return None, None  # the template does not write tool definitions: no tool support
        tools_fmt = _tools_format(r, system_note)
    except TemplateExportError as e:  # a template that loops only with tools lands here too
        return None, f"with tools, {e}"
    except ToolsUnsupported as e:
        return None, str(e)
    plain = copy.deepcopy(fmt)
    try:
        _tool_parts(plain, r)
        _verify(plain, r, _tool_conversations(system_note is None, not plain.calls.single))
    except (TemplateExportError, ToolsUnsupported) as e:
        warnings.append(f"without tools in a request, the TEMPLATE renders no tool calls or results: {e}")
    else:
        fmt.calls, fmt.results = plain.calls, plain.results
    if tools_fmt.calls_note:
        warnings.append(f"tools: {tools_fmt.calls_note}")
    fields = _fields_used(tools_fmt)
    if fields:
        warnings.append(
            f"tools: the TEMPLATE uses {', '.join(fields)}: Ollama versions before "
            f"{'0.12.10' if set(fields) - {'.ToolName'} else '0.9.6'} cannot execute it with tools"
        )
    return tools_fmt, None


def _fields_used(fmt: ChatFormat) -> list[str]:
    """The newer Ollama message fields the tool parts of ``fmt`` render."""
    pieces = [v for p in (fmt.calls, fmt.results) if p for v in vars(p).values()]
    text = "".join(v if isinstance(v, str) else "".join(v) if isinstance(v, tuple) else "" for v in pieces)
    used = {".ID": (CALL_ID, PREV_CALL_ID), ".ToolName": (TOOL_NAME, PREV_TOOL_NAME)}
    used[".ToolCallID"] = (CALL_REF, PREV_CALL_REF)
    return [name for name, slots in used.items() if any(slot in text for slot in slots)]


def _leave_bos_to_ollama(fmt: ChatFormat, bos: str, add_bos: bool) -> bool:
    """Take the BOS string out of ``fmt`` when Ollama adds the BOS token itself; whether it did."""
    if not (add_bos and bos):
        return False
    if fmt.lead.startswith(bos):
        fmt.lead = fmt.lead[len(bos) :]
        return True
    if fmt.first_user is not None or fmt.last_user is not None:
        return False  # BOS at a turn that opens otherwise: left in the TEMPLATE
    if not fmt.lead and any(p.startswith(bos) for p in fmt.prefix.values()):
        fmt.first_bos = bos  # a BOS opening every turn (Llama 2): left out of the first one only
        return True
    return False


def derive_ollama_template(source: str, bos: str, eos: str, add_bos: bool) -> OllamaTemplate:
    """Turn a Jinja chat template into an equivalent Go template (see the module docstring).

    Raises :class:`TemplateExportError` when user and assistant turns cannot be reproduced exactly.
    """
    if not source.strip():
        raise TemplateExportError("the chat template is empty")
    renders = _Renders(source, bos, eos)
    fmt, system_note = _settle_system(renders, *decompose(renders))
    warnings: list[str] = []
    if system_note:
        warnings.append(f"{system_note}; the Ollama TEMPLATE renders no system messages")
    trim = _check_trim(fmt, renders)
    if trim:
        warnings.append(trim)
    tools_fmt, tools_note = _derive_tools(renders, fmt, system_note, warnings)
    strip_bos = _leave_bos_to_ollama(fmt, bos, add_bos)
    if tools_fmt and (_leave_bos_to_ollama(tools_fmt, bos, add_bos) != strip_bos or fmt.first_bos):
        tools_fmt, fmt.calls, fmt.results = None, None, None
        tools_note = "the chat template writes the BOS string differently with tools, or at every turn"
    if tools_note:
        warnings.append(f"tools: {tools_note}; the Ollama TEMPLATE renders no tools, tool calls or results")
    return OllamaTemplate(
        template=full_template(fmt, tools_fmt),
        format=fmt,
        stops=_stops(fmt, eos),
        strip_bos=strip_bos,
        bos=bos,
        eos=eos,
        warnings=warnings,
        system_note=system_note,
        tools_format=tools_fmt,
        tools_note=tools_note,
    )
