"""Chat-template checks: parse and render in Jinja's immutable sandbox, in a child process with limits.

The static scan flags attribute or item access that reaches for Python internals (``__class__``,
``__globals__``, ``__subclasses__``...). Rendering runs in a forked child with a CPU-time and memory cap
and a wall-clock timeout, so that a template that loops for ever or builds a huge string cannot hang or
exhaust the validating process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# Attribute names that only serve to climb out of the sandbox.
UNSAFE_ATTRS = frozenset(
    {
        "mro",
        "func_globals",
        "f_globals",
        "f_locals",
        "f_back",
        "gi_frame",
        "gi_code",
        "cr_frame",
        "tb_frame",
        "im_func",
        "func_code",
        "co_code",
    }
)
CHILD_MEMORY_BYTES = 512 * 1024 * 1024
MAX_OUTPUT_CHARS = 1_000_000
SAMPLE_USER = "What is the capital of France?"
SAMPLE_ASSISTANT = "Paris is the capital of France."


@dataclass(frozen=True)
class TemplateProblem:
    code: str  # template-unsafe | template-syntax-error | template-render-error | template-timeout | ...
    message: str


def _unsafe_name(name: object) -> bool:
    return isinstance(name, str) and ((name.startswith("__") and name.endswith("__")) or name in UNSAFE_ATTRS)


def scan_unsafe(source: str) -> list[str]:
    """Names of Python internals the template tries to reach (empty when it parses and looks clean).

    Raises jinja2.TemplateSyntaxError when the template does not parse.
    """
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment()
    ast = env.parse(source)
    found: list[str] = []
    for node in ast.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter, nodes.Name, nodes.Const)):
        if isinstance(node, nodes.Getattr) and _unsafe_name(node.attr):
            found.append(node.attr)
        elif (
            isinstance(node, nodes.Getitem)
            and isinstance(node.arg, nodes.Const)
            and _unsafe_name(node.arg.value)
        ):
            found.append(str(node.arg.value))
        elif isinstance(node, nodes.Filter) and node.name == "attr":
            for a in node.args:
                if isinstance(a, nodes.Const) and _unsafe_name(a.value):
                    found.append(str(a.value))
        elif isinstance(node, nodes.Name) and _unsafe_name(node.name):
            found.append(node.name)
    return sorted(set(found))


class _RaisedByTemplate(Exception):
    """raise_exception() called from the template (a deliberate refusal, e.g. 'system role not supported')."""


def _sandbox_env() -> Any:
    """Jinja's immutable sandbox with the helpers chat templates call (as transformers provides them)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise _RaisedByTemplate(str(message))

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(str(fmt))

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.pop("lipsum", None)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env


def render_chat(source: str, messages: list[dict[str, str]], bos: str, eos: str) -> str:
    """``messages`` through the chat template ``source`` in the sandbox, with the generation prompt.

    For a process that is already isolated (the smoke test's child): raises on an unsafe or broken
    template, or when the output passes MAX_OUTPUT_CHARS; callers fall back to raw text.
    """
    if scan_unsafe(source):
        raise ValueError("the chat template reaches for Python internals")
    parts: list[str] = []
    size = 0
    tmpl = _sandbox_env().from_string(source)
    for piece in tmpl.generate(
        messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos, tools=None
    ):
        parts.append(piece)
        size += len(piece)
        if size > MAX_OUTPUT_CHARS:
            raise ValueError(f"the rendered prompt exceeds {MAX_OUTPUT_CHARS} characters")
    return "".join(parts)


