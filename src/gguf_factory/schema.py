"""YAML files validated by pydantic models (router.yaml, factory.yaml): errors name the file and the field
path, unknown fields are refused, nothing in a file is executed (``yaml.safe_load``)."""

from __future__ import annotations

import os
from typing import Any, TypeVar

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


MAX_YAML_BYTES = 8 << 20
"""A manifest, recipe or config larger than this is refused before it is parsed."""
MAX_YAML_NODES = 100_000
"""Nodes a YAML document may expand to once its aliases are followed: ``&a [x, x, ...]`` aliased ten times
over seven levels is 10^7 nodes from 500 bytes (the "billion laughs"); real manifests have hundreds."""


def check_yaml_expansion(root: Any, where: object, budget: int = MAX_YAML_NODES) -> None:
    """Refuse (:class:`InputError`) a composed YAML node graph that expands to more than ``budget`` nodes
    or refers to itself. Linear in the number of distinct nodes: each one's expanded size is counted once."""
    import yaml

    sizes: dict[int, int] = {}
    stack: list[tuple[Any, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        if isinstance(node, yaml.ScalarNode) or node is None:
            sizes[key] = 1
            continue
        if isinstance(node, yaml.MappingNode):
            items = [x for pair in node.value for x in pair]
        else:
            items = list(node.value)
        if children_done:
            open_nodes.discard(key)
            total = 1 + sum(sizes[id(c)] for c in items)
            if total > budget:
                raise InputError(
                    f"{where}: the YAML expands to more than {budget} values once its aliases are followed "
                    "(an alias bomb?): refused"
                )
            sizes[key] = total
            continue
        if key in open_nodes:
            raise InputError(f"{where}: the YAML refers to itself through an alias: refused")
        open_nodes.add(key)
        stack.append((node, True))
        for c in items:
            if id(c) in open_nodes:
                raise InputError(f"{where}: the YAML refers to itself through an alias: refused")
            if id(c) not in sizes:
                stack.append((c, False))


def safe_yaml(text: str, where: object) -> Any:
    """``yaml.safe_load`` with limits: the text's size, and the document's size once aliases are
    expanded (:func:`check_yaml_expansion`), checked on the composed nodes before anything is built.
    Raises :class:`InputError` naming ``where``; returns None for an empty document."""
    import yaml

    if len(text) > MAX_YAML_BYTES:
        raise InputError(f"{where}: {len(text)} characters of YAML, over the limit of {MAX_YAML_BYTES}")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check_yaml_expansion(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise InputError(f"{where}: not valid YAML: {e}") from None
    finally:
        loader.dispose()


def read_yaml_text(path: str | os.PathLike[str], what: str) -> tuple[Any, Any]:
    """(the path, its YAML document) read with :func:`safe_yaml`; the file is size-checked first."""
    p = require_file(path, what)
    if p.stat().st_size > MAX_YAML_BYTES:
        raise InputError(f"{p}: {p.stat().st_size} bytes, over the {MAX_YAML_BYTES}-byte limit for a {what}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: not valid YAML: {e}") from None
    return p, safe_yaml(text, p)


def read_yaml_model(path: str | os.PathLike[str], model: type[M], what: str, shape: str) -> M:
    """Read ``path`` (a YAML mapping, ``shape`` says what it should hold) into ``model``."""
    p, doc = read_yaml_text(path, what)
    if not isinstance(doc, dict):
        raise InputError(f"{p}: a {what} is a YAML mapping with {shape}")
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        raise InputError(validation_message(p, e)) from None
