"""Chat generation under a grammar or with extra template variables (``tools``), for the server.

A plain chat request goes through llama-cpp-python's ``create_chat_completion`` (the GGUF's template,
rendered bounded by :class:`~gguf_factory.runtime.templates.BoundedChatFormatter`). A constrained one
(``response_format``, ``grammar``, ``tools``) needs what that handler does not give: a grammar from a JSON
schema, tool definitions among the template's variables, and no stop *string*: under a grammar the reply
ends where the grammar lets llama.cpp sample the end-of-turn token, and a stop string matched inside a JSON
string would cut the reply short. So the prompt is rendered here, through the same bounded formatter, and
completed with ``create_completion``; the output has ``create_chat_completion``'s shape.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..runtime import ChatModel
from ..runtime.templates import cancel_requested


def render(model: ChatModel, messages: Sequence[Mapping[str, Any]], **variables: Any) -> str:
    """``messages`` through the model's chat template with ``variables`` (bounded: a worker process)."""
    return str(model.formatter().render(messages, **variables))  # type: ignore[attr-defined]


def prompt_tokens(model: ChatModel, messages: Sequence[Mapping[str, Any]], **variables: Any) -> list[int]:
    text = render(model, messages, **variables)
    return list(model.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))  # type: ignore[attr-defined]


def chat_completion(
    model: ChatModel,
    messages: Sequence[Mapping[str, Any]],
    *,
    grammar: str | None = None,
    variables: Mapping[str, Any] | None = None,
    stream: bool = False,
    **settings: Any,
) -> Any:
    """A chat completion (``create_chat_completion``'s dict, or its chunks when ``stream``), sampled under
    ``grammar`` (GBNF text) when given, with ``variables`` (e.g. ``tools``) passed to the chat template."""
    from llama_cpp import StoppingCriteriaList
    from llama_cpp.llama_grammar import LlamaGrammar

    llm = model.llm  # type: ignore[attr-defined]
    g = LlamaGrammar.from_string(grammar, verbose=False) if grammar else None
    stopping = StoppingCriteriaList([lambda *_: cancel_requested()])
    if not model.chat_template:  # no template in the GGUF: llama-cpp-python's own chat format
        return llm.create_chat_completion(
            messages=[dict(m) for m in messages], grammar=g, stream=stream, **settings
        )
    ids = prompt_tokens(model, messages, **dict(variables or {}))
    formatter = model.formatter()  # type: ignore[attr-defined]
    stop = settings.pop("stop", None)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if g is None and formatter.eos_token:
        stops.append(formatter.eos_token)  # as the chat handler does without a grammar
    out = llm.create_completion(
        prompt=ids, grammar=g, stream=stream, stop=stops or None, stopping_criteria=stopping, **settings
    )
    return _chunks_to_chat(out) if stream else _to_chat(out)


def _to_chat(completion: dict[str, Any]) -> dict[str, Any]:
    choice = completion["choices"][0]
    return {
        "id": "chat" + completion["id"],
        "object": "chat.completion",
        "created": completion["created"],
        "model": completion["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": choice["text"]},
                "logprobs": None,
                "finish_reason": choice["finish_reason"],
            }
        ],
        "usage": completion["usage"],
    }


def _chunks_to_chat(chunks: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    try:
        for c in chunks:
            choice = c["choices"][0]
            text = choice.get("text") or ""
            yield {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": c.get("model", ""),
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": text} if text else {},
                        "logprobs": None,
                        "finish_reason": choice.get("finish_reason"),
                    }
                ],
            }
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
