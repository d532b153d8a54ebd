"""Load a chat model behind one small ChatModel interface: a GGUF in llama.cpp (through llama-cpp-python),
or a Hugging Face model folder in transformers (the reference the GGUFs are compared with).

Importing this package imports neither torch nor transformers: a process that only chats with GGUFs stays
small. The transformers backend is imported when a model folder is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import InputError
from .base import DEFAULT_CTX, ChatModel, GenerationSettings, Messages, check_messages
from .llamacpp import (
    RECOMMENDED_CTX_KEY,
    LlamaCppChatModel,
    _chat_pieces,
    _quiet_stderr,
    load_gguf,
    read_context_length,
    read_context_lengths,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_CTX",
    "RECOMMENDED_CTX_KEY",
    "ChatModel",
    "GenerationSettings",
    "LlamaCppChatModel",
    "Messages",
    "TransformersChatModel",
    "load",
    "read_context_length",
    "read_context_lengths",
]

BACKENDS = ("llama.cpp", "transformers")
# names other modules import from here (they predate the package)
_check_messages = check_messages
_private_reexports = (_chat_pieces, _quiet_stderr)


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def load(
    path: str | os.PathLike[str],
    *,
    backend: str | None = None,
    n_ctx: int | None = None,
    n_threads: int | None = None,
    threads: int | None = None,
    n_gpu_layers: int = 0,
    seed: int = 1234,
    verbose: bool = False,
    lora_path: str | os.PathLike[str] | None = None,
    lora_scale: float = 1.0,
    **llama_options: Any,
) -> ChatModel:
    """Load a model: a ``.gguf`` file in llama.cpp, or a Hugging Face model folder in transformers.

    ``backend`` (``"llama.cpp"`` or ``"transformers"``) defaults from the path: a folder is a Hugging Face
    model, a file a GGUF. ``threads`` (or its older name ``n_threads``) defaults to all cores.
    ``n_ctx`` defaults, for a GGUF, to the recommended context stored by ``quantize`` else to
    min(trained context, 2048); for a folder to min(max_position_embeddings, 2048).
    ``n_gpu_layers`` is llama.cpp's offload setting; the transformers backend runs on the CPU.
    ``lora_path``: a GGUF LoRA adapter applied by llama.cpp (scaled by ``lora_scale``).
    ``llama_options``: more llama.cpp settings for a GGUF (``pooling``, ``n_batch``, ``type_k``,
    ``type_v``: see :func:`~gguf_factory.runtime.llamacpp.load_gguf`).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"model file not found: {p}")
    if threads is not None and n_threads is not None and threads != n_threads:
        raise InputError(f"threads={threads} and n_threads={n_threads} disagree: give one")
    threads = threads if threads is not None else n_threads
    if backend is None:
        backend = "transformers" if p.is_dir() else "llama.cpp"
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "llama.cpp":
        if p.is_dir():
            raise InputError(
                f"{p} is a folder: backend 'llama.cpp' loads a .gguf file "
                "(a Hugging Face model folder loads with backend 'transformers')"
            )
        if not p.is_file():
            raise InputError(f"model file is not a file: {p}")
        return load_gguf(
            p, n_ctx=n_ctx, threads=threads, n_gpu_layers=n_gpu_layers, seed=seed, verbose=verbose,
            lora_path=lora_path, lora_scale=lora_scale, **llama_options,
        )  # fmt: skip
    if p.is_file():
        hint = "use backend 'llama.cpp'" if _is_gguf(p) else "give the model's folder"
        what = "a GGUF file" if _is_gguf(p) else "a file"
        raise InputError(f"{p} is {what}: backend 'transformers' loads a Hugging Face model folder ({hint})")
    if n_gpu_layers:
        raise InputError("n_gpu_layers is a llama.cpp setting: the transformers backend runs on the CPU")
    if llama_options:
        raise InputError(f"{', '.join(llama_options)}: llama.cpp settings, for a GGUF only")
    if lora_path is not None:
        raise InputError("lora_path is a GGUF LoRA for llama.cpp: merge a PEFT adapter for transformers")
    from .hf import load_hf

    return load_hf(p, n_ctx=n_ctx, threads=threads, seed=seed)


def __getattr__(name: str) -> Any:  # TransformersChatModel without importing torch up front
    if name == "TransformersChatModel":
        from .hf import TransformersChatModel

        return TransformersChatModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
