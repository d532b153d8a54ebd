"""Reverse architecture plug-ins: one file per llama.cpp architecture, registered by its
``general.architecture``."""

from __future__ import annotations

from .registry import (  # noqa: F401
    _REGISTRY,
    register,
    register_variant,
    reverse_for,
    supported_architectures,
)

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
from . import mixtral  # noqa: E402, F401
from . import qwen2moe  # noqa: E402, F401
from . import qwen3moe  # noqa: E402, F401
from . import phi2  # noqa: E402, F401
from . import gptneox  # noqa: E402, F401
from . import stablelm  # noqa: E402, F401
from . import falcon  # noqa: E402, F401
from . import olmo2  # noqa: E402, F401
from . import granite  # noqa: E402, F401
from . import starcoder2  # noqa: E402, F401
from . import smollm3  # noqa: E402, F401
# isort: on
