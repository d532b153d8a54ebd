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
executes a template; messages with other roles (tool) are not rendered.

BOS: Ollama tokenizes the rendered prompt with the model's ``tokenizer.ggml.add_bos_token`` setting, as
llama.cpp does. When the file sets it and the Jinja render starts with the BOS string, that string is left
out of TEMPLATE (``strip_bos``); otherwise the model would see two BOS tokens. A template that opens
every turn with BOS (Llama 2) keeps it on every turn but the first.
"""

from __future__ import annotations

import copy
import unicodedata
from dataclasses import dataclass, field

from ..errors import FactoryError, TemplateError
from ..runtime.templates import CHECK_MAX_CHARS, render_calls

ROLES = ("system", "user", "assistant")
RENDER_TIMEOUT = 5.0


class TemplateExportError(FactoryError):
    """The chat template cannot be turned into an Ollama TEMPLATE that renders the same text."""


Message = dict[str, str]
Probe = tuple[list[Message], bool]  # (messages, add_generation_prompt)


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
    source: str, probes: list[Probe], bos: str, eos: str, timeout: float = RENDER_TIMEOUT
) -> list[tuple[str, str]]:
    """Render each (messages, add_generation_prompt) in the Jinja sandbox, in a bounded template worker
    (:mod:`gguf_factory.runtime.templates`: time, CPU and memory limits, one request for all probes).

    Returns one (status, text) per probe: status "ok" (text = the render), "refused" (raise_exception),
    "unsafe" or "error". Raises :class:`TemplateExportError` when the template does not parse, reaches for
    Python internals, or the worker dies or runs out of time.
    """
    calls = [
        {"messages": msgs, "add_generation_prompt": gen, "bos_token": bos, "eos_token": eos, "tools": None}
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
    into the first user turn as ``prefix[user] + before + system + after + user content``.
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

    def _rendered(self, role: str) -> bool:
        return role in ("user", "assistant") or (role == "system" and self.system)

    def _folded(self, messages: list[Message], i: int) -> str:
        if self.fold and i == 1 and messages[0]["role"] == "system" and messages[1]["role"] == "user":
            return self.fold[0] + messages[0]["content"] + self.fold[1]
        return ""

    def _default(self, messages: list[Message]) -> str:
        if self.default_system is not None and messages and messages[0]["role"] != "system":
            return self.default_system
        return ""

    def jinja_equivalent(self, messages: list[Message], gen: bool) -> str:
        """What the Jinja template renders, according to this decomposition."""
        out = [self.lead, self._default(messages)]
        for i, m in enumerate(messages):
            role = m["role"]
            if self._rendered(role):
                out += [self.prefix[role], self._folded(messages, i), m["content"], self.suffix[role]]
        out.append(self.gen_prompt if gen else self.trailer)
        return "".join(out)

    def ollama_equivalent(self, messages: list[Message]) -> str:
        """What the emitted Go template renders when Ollama is given ``messages``."""
        messages = merge_turns(messages)
        out = [self.lead, self._default(messages)]
        first = True
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            role = m["role"]
            if self._rendered(role):
                prefix = self.prefix[role]
                if first and self.first_bos and prefix.startswith(self.first_bos):
                    prefix = prefix[len(self.first_bos) :]
                first = False
                out += [prefix, self._folded(messages, i), m["content"]]
                if role != "assistant" or not last:
                    out.append(self.suffix[role])
            if last and role != "assistant":
                out.append(self.gen_prompt)
        return "".join(out)


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
    def __init__(self, source: str, bos: str, eos: str):
        self.source, self.bos, self.eos = source, bos, eos
        self.cache: dict[str, tuple[str, str]] = {}

    def run(self, probes: list[Probe]) -> None:
        todo = [p for p in probes if self.key(p) not in self.cache]
        if todo:
            for p, r in zip(todo, render_probes(self.source, todo, self.bos, self.eos), strict=True):
                self.cache[self.key(p)] = r

    @staticmethod
    def key(p: Probe) -> str:
        msgs, gen = p
        return repr(([(m["role"], m["content"]) for m in msgs], gen))

    def get(self, msgs: list[Message], gen: bool) -> tuple[str, str]:
        p = (msgs, gen)
        self.run([p])
        return self.cache[self.key(p)]


def _describe(msgs: list[Message], gen: bool) -> str:
    roles = ", ".join(m["role"] for m in msgs)
    return f"[{roles}]" + (" with the generation prompt" if gen else "")


def _need(r: _Renders, msgs: list[Message], gen: bool) -> list[str]:
    status, text = r.get(msgs, gen)
    if status != "ok":
        what = "refuses" if status == "refused" else "fails on"
        raise TemplateExportError(f"the chat template {what} the conversation {_describe(msgs, gen)}: {text}")
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


def decompose(source: str, bos: str, eos: str) -> tuple[ChatFormat, ChatFormat, str | None, _Renders]:
    """The per-role decomposition of a chat template, the same without system messages, and why system
    messages are unsupported (or None)."""
    r = _Renders(source, bos, eos)
    u1, a1, u2, s1 = _msg("user", 1), _msg("assistant", 1), _msg("user", 2), _msg("system", 1)
    r.run([([u1], False), ([u1], True), ([u1, a1], False), ([u1, a1, u2], False), ([s1, u1], False)])

    pre, tail_plain = _need(r, [u1], False)
    pre_g, tail_gen = _need(r, [u1], True)
    if pre_g != pre:
        raise TemplateExportError(
            "the chat template renders the first user turn differently with the generation prompt: "
            f"{_show(pre)} vs {_show(pre_g)}"
        )
    su, trailer, gen = _split_tail(tail_plain, tail_gen, eos)
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
    if pre2 != pre or not pre.endswith(pu):
        raise TemplateExportError(
            f"the chat template starts the first user turn ({_show(pre)}) unlike later ones ({_show(pu)})"
        )
    lead = pre[: len(pre) - len(pu)]
    fmt = ChatFormat(
        lead=lead,
        prefix={"user": pu, "assistant": pa, "system": ""},
        suffix={"user": su, "assistant": sa, "system": ""},
        gen_prompt=gen,
        trailer=trailer,
        system=False,
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
        elif pieces[0].startswith(lead) and pieces[1].endswith(pu) and pieces[2] == tail_plain:
            fmt.prefix["system"] = pieces[0][len(lead) :]
            fmt.suffix["system"] = pieces[1][: len(pieces[1]) - len(pu)]
            fmt.system = True
        elif pieces[0].startswith(lead + pu) and pieces[2] == tail_plain:
            fmt.fold = (pieces[0][len(lead + pu) :], pieces[1])
        elif _default_system(fmt, pieces, bos, tail_plain):
            pass
        else:
            system_note = (
                "the chat template renders a system message neither as a turn of its own nor inside the "
                f"first user turn: [system, user] renders {_show(text)}"
            )
    return fmt, base, system_note, r


def _default_system(fmt: ChatFormat, pieces: list[str], bos: str, tail_plain: str) -> bool:
    """A system turn of its own, with a default one in the lead when the conversation has none (Qwen)."""
    pu, lead = fmt.prefix["user"], fmt.lead
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


def _verification_conversations(system: bool) -> list[Probe]:
    """Conversations the decomposition must reproduce (``system``: with a leading system message too)."""

    def conv(roles: str, start: int = 10) -> list[Message]:
        names = {"s": "system", "u": "user", "a": "assistant"}
        return [_msg(names[c], start + i) for i, c in enumerate(roles)]

    out: list[Probe] = [
        (conv("uauau"), True),
        (conv("uaua"), True),
        (conv("uaua"), False),
        (conv("u"), True),
        (conv("ua"), True),
    ]
    if system:
        out += [(conv("suau"), True), (conv("suaua"), False), (conv("su"), True), (conv("suauau"), True)]
    return out


def _verify(fmt: ChatFormat, r: _Renders, system: bool) -> None:
    probes = _verification_conversations(system)
    r.run(probes)
    for msgs, gen in probes:
        status, text = r.get(msgs, gen)
        if status != "ok":
            raise TemplateExportError(
                f"the chat template refuses the conversation {_describe(msgs, gen)}: {text}"
            )
        expected = fmt.jinja_equivalent(msgs, gen)
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


def go_literal(s: str) -> str:
    """``s`` as Go template text: raw where that is safe inside a Modelfile, else a quoted string action.

    Raw text may not contain ``{{`` (an action), end with ``{`` (it would join the next action's
    delimiter), or hold ``"`` (Modelfile quoting), a carriage return or any character Ollama's Modelfile
    parser drops (those outside Go's strconv.IsPrint other than newline and tab).
    """
    if not s:
        return ""
    raw_ok = (
        "{{" not in s
        and not s.endswith("{")
        and '"' not in s
        and all(ch in "\n\t" or _go_printable(ch) for ch in s)
    )
    return s if raw_ok else "{{ " + _go_quote(s) + " }}"


def go_template(fmt: ChatFormat) -> str:
    """The Go text/template over ``.Messages`` that renders like ``fmt.ollama_equivalent``."""
    parts = [go_literal(fmt.lead)]
    if fmt.first_bos:
        parts.append("{{ $first := true }}")
    parts.append("{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}")
    if fmt.default_system is not None:
        parts.append(
            '{{ if and (eq $i 0) (ne .Role "system") }}' + go_literal(fmt.default_system) + "{{ end }}"
        )
    keyword = "if"
    roles = [r for r in ROLES if r != "system" or fmt.system]
    for role in roles:
        parts.append(f'{{{{ {keyword} eq .Role "{role}" }}}}')
        keyword = "else if"
        prefix = fmt.prefix[role]
        if fmt.first_bos and prefix.startswith(fmt.first_bos):
            parts.append("{{ if not $first }}" + go_literal(fmt.first_bos) + "{{ end }}")
            prefix = prefix[len(fmt.first_bos) :]
        parts.append(go_literal(prefix))
        if fmt.fold and role == "user":
            before, after = (go_literal(x) for x in fmt.fold)
            parts.append(
                '{{ if and (eq $i 1) (eq (index $.Messages 0).Role "system") }}'
                + before
                + "{{ (index $.Messages 0).Content }}"
                + after
                + "{{ end }}"
            )
        parts.append("{{ .Content }}")
        suffix = go_literal(fmt.suffix[role])
        if role == "assistant":
            if suffix:
                parts.append("{{ if not $last }}" + suffix + "{{ end }}")
        else:
            parts.append(suffix)
        if fmt.first_bos:
            parts.append("{{ $first = false }}")
    parts.append("{{ end }}")
    if fmt.gen_prompt:
        parts.append('{{ if and $last (ne .Role "assistant") }}' + go_literal(fmt.gen_prompt) + "{{ end }}")
    parts.append("{{ end }}")
    return "".join(parts)


def _stops(fmt: ChatFormat, eos: str) -> list[str]:
    found: list[str] = []
    for s in (fmt.suffix["assistant"], fmt.suffix["user"], fmt.suffix["system"] if fmt.system else "", eos):
        s = s.strip()
        if s and s not in found:
            found.append(s)
    return found


def derive_ollama_template(source: str, bos: str, eos: str, add_bos: bool) -> OllamaTemplate:
    """Turn a Jinja chat template into an equivalent Go template (see the module docstring).

    Raises :class:`TemplateExportError` when user and assistant turns cannot be reproduced exactly.
    """
    if not source.strip():
        raise TemplateExportError("the chat template is empty")
    fmt, base, system_note, renders = decompose(source, bos, eos)
    _verify(base, renders, system=False)
    if system_note is None:
        try:
            _verify(fmt, renders, system=True)
        except TemplateExportError as e:
            fmt, system_note = base, f"system messages: {e}"
    else:
        fmt = base
    warnings: list[str] = []
    if system_note:
        warnings.append(f"{system_note}; the Ollama TEMPLATE renders no system messages")
    trim = _check_trim(fmt, renders)
    if trim:
        warnings.append(trim)
    strip_bos = False
    if add_bos and bos:
        if fmt.lead.startswith(bos):
            fmt.lead = fmt.lead[len(bos) :]
            strip_bos = True
        elif not fmt.lead and any(p.startswith(bos) for p in fmt.prefix.values()):
            fmt.first_bos = bos  # a BOS opening every turn (Llama 2): left out of the first one only
            strip_bos = True
    return OllamaTemplate(
        template=go_template(fmt),
        format=fmt,
        stops=_stops(fmt, eos),
        strip_bos=strip_bos,
        bos=bos,
        eos=eos,
        warnings=warnings,
        system_note=system_note,
    )
