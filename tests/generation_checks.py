"""Checks on what a loaded GGUF generates, for tests that used to stop at ``generate(...) is not None``
(a string is never None).

The token ids are the model's own greedy predictions: the argmax of llama.cpp's logits at every step, and
an end-of-generation token where it stopped early. The text is exactly what those ids spell (when they
spell whole characters: after a lone byte-level token llama-cpp-python goes on generating until the
character is complete), and non-empty for a trained model (a random-weight one may end at once or emit
only whitespace: ``nonempty=False``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0}  # no penalty: the greedy token is the logits' argmax


def greedy_tokens(m: Any, ids: list[int], max_tokens: int) -> list[int]:
    """The greedy continuation of ``ids``, each token checked against the argmax of the logits; fewer
    than ``max_tokens`` only where the argmax ends generation."""
    toks = list(m.generate_tokens(ids, max_tokens=max_tokens, **GREEDY))
    assert len(toks) <= max_tokens
    logits = m.logits(ids + toks)
    expected = [int(np.argmax(logits[len(ids) - 1 + k])) for k in range(len(toks))]
    assert toks == expected, (toks, expected)
    if len(toks) < max_tokens:
        last = int(np.argmax(logits[-1]))
        assert m.is_end_of_generation(last), f"stopped after {toks} though the argmax {last} goes on"
    return toks


def _spelled(m: Any, toks: list[int]) -> str | None:
    """The text of ``toks``, or None when they end inside a UTF-8 character (see the module docstring)."""
    text = m.detokenize(toks)
    return None if "\ufffd" in text else text


def assert_generates(m: Any, prompt: str, max_tokens: int = 4, *, nonempty: bool = True) -> str:
    """``m.generate(prompt)`` (greedy) returns the text of the model's own greedy tokens."""
    text = m.generate(prompt, max_tokens=max_tokens, **GREEDY)
    assert isinstance(text, str) and (text or not nonempty), repr(text)
    toks = greedy_tokens(m, m.tokenize(prompt, special=True, add_bos=True), max_tokens)
    expected = _spelled(m, toks)
    assert expected is None or text == expected, (text, toks)
    return text


def assert_chats(
    m: Any, messages: list[dict[str, str]], max_tokens: int = 4, *, nonempty: bool = True
) -> str:
    """``m.chat(messages)`` (greedy) returns the reply the chat template's prompt ids lead to."""
    reply = m.chat(messages, max_tokens=max_tokens, **GREEDY)
    assert isinstance(reply, str) and (reply.strip() or not nonempty), repr(reply)
    toks = greedy_tokens(m, m.prompt_ids(messages), max_tokens)
    expected = _spelled(m, toks)
    assert expected is None or reply == expected.strip(), (reply, toks)
    return reply
