"""Terminal chat: streaming replies from a GGUF through llama.cpp, with the model's own chat template."""

from __future__ import annotations

import logging
from collections.abc import Callable

from rich.console import Console

from .errors import TemplateRefusedError
from .runtime import ChatModel

log = logging.getLogger(__name__)

HELP = "/reset clears the conversation, /exit (or Ctrl-D) leaves."


def trim_history(model: ChatModel, messages: list[dict[str, str]], reserve: int) -> list[dict[str, str]]:
    """Drop the oldest turns (keeping a system message) until the prompt leaves ``reserve`` tokens free."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    while turns:
        text = "".join(m["content"] for m in system + turns)
        if len(model.tokenize(text)) + 8 * len(system + turns) + reserve <= model.n_ctx:
            break
        turns = turns[2:] if len(turns) > 1 else []
    return system + turns


def chat_loop(
    model: ChatModel,
    *,
    system: str | None = None,
    max_tokens: int = 128,
    temperature: float = 0.0,
    console: Console | None = None,
    read: Callable[[str], str] = input,
) -> None:
    """Read user lines, stream the model's replies, until /exit or end of input."""
    console = console or Console()
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    console.print(f"[bold]{model.name}[/] ({model.path.name}, context {model.n_ctx}). {HELP}")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = history[:1] if system else []
            console.print("[dim](conversation cleared)[/]")
            continue
        history.append({"role": "user", "content": line})
        history = trim_history(model, history, reserve=max_tokens)
        try:  # the template renders (bounded) before the first piece: a refusal leaves nothing printed
            pieces = model.chat(history, stream=True, max_tokens=max_tokens, temperature=temperature)
        except TemplateRefusedError as e:  # the template does not take this conversation: say so, go on
            console.print(f"[yellow]{e}[/] (message not sent)", highlight=False)
            history.pop()
            continue
        console.print("[bold cyan]bot>[/] ", end="")
        reply = []
        for piece in pieces:
            reply.append(piece)
            console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
        console.print()
        history.append({"role": "assistant", "content": "".join(reply).strip()})
