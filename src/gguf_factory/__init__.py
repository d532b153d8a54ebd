"""gguf-factory: chat data and Hugging Face causal LMs in, small verified GGUF models out.

The public API. ``import gguf_factory`` stays light: nothing here imports torch or transformers (a chat
process never pays for them); the training and reference code load them when called.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from ._version import __version__ as __version__

# The verbs, like the rest of the API, are imported on first use (PEP 562 ``__getattr__``): a chat process
# that imports ``gguf_factory.runtime`` pays neither for gguf-py nor for pydantic (about 17 MB of RSS).
# Nine verbs share their name with the module that defines them (``gguf_factory.train`` the function,
# ``gguf_factory/train/`` the package); importing such a module makes Python bind it on the package, which
# would hide the function. ``_Package.__setattr__`` refuses that binding, so ``gguf_factory.train`` is the
# function whatever was imported first. Reach such submodules with ``from gguf_factory.train import
# scratch``; ``import gguf_factory.train.scratch as scratch`` resolves ``train`` to the function.
_VERBS = ("autoquant", "convert", "evaluate", "ladder", "merge", "prune", "quantize", "train", "verify")

_EXPORTS = {
    **{verb: (verb, verb) for verb in _VERBS},
    "bits_per_byte": ("evaluate", "bits_per_byte"),
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

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gguf_factory' has no attribute {name!r}")
    import importlib

    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    if name in _VERBS:
        types.ModuleType.__setattr__(sys.modules[__name__], name, value)  # later lookups skip this
    return value


class _Package(types.ModuleType):
    """The package's module type: a verb's name never gets rebound to the module of the same name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _VERBS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
