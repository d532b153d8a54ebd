"""Constrained output for the server: ``response_format`` (``json_object``, ``json_schema``) and the
``grammar`` extension, as llama.cpp GBNF grammars.

A JSON schema becomes a grammar through llama-cpp-python's own converter
(:func:`llama_cpp.llama_grammar.json_schema_to_gbnf`). That converter enforces a subset of JSON Schema and
silently drops the rest (``minimum``, ``uniqueItems``, ``maxLength`` next to a ``pattern``...). A reply
sampled under the grammar must match the schema, so :func:`check_schema` mirrors the converter's choice
for every subschema and refuses, with a 400 naming the keyword and its place, any keyword the grammar
would not enforce. Annotations (``title``, ``description``, ``default``...) are dropped, and so is
``format`` outside the formats the converter knows (``date``, ``time``, ``date-time``, ``uuid``): JSON
Schema validators treat unknown formats as annotations too.

Bounded: nesting depth, number of subschemas, repetition counts (``maxItems``, ``maxLength``...) and the
grammar's size are capped; remote ``$ref`` is refused (the converter would fetch it); a user grammar is
parsed by llama.cpp itself before generation (:func:`check_grammar`), so a malformed one is a 400, never
a crash.

What the guarantee covers: a reply that ends by itself (``finish_reason: "stop"``) parses and matches.
A reply cut by ``max_tokens`` is incomplete and says so with ``finish_reason: "length"``, as OpenAI's API
does.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

MAX_DEPTH = 32  # nesting of subschemas
MAX_NODES = 2000  # subschemas in one schema
MAX_REPEAT = 1000  # minItems/maxItems/minLength/maxLength, and {m,n} counts in a user grammar
MAX_ENUM = 1000
MAX_GRAMMAR_CHARS = 256 * 1024

ANNOTATIONS = frozenset(
    {
        "title", "description", "$schema", "$id", "$comment", "examples", "default", "deprecated",
        "readOnly", "writeOnly", "contentMediaType", "contentEncoding", "discriminator", "nullable",
        "$anchor",
    }
)  # fmt: skip
JSON_TYPES = ("string", "number", "integer", "boolean", "null", "array", "object")
KNOWN_FORMATS = ("date", "time", "date-time")  # the converter's string formats (besides uuid)
ANY_VALUE = {"type": ["object", "array", "string", "number", "boolean", "null"]}


class BadField(InputError):
    """A request field the server cannot use; ``param`` names it (OpenAI's error ``param``)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class Constraint:
    """A grammar every token of the reply is sampled under."""

    kind: str  # json_object | json_schema | grammar
    grammar: str
    schema: dict[str, Any] | None = None  # the schema as given (json_schema), for a client to check
    is_json: bool = True

    @property
    def param(self) -> str:
        """The request field the grammar came from (for errors)."""
        return "grammar" if self.kind == "grammar" else "response_format"


# --- response_format ------------------------------------------------------------------------------
def constraint_for(response_format: Any, grammar: Any) -> Constraint | None:
    """The constraint a chat request asks for, or None. Raises :class:`BadField`."""
    fmt = _response_format(response_format)
    if grammar is not None:
        if fmt is not None:
            raise BadField("grammar", "give either grammar or a JSON response_format, not both")
        return Constraint("grammar", check_grammar_text(grammar), is_json=False)
    return fmt


def _response_format(rf: Any) -> Constraint | None:
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise BadField("response_format", 'must be an object such as {"type": "json_object"}')
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = rf.get("schema")  # llama-cpp-python's extension: a schema inside json_object
        if schema is not None:
            return Constraint("json_schema", schema_grammar(schema, "response_format.schema"), schema)
        return Constraint("json_object", schema_grammar({"type": "object"}, "response_format"))
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise BadField(
                "response_format.json_schema",
                'give {"name": ..., "schema": {...}} with type json_schema',
            )
        schema = spec.get("schema")
        if schema is None:
            raise BadField("response_format.json_schema.schema", "give the JSON schema the reply must match")
        return Constraint("json_schema", schema_grammar(schema, "response_format.json_schema.schema"), schema)
    raise BadField("response_format.type", f"unknown type {kind!r}: use text, json_object or json_schema")


# --- JSON schema → grammar ------------------------------------------------------------------------
_cache: OrderedDict[str, str] = OrderedDict()
_cache_lock = threading.Lock()
CACHE_SIZE = 128


def schema_grammar(schema: Any, param: str = "schema") -> str:
    """The GBNF grammar for ``schema`` (checked by :func:`check_schema`), cached by the schema's text."""
    try:
        key = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise BadField(param, f"not a JSON schema: {e}") from None
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    normalized = check_schema(schema, param)
    try:
        grammar = json_schema_to_gbnf(json.dumps(normalized))
    except RecursionError:
        raise BadField(param, "the schema nests too deeply") from None
    except Exception as e:  # the converter's asserts and KeyErrors on shapes it does not take
        raise BadField(param, f"cannot turn this schema into a grammar: {type(e).__name__}: {e}") from None
    grammar = _json_safe(grammar)
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise BadField(param, f"the schema's grammar is over {MAX_GRAMMAR_CHARS} characters: simplify it")
    with _cache_lock:
        _cache[key] = grammar
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return grammar


# llama-cpp-python's converter lets a JSON string hold raw control characters (its ``char`` rule is
# [^"\\], llama.cpp's own is [^"\\\x7F\x00-\x1F]), and a pattern's ``.`` any character but a line
# break (a quote or a backslash too): both would make invalid JSON.
_JSON_CHAR = r'[^"\\\x7F\x00-\x1F]'
_CONVERTER_FIXES = (
    (re.compile(r'^char ::= \[\^"\\\\\] \|', re.M), f"char ::= {_JSON_CHAR} |"),
    (re.compile(r"^dot ::= \[\^\\x0A\\x0D\]$", re.M), f"dot ::= {_JSON_CHAR}"),
)


def _json_safe(grammar: str) -> str:
    for pattern, fixed in _CONVERTER_FIXES:
        grammar = pattern.sub(lambda _, f=fixed: f, grammar)
    for rule in ("char", "dot"):
        if re.search(rf"^{rule} ::=", grammar, re.M) and not re.search(
            rf"^{rule} ::= {re.escape(_JSON_CHAR)}", grammar, re.M
        ):
            raise RuntimeError(f"llama-cpp-python's {rule} rule changed: update serve/structured.py")
    return grammar


def check_schema(schema: Any, param: str = "schema") -> dict[str, Any]:
    """A normalized copy of ``schema`` that llama-cpp-python's converter turns into a grammar enforcing
    all of it; :class:`BadField` naming the keyword and its place for anything it would not enforce."""
    root = copy.deepcopy(schema)
    if root is True or root == {}:
        return dict(ANY_VALUE)
    if not isinstance(root, dict):
        raise BadField(param, "the schema must be a JSON object")
    counter = [0]
    out = _check(root, root, param, 0, counter)
    assert isinstance(out, dict)
    return out


def _check(node: Any, root: dict[str, Any], where: str, depth: int, counter: list[int]) -> Any:
    counter[0] += 1
    if counter[0] > MAX_NODES:
        raise BadField(where, f"the schema has over {MAX_NODES} subschemas")
    if depth > MAX_DEPTH:
        raise BadField(where, f"the schema nests deeper than {MAX_DEPTH} levels")
    if node is True:
        return dict(ANY_VALUE)
    if node is False:
        raise BadField(where, "the schema false accepts no value")
    if not isinstance(node, dict):
        raise BadField(where, "a subschema must be a JSON object")
    node = {k: v for k, v in node.items() if k not in ANNOTATIONS}

    def sub(value: Any, at: str) -> Any:
        return _check(value, root, f"{where}.{at}", depth + 1, counter)

    for defs in ("$defs", "definitions"):
        if defs in node:
            if not isinstance(node[defs], dict):
                raise BadField(f"{where}.{defs}", "must be an object of schemas")
            node[defs] = {k: sub(v, f"{defs}.{k}") for k, v in node[defs].items()}
    if not any(k not in ("$defs", "definitions") for k in node):
        return {**node, **ANY_VALUE}  # no constraint at all: any JSON value
    t = node.get("type")
    used: set[str] = {"$defs", "definitions"}
    if "$ref" in node:
        ref = node["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise BadField(f"{where}.$ref", f"only local references (#/...) are followed, not {ref!r}")
        _resolve(root, ref, f"{where}.$ref")
        used |= {"$ref"}
    elif "anyOf" in node or "oneOf" in node:
        used |= _check_alternatives(node, where, sub)
    elif isinstance(t, list):
        if not t or any(x not in JSON_TYPES for x in t):
            raise BadField(f"{where}.type", f"must name JSON types ({', '.join(JSON_TYPES)})")
        used |= {"type"}
    elif "const" in node:
        used |= {"const", "type"}
    elif "enum" in node:
        values = node["enum"]
        if not isinstance(values, list) or not values or len(values) > MAX_ENUM:
            raise BadField(f"{where}.enum", f"must be a list of 1 to {MAX_ENUM} values")
        used |= {"enum", "type"}
    elif t in (None, "object") and (
        "properties" in node or ("additionalProperties" in node and node["additionalProperties"] is not True)
    ):
        used |= _check_object(node, where, sub)
    elif t in (None, "object") and "allOf" in node:
        used |= _check_all_of(node, root, where, sub)
    elif t in (None, "array") and ("items" in node or "prefixItems" in node):
        used |= _check_array(node, where, sub)
    elif t in (None, "string") and "pattern" in node:
        pattern = node["pattern"]
        _check_pattern(pattern, f"{where}.pattern")
        used |= {"type", "pattern"}
    elif t in (None, "string") and (
        re.match(r"^uuid[1-5]?$", str(node.get("format") or "")) or node.get("format") in KNOWN_FORMATS
    ):
        used |= {"type", "format"}
    elif t == "string" and ("minLength" in node or "maxLength" in node):
        for k in ("minLength", "maxLength"):
            _count(node, k, where)
        used |= {"type", "minLength", "maxLength", "format"}
    elif t is None:
        raise BadField(where, f"give a type (one of {', '.join(JSON_TYPES)}), or properties, items, enum...")
    else:
        if t not in JSON_TYPES:
            raise BadField(f"{where}.type", f"unknown type {t!r} (one of {', '.join(JSON_TYPES)})")
        used |= {"type", "format"} if t == "string" else {"type"}
    dropped = sorted(k for k in node if k not in used)
    if dropped:
        raise BadField(
            f"{where}.{dropped[0]}",
            f"the keyword {dropped[0]!r} is not supported here in a schema for constrained output "
            "(the grammar could not enforce it)",
        )
    if node.get("format") is not None and "format" in used and t in (None, "string"):
        fmt = str(node["format"])
        if not (re.match(r"^uuid[1-5]?$", fmt) or fmt in KNOWN_FORMATS):
            node.pop("format")  # an annotation here, as validators treat unknown formats
    return node


_Sub = Callable[[Any, str], Any]
"""Checks a subschema of the node being checked, at a place relative to it (:func:`_check`'s ``sub``)."""


def _check_alternatives(node: dict[str, Any], where: str, sub: _Sub) -> set[str]:
    """``anyOf`` or ``oneOf`` (the converter treats them alike): each alternative checked."""
    if "anyOf" in node and "oneOf" in node:
        raise BadField(where, "give anyOf or oneOf, not both")
    key = "anyOf" if "anyOf" in node else "oneOf"
    alts = node[key]
    if not isinstance(alts, list) or not alts:
        raise BadField(f"{where}.{key}", "must be a non-empty list of schemas")
    node[key] = [sub(a, f"{key}.{i}") for i, a in enumerate(alts)]
    return {key}


def _check_object(node: dict[str, Any], where: str, sub: _Sub) -> set[str]:
    """An object schema: ``properties``, ``required`` (names among them), ``additionalProperties``."""
    props = node.get("properties", {})
    if not isinstance(props, dict):
        raise BadField(f"{where}.properties", "must be an object of schemas")
    node["properties"] = {k: sub(v, f"properties.{k}") for k, v in props.items()}
    required = node.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise BadField(f"{where}.required", "must be a list of property names")
    missing = [r for r in required if r not in props]
    if missing:
        raise BadField(f"{where}.required", f"names {missing[0]!r}, which is not in properties")
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        node["additionalProperties"] = sub(extra, "additionalProperties")
    elif extra is not None and not isinstance(extra, bool):
        raise BadField(f"{where}.additionalProperties", "must be true, false or a schema")
    return {"type", "properties", "required", "additionalProperties"}


def _check_all_of(node: dict[str, Any], root: dict[str, Any], where: str, sub: _Sub) -> set[str]:
    """``allOf`` of object schemas (the only kind the converter merges), each part checked."""
    parts = node["allOf"]
    if not isinstance(parts, list) or not parts:
        raise BadField(f"{where}.allOf", "must be a non-empty list of schemas")
    for i, part in enumerate(parts):
        _check_all_of_part(part, root, f"{where}.allOf.{i}")
    node["allOf"] = [sub(p, f"allOf.{i}") for i, p in enumerate(parts)]
    return {"type", "allOf"}


def _check_array(node: dict[str, Any], where: str, sub: _Sub) -> set[str]:
    """An array schema: a tuple (``prefixItems``, or ``items`` as a list), or ``items`` with counts."""
    items = node.get("items")
    if items is None or isinstance(items, list):
        key = "prefixItems" if items is None else "items"
        tup = node[key]
        if not isinstance(tup, list) or not tup:
            raise BadField(f"{where}.{key}", "must be a non-empty list of schemas")
        node[key] = [sub(x, f"{key}.{i}") for i, x in enumerate(tup)]
        node.pop("items" if key == "prefixItems" else "prefixItems", None)
        return {"type", key}
    node["items"] = sub(items, "items")
    for k in ("minItems", "maxItems"):
        _count(node, k, where)
    return {"type", "items", "minItems", "maxItems"}


def _check_pattern(pattern: Any, where: str) -> None:
    """The converter translates a regular expression character by character into a JSON string's
    grammar, without escaping: only the subset it gets right is taken."""
    if not isinstance(pattern, str) or not (pattern.startswith("^") and pattern.endswith("$")):
        raise BadField(where, "give a pattern anchored at both ends (^...$)")
    inner = pattern[1:-1]
    if (
        any(c in inner for c in '\\"')
        or "[^" in inner
        or "(?" in inner
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in inner)
    ):
        raise BadField(
            where,
            "only simple patterns can be enforced: no backslash escapes (write [0-9] for \\d), quotes, "
            "negated classes, (?...) groups or control characters",
        )
    for m in _REPEAT.finditer(inner):
        if any(g and int(g) > MAX_REPEAT for g in m.groups()):
            raise BadField(where, f"repetition {m.group(0)} is over this server's limit of {MAX_REPEAT}")
    for m in re.finditer(r"\[([^\]]*)\]", inner):  # a range must not span a quote or a backslash
        body, i = m.group(1), 0
        while i < len(body):
            lo = hi = body[i]
            if i + 2 < len(body) and body[i + 1] == "-":
                hi = body[i + 2]
                i += 3
            else:
                i += 1
            if ord(lo) <= 0x22 <= ord(hi) or ord(lo) <= 0x5C <= ord(hi):
                raise BadField(where, f"the class [{body}] spans a quote or a backslash: split its range")


def _check_all_of_part(part: Any, root: dict[str, Any], where: str) -> None:
    """The converter merges allOf's objects by their properties only: anything else is refused."""
    if not isinstance(part, dict):
        raise BadField(where, "a subschema must be a JSON object")
    target = _resolve(root, part["$ref"], f"{where}.$ref") if isinstance(part.get("$ref"), str) else part
    if "anyOf" in part:
        for i, alt in enumerate(part["anyOf"] if isinstance(part["anyOf"], list) else [None]):
            _check_all_of_part(alt, root, f"{where}.anyOf.{i}")
        return
    if not isinstance(target, dict) or "properties" not in target:
        raise BadField(where, "allOf takes object schemas with properties (or references to them) only")
    allowed = {"properties", "required", "type", "$ref", *ANNOTATIONS}
    extra = sorted(k for k in target if k not in allowed)
    if extra or target.get("type", "object") != "object":
        bad = extra[0] if extra else "type"
        raise BadField(f"{where}.{bad}", f"the keyword {bad!r} is not supported inside allOf here")


def _resolve(root: dict[str, Any], ref: str, where: str) -> Any:
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise BadField(where, f"the reference {ref!r} points nowhere in the schema")
        node = node[part]
    return node


def _count(node: dict[str, Any], key: str, where: str) -> None:
    if key not in node:
        return
    v = node[key]
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_REPEAT:
        raise BadField(f"{where}.{key}", f"must be an integer from 0 to {MAX_REPEAT}")


# --- user grammars --------------------------------------------------------------------------------
_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def check_grammar_text(grammar: Any) -> str:
    """A user's GBNF grammar, size-checked (llama.cpp parses it later: :func:`check_grammar`)."""
    if not isinstance(grammar, str) or not grammar.strip():
        raise BadField("grammar", "give a GBNF grammar as a non-empty string")
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise BadField("grammar", f"the grammar is over {MAX_GRAMMAR_CHARS} characters")
    for m in _REPEAT.finditer(grammar):
        if any(g and int(g) > MAX_REPEAT for g in m.groups()):
            raise BadField("grammar", f"repetition {m.group(0)} is over this server's limit of {MAX_REPEAT}")
    if not re.search(r"(?m)^\s*root\s*::=", grammar):
        raise BadField("grammar", "the grammar has no root rule (root ::= ...)")
    return grammar


def check_grammar(llm: Any, grammar: str, param: str = "grammar") -> None:
    """Parse ``grammar`` with llama.cpp for ``llm``'s vocabulary; :class:`BadField` when llama.cpp refuses
    it (a syntax error, an undefined rule, left recursion): adding such a grammar to a sampler would crash."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise BadField(
            param, "llama.cpp could not parse this grammar (syntax error, undefined rule, left recursion)"
        )
    llama_cpp.llama_sampler_free(sampler)
