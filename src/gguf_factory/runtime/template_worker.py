"""Chat templates in Jinja's immutable sandbox, run in a process of its own.

:mod:`gguf_factory.runtime.templates` starts this file as a script (``python -P template_worker.py``, so
that it imports nothing but the standard library and jinja2, in about 50 ms) and talks to it over pipes:
one JSON request per line on stdin, one JSON reply per line on stdout (JSON both ways: nothing the
worker sends back is ever unpickled). The parent bounds each request by wall-clock time and kills the
worker when it runs over (every platform); here the worker caps its own address space (Linux) and, per
request, its CPU time (POSIX), importing ``resource`` only where it is used. A template that loops, builds
a huge string or recurses costs a bounded amount of time and memory, never the caller's process.

A request: ``{"source": str, "calls": [variables, ...], "max_chars": int, "cpu_seconds": float}``. The
template is parsed once (cached by its text), checked for names that only serve to climb out of the
sandbox, then rendered once per ``variables`` dict (``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``...). The reply: ``{"parse": [status, detail], "results": [[status, text],
...], "recycle": bool}``; parse status ``ok | syntax | unsafe``, result status ``ok`` (text = the
render), ``raised`` (the template called ``raise_exception``), ``unsafe`` (the sandbox blocked it),
``too-large`` (the output passed ``max_chars``), ``memory`` or ``error``.

The environment is the one llama-cpp-python's ``Jinja2ChatFormatter`` and transformers' chat templates
use (trim_blocks, lstrip_blocks, ``loopcontrols``, the ``{% generation %}`` tag, ``tojson``,
``raise_exception``, ``strftime_now``), so a render here equals theirs byte for byte, plus: string and
list repetition and ``**`` refuse results over the output limit before computing them.
"""

from __future__ import annotations

import json
import operator
import sys
from datetime import datetime
from typing import Any

DEFAULT_MAX_CHARS = 8_000_000
MAX_POWER_BITS = 4096  # `a ** b` whose result would need more bits is refused
CACHE_SIZE = 8

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


class RaisedByTemplate(Exception):
    """raise_exception() called from the template (a deliberate refusal, e.g. 'system role not supported')."""


class OutputTooLarge(Exception):
    """The render (or one value built while rendering) passed the output limit."""


def _unsafe_name(name: object) -> bool:
    return isinstance(name, str) and ((name.startswith("__") and name.endswith("__")) or name in UNSAFE_ATTRS)


def scan_unsafe(env: Any, source: str) -> list[str]:
    """Names of Python internals the template reaches for (raises jinja2.TemplateSyntaxError)."""
    from jinja2 import nodes

    found: list[str] = []
    for node in env.parse(source).find_all((nodes.Getattr, nodes.Getitem, nodes.Filter, nodes.Name)):
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


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' (and llama-cpp-python's) ``tojson``: plain json.dumps, no HTML escaping."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def make_environment(max_chars: int = DEFAULT_MAX_CHARS) -> Any:
    """The chat-template environment (see the module docstring)."""
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """transformers' ``{% generation %}...{% endgeneration %}``: renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
            if op == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, str | list | tuple) and isinstance(n, int):
                        if len(seq) * max(n, 0) > max_chars:
                            raise OutputTooLarge(f"{len(seq)} × {n} items is over the limit of {max_chars}")
                return operator.mul(left, right)
            if op == "**":
                if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
                    if right * max(abs(left).bit_length(), 1) > MAX_POWER_BITS:
                        raise OutputTooLarge(f"{left} ** {right} is too large")
                return operator.pow(left, right)
            return super().call_binop(context, op, left, right)

    def raise_exception(message: str) -> None:
        raise RaisedByTemplate(str(message))

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(str(fmt))

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.globals.pop("lipsum", None)  # builds text from a word list: nothing a chat template needs
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    env.filters["tojson"] = _tojson
    return env


def render(template: Any, variables: dict[str, Any], max_chars: int) -> str:
    """One render, streamed so that it stops as soon as the output passes ``max_chars``."""
    parts: list[str] = []
    size = 0
    for piece in template.generate(**variables):
        size += len(piece)
        if size > max_chars:
            raise OutputTooLarge(f"the rendered prompt exceeds {max_chars} characters")
        parts.append(piece)
    return "".join(parts)


def render_one(template: Any, variables: dict[str, Any], max_chars: int) -> tuple[str, str]:
    """(status, text or reason) for one render; never raises for the template's own behaviour."""
    from jinja2.sandbox import SecurityError

    try:
        return "ok", render(template, variables, max_chars)
    except RaisedByTemplate as e:
        return "raised", str(e)
    except SecurityError as e:
        return "unsafe", str(e)
    except OutputTooLarge as e:
        return "too-large", str(e)
    except MemoryError:
        return "memory", "rendering ran out of memory"
    except RecursionError:
        return "error", "the template recursed too deeply"
    except Exception as e:  # any runtime error of the template itself
        return "error", f"{type(e).__name__}: {e}"


