"""Doctor: inspect, validate (and repair) GGUF files, on top of a reader that hostile files cannot hurt."""

from __future__ import annotations

from .inspect import InspectReport, inspect_gguf
from .reader import GGUFFile, GGUFFormatError, KVEntry, ReadIssue, TensorInfo, read_gguf
from .validate import CATALOG, Finding, Severity, ValidationReport, validate

__all__ = [
    "CATALOG",
    "Finding",
    "GGUFFile",
    "GGUFFormatError",
    "InspectReport",
    "KVEntry",
    "ReadIssue",
    "Severity",
    "TensorInfo",
    "ValidationReport",
    "inspect_gguf",
    "read_gguf",
    "validate",
]
