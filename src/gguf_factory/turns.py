"""Where the assistant turns lie in a rendered conversation: the one definition of the spans training
learns and evaluation scores.

Torch-free and import-free (nothing of the package): :mod:`gguf_factory.train.loop` calls it with a
Hugging Face tokenizer's ``apply_chat_template``, :mod:`gguf_factory.evaluate` with the GGUF's bounded
chat template.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Render = Callable[[Sequence[dict[str, str]], bool], str]
"""``render(messages, add_generation_prompt)`` -> the conversation as text."""


def assistant_spans(
    render: Render, messages: Sequence[dict[str, str]], eos_token: str | None = None
) -> tuple[str, list[tuple[int, int, int]]]:
    """The rendered conversation and its assistant turns as (message index, start, end) character spans.

    A span is found by rendering prefixes of the conversation, not by pattern matching on the output: the
    span of assistant turn *i* starts where ``messages[:i]`` rendered *with* the generation prompt ends, and
    ends where ``messages[:i+1]`` rendered ends, less trailing whitespace (so ChatML's ``<|im_end|>`` is in
    and the newline after it is out). A turn whose prefix does not render as a prefix of the whole
    conversation (templates that rewrite history, e.g. drop reasoning) is located by its content instead,
    followed by ``eos_token`` when present. Spans are in order and never overlap: a turn that would start
    before the end of the previous span is left out.
    """
    full = render(messages, False)
    spans: list[tuple[int, int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = end = -1
        try:
            before = render(messages[:i], True)
            upto = render(messages[: i + 1], False)
        except Exception:  # a template that refuses a prefix (e.g. must start with a user turn)
            before = upto = None
        if before is not None and upto is not None and full.startswith(upto) and upto.startswith(before):
            start, end = len(before), len(upto.rstrip())
        else:
            idx = full.find(m["content"], cursor) if m["content"] else -1
            if idx >= 0:
                start, end = idx, idx + len(m["content"])
                if eos_token and full.startswith(eos_token, end):
                    end += len(eos_token)
        if cursor <= start < end:
            spans.append((i, start, end))
            cursor = end
    return full, spans
