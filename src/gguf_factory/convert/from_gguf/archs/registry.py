"""The registry of the reverse architecture plug-ins (below the plug-ins and the package importing them).

One plain plug-in per llama.cpp architecture (:func:`register`); an architecture that llama.cpp also uses
for another transformers family can add variants (:func:`register_variant`) that claim the files they fit,
e.g. ``llama`` files with ``llama.expert_count`` are Mixtral rebuilds, every other ``llama`` file stays a
Llama one.
"""

from __future__ import annotations

from collections.abc import Callable

from ....errors import ModelError
from ..base import ReverseArch
from ..source import GGUFSource

_REGISTRY: dict[str, type[ReverseArch]] = {}
# architecture -> (claims the file?, plug-in), tried in registration order before the plain plug-in
_VARIANTS: dict[str, list[tuple[Callable[[GGUFSource], bool], type[ReverseArch]]]] = {}


def register(cls: type[ReverseArch]) -> type[ReverseArch]:
    """Class decorator: make ``cls`` the rebuild of its ``gguf_arch``."""
    import gguf

    _REGISTRY[gguf.MODEL_ARCH_NAMES[cls.gguf_arch]] = cls
    return cls


def register_variant(
    claims: Callable[[GGUFSource], bool],
) -> Callable[[type[ReverseArch]], type[ReverseArch]]:
    """Class decorator: ``cls`` rebuilds the files of its ``gguf_arch`` for which ``claims(src)`` is true
    (the architecture's plain plug-in, registered with :func:`register`, keeps every other file)."""
    import gguf

    def deco(cls: type[ReverseArch]) -> type[ReverseArch]:
        _VARIANTS.setdefault(gguf.MODEL_ARCH_NAMES[cls.gguf_arch], []).append((claims, cls))
        return cls

    return deco


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
    for claims, variant in _VARIANTS.get(src.arch, ()):
        if claims(src):
            return variant
    return cls