def _render_variants(source: str, bos: str, eos: str) -> tuple[str, str]:
    """In the child: ("ok"|"unsafe"|"syntax"|"render"|"refused", detail)."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import SecurityError

    env = _sandbox_env()
    try:
        tmpl = env.from_string(source)
    except TemplateSyntaxError as e:
        return "syntax", f"line {e.lineno}: {e.message}"
    conversations: list[list[dict[str, str]]] = [
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": SAMPLE_USER},
            {"role": "assistant", "content": SAMPLE_ASSISTANT},
            {"role": "user", "content": SAMPLE_USER},
        ],
        [
            {"role": "user", "content": SAMPLE_USER},
            {"role": "assistant", "content": SAMPLE_ASSISTANT},
            {"role": "user", "content": SAMPLE_USER},
        ],
        [{"role": "user", "content": SAMPLE_USER}],
    ]
    last = ("render", "no conversation rendered")
    for messages in conversations:
        try:
            parts: list[str] = []
            size = 0
            for piece in tmpl.generate(
                messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos, tools=None
            ):
                parts.append(piece)
                size += len(piece)
                if size > MAX_OUTPUT_CHARS:
                    return "render", f"output exceeds {MAX_OUTPUT_CHARS} characters"
            out = "".join(parts)
        except SecurityError as e:
            return "unsafe", str(e)
        except _RaisedByTemplate as e:
            last = ("refused", str(e))
            continue
        except MemoryError:
            return "render", "ran out of memory"
        except Exception as e:  # any runtime error of the template itself
            return "render", f"{type(e).__name__}: {e}"
        if SAMPLE_USER not in out:
            return "ignores", out[:200]
        return "ok", out[:200]
    return last


def _address_space_now() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _child(conn: Any, source: str, bos: str, eos: str, cpu_seconds: int) -> None:
    try:
        # the forked child starts with the parent's address space: allow that plus a fixed headroom
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = _address_space_now() + CHILD_MEMORY_BYTES
        if soft != resource.RLIM_INFINITY:
            cap = min(cap, soft)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    except (ValueError, OSError):
        pass
    try:
        result = _render_variants(source, bos, eos)
    except BaseException as e:  # noqa: BLE001 - the child reports whatever happened
        result = ("render", f"{type(e).__name__}: {e}")
    try:
        conn.send(result)
    finally:
        conn.close()
        os._exit(0)


def check_template(
    source: str, bos: str = "<s>", eos: str = "</s>", timeout: float = 3.0
) -> list[TemplateProblem]:
    """Problems with a chat template (empty list: it parses, looks safe and renders a conversation)."""
    from jinja2 import TemplateSyntaxError

    if not source.strip():
        return [TemplateProblem("template-empty", "the chat template is empty")]
    try:
        unsafe = scan_unsafe(source)
    except TemplateSyntaxError as e:
        return [TemplateProblem("template-syntax-error", f"line {e.lineno}: {e.message}")]
    if unsafe:
        return [
            TemplateProblem(
                "template-unsafe", f"the chat template reaches for Python internals: {', '.join(unsafe)}"
            )
        ]
    status, detail = _render_isolated(source, bos, eos, timeout)
    if status == "ok":
        return []
    if status == "unsafe":
        return [TemplateProblem("template-unsafe", f"the sandbox blocked the template: {detail}")]
    if status == "syntax":
        return [TemplateProblem("template-syntax-error", detail)]
    if status == "timeout":
        return [TemplateProblem("template-timeout", f"rendering did not finish within {timeout:g} s")]
    if status == "ignores":
        return [
            TemplateProblem(
                "template-ignores-messages",
                f"the rendered prompt does not contain the user's message: {detail!r}",
            )
        ]
    if status == "refused":
        return [
            TemplateProblem(
                "template-render-error", f"raise_exception() on every sample conversation: {detail}"
            )
        ]
    return [TemplateProblem("template-render-error", detail)]


def _render_isolated(source: str, bos: str, eos: str, timeout: float) -> tuple[str, str]:
    try:
        ctx = mp.get_context("fork")
    except ValueError:  # no fork (not Linux/macOS): render in-process
        return _render_variants(source, bos, eos)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, source, bos, eos, max(1, int(timeout) + 1)), daemon=True)
    proc.start()
    send.close()
    try:
        if recv.poll(timeout):
            try:
                status, detail = recv.recv()
                return str(status), str(detail)
            except (EOFError, OSError):
                return "render", f"the rendering process died (exit code {proc.exitcode})"
        return "timeout", ""
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        recv.close()
