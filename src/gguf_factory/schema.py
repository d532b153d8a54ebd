"""YAML files validated by pydantic models (router.yaml, factory.yaml): errors name the file and the field
path, unknown fields are refused, nothing in a file is executed (``yaml.safe_load``)."""

from __future__ import annotations

import os
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from .errors import InputError
from .files import require_file

M = TypeVar("M", bound=BaseModel)


def validation_message(where: object, e: ValidationError) -> str:
    """``where: field.path: problem; ...`` for every error pydantic found."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{where}: " + "; ".join(parts)


def read_yaml_model(path: str | os.PathLike[str], model: type[M], what: str, shape: str) -> M:
    """Read ``path`` (a YAML mapping, ``shape`` says what it should hold) into ``model``."""
    import yaml

    p = require_file(path, what)
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise InputError(f"{p}: a {what} is a YAML mapping with {shape}")
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        raise InputError(validation_message(p, e)) from None
