"""Exports: an Ollama Modelfile (TEMPLATE derived from the GGUF's own chat template), LM Studio's folder
layout, a model card, and release folders with SHA256SUMS that ``verify_release`` checks."""

from __future__ import annotations

from .card import model_card, read_ladder
from .info import ModelInfo, read_model_info
from .modelfile import OllamaExport, export_ollama, parse_modelfile, render_modelfile
from .ollama_template import ChatFormat, OllamaTemplate, TemplateExportError, derive_ollama_template
from .release import (
    LMStudioExport,
    ReleaseFinding,
    ReleaseReport,
    ReleaseResult,
    export_lmstudio,
    export_release,
    verify_release,
)

__all__ = [
    "ChatFormat",
    "LMStudioExport",
    "ModelInfo",
    "OllamaExport",
    "OllamaTemplate",
    "ReleaseFinding",
    "ReleaseReport",
    "ReleaseResult",
    "TemplateExportError",
    "derive_ollama_template",
    "export_lmstudio",
    "export_ollama",
    "export_release",
    "model_card",
    "parse_modelfile",
    "read_ladder",
    "read_model_info",
    "render_modelfile",
    "verify_release",
]