def compile_template(env: Any, source: str) -> tuple[str, str, Any]:
    """(status, detail, template): status ok | syntax | unsafe."""
    from jinja2 import TemplateSyntaxError

    try:
        unsafe = scan_unsafe(env, source)
        if unsafe:
            return "unsafe", ", ".join(unsafe), None
        return "ok", "", env.from_string(source)
    except TemplateSyntaxError as e:
        return "syntax", f"line {e.lineno}: {e.message}", None
    except RecursionError:
        return "syntax", "the template nests too deeply to parse", None
    except MemoryError:
        return "syntax", "parsing the template ran out of memory", None


def _limit_memory(extra_bytes: int) -> None:
    """Cap this process's address space at what it uses now plus ``extra_bytes`` (POSIX)."""
    try:
        import resource
    except ImportError:  # Windows: the parent's timeout and the output limit still apply
        return
    try:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return  # not Linux (macOS reserves address space it never uses): the timeout and output limit only
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = now + extra_bytes
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass


def _limit_cpu(seconds: float | None) -> None:
    """Let this process use at most ``seconds`` more CPU time (POSIX; None lifts the limit)."""
    try:
        import resource
    except ImportError:
        return
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        if seconds is None:
            resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
            return
        usage = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(usage.ru_utime + usage.ru_stime + seconds) + 1
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    except (ValueError, OSError):
        pass


def handle(request: dict[str, Any], cache: dict[tuple[str, int], tuple[str, str, Any]]) -> dict[str, Any]:
    source = str(request.get("source", ""))
    max_chars = int(request.get("max_chars") or DEFAULT_MAX_CHARS)
    key = (source, max_chars)
    compiled = cache.get(key)
    if compiled is None:
        compiled = compile_template(make_environment(max_chars), source)
        if len(cache) >= CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = compiled
    status, detail, template = compiled
    results = []
    if template is not None:
        results = [render_one(template, dict(v), max_chars) for v in request.get("calls", [])]
    recycle = any(s == "memory" for s, _ in results)
    return {"parse": [status, detail], "results": results, "recycle": recycle}


def main(argv: list[str]) -> None:
    memory_bytes = int(argv[1]) if len(argv) > 1 else 512 << 20
    import jinja2.ext  # noqa: F401 - imported before the limits and the "ready" line, not in a request's time
    import jinja2.sandbox  # noqa: F401

    _limit_memory(memory_bytes)
    stdin = sys.stdin.buffer
    stdout = sys.stdout.buffer
    cache: dict[tuple[str, int], tuple[str, str, Any]] = {}
    stdout.write(b'{"ready": true}\n')
    stdout.flush()
    for line in stdin:
        try:
            request = json.loads(line)
            _limit_cpu(float(request.get("cpu_seconds") or 10.0))
            reply = handle(request, cache)
            _limit_cpu(None)
        except MemoryError:
            reply = {"parse": ["ok", ""], "results": [], "error": "out of memory", "recycle": True}
        except Exception as e:  # a malformed request: report it, keep serving
            reply = {"parse": ["ok", ""], "results": [], "error": f"{type(e).__name__}: {e}"}
        stdout.write(json.dumps(reply).encode("utf-8") + b"\n")
        stdout.flush()
        if reply.get("recycle"):
            return


if __name__ == "__main__":
    main(sys.argv)
