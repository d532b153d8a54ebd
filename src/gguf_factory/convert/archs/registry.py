"""The registry of the architecture plug-ins (below the plug-ins and the package that imports them)."""

from __future__ import annotations

from typing import Any

from ...errors import ModelError
from ..base import ArchConverter

_REGISTRY: dict[str, type[ArchConverter]] = {}


def register(cls: type[ArchConverter]) -> type[ArchConverter]:
    """Class decorator: make ``cls`` the converter of each name in ``cls.hf_architectures``."""
    for name in cls.hf_architectures:
        _REGISTRY[name] = cls
    return cls


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def converter_for(config: dict[str, Any], where: str) -> type[ArchConverter]:
    """The converter class for a parsed config.json (``where`` names the file in messages)."""
    archs = config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if not archs:
        raise ModelError(f"{where} has no 'architectures' entry, so the model type is unknown")
    for a in archs:
        if a in _REGISTRY:
            return _REGISTRY[a]
    raise ModelError(
        f"unsupported architecture {', '.join(map(str, archs))} in {where}; "
        f"supported: {', '.join(supported_architectures())}"
    )
