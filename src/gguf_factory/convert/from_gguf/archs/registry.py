"""The registry of the reverse architecture plug-ins (below the plug-ins and the package importing them)."""

from __future__ import annotations

from ....errors import ModelError
from ..base import ReverseArch
from ..source import GGUFSource

_REGISTRY: dict[str, type[ReverseArch]] = {}


def register(cls: type[ReverseArch]) -> type[ReverseArch]:
    """Class decorator: make ``cls`` the rebuild of its ``gguf_arch``."""
    import gguf

    _REGISTRY[gguf.MODEL_ARCH_NAMES[cls.gguf_arch]] = cls
    return cls


def supported_architectures() -> list[str]:
    """The ``general.architecture`` values a checkpoint can be rebuilt from."""
    return sorted(_REGISTRY)


def reverse_for(src: GGUFSource) -> type[ReverseArch]:
    cls = _REGISTRY.get(src.arch)
    if cls is None:
        raise ModelError(
            f"{src.path}: architecture {src.arch!r} cannot be rebuilt as a Hugging Face checkpoint; "
            f"supported: {', '.join(supported_architectures())}"
        )
    return cls
