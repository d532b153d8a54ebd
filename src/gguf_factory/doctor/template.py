"""Chat-template checks for ``validate`` and ``repair``.

Parsing, the scan for names that reach for Python internals (``__class__``, ``__globals__``...) and the
renders of the probe conversations all happen in a template worker process with a time, CPU and memory
limit (:mod:`gguf_factory.runtime.templates`), the same check every model load runs: a template that
loops for ever, builds a huge string or recurses cannot hang or exhaust the validating process.
"""

from __future__ import annotations

from typing import Any

from ..runtime.template_worker import UNSAFE_ATTRS, RaisedByTemplate, make_environment, render
from ..runtime.templates import (
    CHECK_MAX_CHARS,
    PROBE_CONVERSATIONS,
    SAMPLE_ASSISTANT,
    SAMPLE_USER,
    TemplateProblem,
    check_template,
)

__all__ = [
    "MAX_OUTPUT_CHARS",
    "PROBE_CONVERSATIONS",
    "SAMPLE_ASSISTANT",
    "SAMPLE_USER",
    "UNSAFE_ATTRS",
    "TemplateProblem",
    "check_template",
    "render_chat",
]

MAX_OUTPUT_CHARS = CHECK_MAX_CHARS


def render_chat(source: str, messages: list[dict[str, str]], bos: str, eos: str) -> str:
    """``messages`` through the chat template ``source`` in the sandbox, with the generation prompt,
    in this process.

    Only for a process that is already isolated and bounded (the smoke test's child): raises on an unsafe
    or broken template, or when the output passes MAX_OUTPUT_CHARS; callers fall back to raw text.
    """
    from ..runtime.template_worker import compile_template

    env: Any = make_environment(MAX_OUTPUT_CHARS)
    status, detail, tmpl = compile_template(env, source)
    if tmpl is None:
        raise ValueError(f"the chat template is not usable ({status}): {detail}")
    try:
        return render(
            tmpl,
            {"messages": messages, "add_generation_prompt": True, "bos_token": bos, "eos_token": eos},
            MAX_OUTPUT_CHARS,
        )
    except RaisedByTemplate as e:
        raise ValueError(f"the chat template refused the conversation: {e}") from None
