"""``gguf-factory build``: one manifest (``factory.yaml``) to a universal model, one LoRA adapter per
(sub)domain, a parent GGUF per domain family quantized by use case, GGUF LoRA files, a fitted router, all
validated; every step cached by the hash of its inputs, resumable, local or on Ray."""

from __future__ import annotations

from .build import BuildResult, build
from .manifest import FactoryManifest, read_factory

__all__ = ["BuildResult", "FactoryManifest", "build", "read_factory"]
