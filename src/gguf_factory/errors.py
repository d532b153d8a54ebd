"""Errors whose message is meant for a user.

Every error raised on bad input is a :class:`FactoryError`; the CLI prints its message on one line and
exits with code 2, without a traceback. The message names the file, line or field at fault.
"""

from __future__ import annotations


class FactoryError(Exception):
    """Base class: a problem the user can act on. ``str(err)`` is the whole message."""

    exit_code: int = 2


class InputError(FactoryError):
    """A missing or unreadable input, or an output path that cannot be written."""


class DataError(InputError):
    """Chat data that cannot be read: malformed row, wrong columns, empty dataset."""


class ModelError(InputError):
    """A folder or file that is not a usable model (not a HF model folder, unsupported architecture...)."""


class ConversionError(FactoryError):
    """Conversion to GGUF failed."""


class QuantizeError(FactoryError):
    """llama.cpp's quantizer refused or failed."""


class TrainingError(FactoryError):
    """Training could not run (bad settings, no usable examples)."""


class TemplateError(ModelError):
    """A chat template that cannot be used safely: it does not parse, reaches out of the sandbox, loops,
    or builds more output than allowed. Raised when a model loads and by any later render."""


class TemplateRefusedError(TemplateError):
    """The chat template refused the conversation itself (its ``raise_exception``), e.g. a system role."""
