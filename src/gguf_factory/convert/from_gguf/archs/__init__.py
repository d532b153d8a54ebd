"""Reverse architecture plug-ins: one file per llama.cpp architecture, registered by its
``general.architecture``."""

from __future__ import annotations

from .registry import _REGISTRY, register, reverse_for, supported_architectures  # noqa: F401

# One line per architecture (import registers it).
# isort: off
from . import llama  # noqa: E402, F401
from . import gpt2  # noqa: E402, F401
from . import qwen2  # noqa: E402, F401
from . import phi3  # noqa: E402, F401
from . import gemma2  # noqa: E402, F401
from . import gemma3  # noqa: E402, F401
from . import gemma  # noqa: E402, F401
from . import qwen3  # noqa: E402, F401
# isort: on
