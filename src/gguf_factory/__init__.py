"""gguf-factory: chat data and Hugging Face causal LMs in, small verified GGUF models out.

The public API. ``import gguf_factory`` stays light: nothing here imports torch or transformers (a chat
process never pays for them); the training and reference code load them when called.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__ as __version__

# Verbs whose module has the verb's own name are bound here eagerly (those modules import no torch), so
# that importing e.g. ``gguf_factory.train.scratch`` later cannot replace the function
# ``gguf_factory.train`` with its module. Reach such submodules with ``from gguf_factory.train import
# scratch``; ``import gguf_factory.train.scratch as scratch`` resolves ``train`` to the function.
from .autoquant import autoquant  # noqa: E402
from .convert import convert  # noqa: E402
from .evaluate import bits_per_byte, evaluate  # noqa: E402
from .ladder import ladder  # noqa: E402
from .merge import merge  # noqa: E402
from .prune import prune  # noqa: E402
from .quantize import quantize  # noqa: E402
from .train import train  # noqa: E402
from .verify import verify  # noqa: E402

_EXPORTS = {
    "prepare": ("data", "prepare"),
    "load": ("runtime", "load"),
    "convert_lora": ("convert.lora", "convert_lora"),
    "compute_imatrix": ("imatrix", "compute_imatrix"),
    "run_demo": ("demo", "run_demo"),
    "AutoQuantizer": ("autoquant", "AutoQuantizer"),
    "build": ("factory", "build"),
    "Router": ("router", "Router"),
    "fit_router": ("router", "fit_router"),
    "run_bench": ("bench", "run_bench"),
    "export_ollama": ("package", "export_ollama"),
    "export_release": ("package", "export_release"),
    "verify_release": ("package", "verify_release"),
    "FactoryError": ("errors", "FactoryError"),
}

__all__ = [
    "autoquant",
    "convert",
    "bits_per_byte",
    "evaluate",
    "ladder",
    "merge",
    "prune",
    "quantize",
    "train",
    "verify",
    *_EXPORTS,
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gguf_factory' has no attribute {name!r}")
    import importlib

    module, attr = _EXPORTS[name]
    return getattr(importlib.import_module(f".{module}", __name__), attr)
