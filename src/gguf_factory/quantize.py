"""Quantize a GGUF with llama.cpp's own quantizer (``llama_model_quantize`` through llama-cpp-python).

Everything llama.cpp's ``llama-quantize`` tool can do is reached through ``llama_model_quantize_params``:

* every file type (:data:`QUANT_TYPES`); the IQ types only with an importance matrix (``imatrix=``);
* ``output_type`` / ``embedding_type`` (the ``output.weight`` and ``token_embd.weight`` tensors),
  ``leave_output`` (keep ``output.weight`` as it is) and ``pure`` (no per-tensor mixture);
* hybrid recipes: ``REGEX=TYPE`` rules passed as llama.cpp tensor-type overrides (``tt_overrides``;
  the first rule whose regex is found in a tensor name wins), named recipes (:data:`NAMED_RECIPES`) and
  YAML recipe files (:func:`load_recipe`);
* use-case profiles (:data:`PROFILES`): a type plus a recommended context length. The profile and the
  context are written into the output GGUF as ``gguf_factory.profile`` / ``gguf_factory.context_length``
  through the quantizer's own ``kv_overrides`` (no second pass over the file);
  :func:`gguf_factory.runtime.load` uses that context as its default ``n_ctx``.

A YAML recipe file::

    name: attn-ffn-split          # optional (default: the file name)
    description: attention high, FFN low
    type: Q4_K_M                  # optional base type (the ``--type`` given on the command line wins)
    output_type: Q6_K             # optional
    embedding_type: Q4_K          # optional
    include: [edges-hi]           # optional named recipes, applied after this file's own rules
    rules:                        # first match wins; "REGEX=TYPE" strings or {pattern, type} mappings
      - 'attn_v=Q6_K'
      - pattern: 'ffn_(up|gate)'
        type: Q4_K
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import re
import shutil
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError, QuantizeError
from .files import Paths, atomic_paths, check_output_path, require_file
from .gguf_header import MAX_ARRAY_NESTING, scan_gguf_bytes, scan_gguf_header  # noqa: F401  (re-exported)
from .splitset import part_path

if TYPE_CHECKING:  # numpy is imported where used: `import gguf_factory` stays light
    import numpy as np

log = logging.getLogger(__name__)

# Quantization type name -> llama.cpp ``llama_ftype`` constant name (llama_cpp.LLAMA_FTYPE_*).
QUANT_TYPES: dict[str, str] = {
    "F32": "LLAMA_FTYPE_ALL_F32",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q5_K_S": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q3_K_L": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "Q3_K_S": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "Q2_K_S": "LLAMA_FTYPE_MOSTLY_Q2_K_S",
    "IQ4_XS": "LLAMA_FTYPE_MOSTLY_IQ4_XS",
    "IQ4_NL": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
    "IQ3_M": "LLAMA_FTYPE_MOSTLY_IQ3_M",
    "IQ3_S": "LLAMA_FTYPE_MOSTLY_IQ3_S",
    "IQ3_XS": "LLAMA_FTYPE_MOSTLY_IQ3_XS",
    "IQ3_XXS": "LLAMA_FTYPE_MOSTLY_IQ3_XXS",
    "IQ2_M": "LLAMA_FTYPE_MOSTLY_IQ2_M",
    "IQ2_S": "LLAMA_FTYPE_MOSTLY_IQ2_S",
    "IQ2_XS": "LLAMA_FTYPE_MOSTLY_IQ2_XS",
    "IQ2_XXS": "LLAMA_FTYPE_MOSTLY_IQ2_XXS",
    "IQ1_M": "LLAMA_FTYPE_MOSTLY_IQ1_M",
    "IQ1_S": "LLAMA_FTYPE_MOSTLY_IQ1_S",
}
TYPE_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

IMATRIX_TYPES = frozenset(t for t in QUANT_TYPES if t.startswith("IQ")) | {"Q2_K_S"}
"""File types this project quantizes only with an importance matrix (the IQ family, and Q2_K_S, which
llama.cpp itself refuses without one)."""

FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})

# ggml tensor types a rule, --output-type or --embedding-type may name (gguf.GGMLQuantizationType names).
TENSOR_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K",
    "IQ4_XS", "IQ4_NL", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S",
)  # fmt: skip
IMATRIX_TENSOR_TYPES = frozenset({"IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"})
"""Tensor types llama.cpp refuses to produce without importance data."""

# The tensor type that carries most of a file type's weights, and the next type up, for recipes that
# raise some tensors "one level".
MAIN_TENSOR_TYPE = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q6_K": "Q6_K",
    "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K", "Q5_1": "Q5_1", "Q5_0": "Q5_0",
    "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q4_1": "Q4_1", "Q4_0": "Q4_0",
    "Q3_K_L": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K", "Q2_K": "Q2_K", "Q2_K_S": "Q2_K",
    "IQ4_XS": "IQ4_XS", "IQ4_NL": "IQ4_NL", "IQ3_M": "IQ3_S", "IQ3_S": "IQ3_S", "IQ3_XS": "IQ3_S",
    "IQ3_XXS": "IQ3_XXS", "IQ2_M": "IQ2_S", "IQ2_S": "IQ2_S", "IQ2_XS": "IQ2_XS", "IQ2_XXS": "IQ2_XXS",
    "IQ1_M": "IQ1_M", "IQ1_S": "IQ1_S",
}  # fmt: skip
ONE_LEVEL_UP = {
    "Q2_K": "Q3_K", "Q3_K": "Q4_K", "Q4_K": "Q5_K", "Q5_K": "Q6_K", "Q6_K": "Q8_0", "Q8_0": "F16",
    "Q4_0": "Q5_0", "Q4_1": "Q5_1", "Q5_0": "Q8_0", "Q5_1": "Q8_0",
    "IQ1_S": "IQ2_XXS", "IQ1_M": "IQ2_XXS", "IQ2_XXS": "IQ2_XS", "IQ2_XS": "IQ2_S", "IQ2_S": "IQ3_XXS",
    "IQ3_XXS": "IQ3_S", "IQ3_S": "IQ4_XS", "IQ4_XS": "Q5_K", "IQ4_NL": "Q5_0",
    "F16": "F16", "BF16": "BF16", "F32": "F32",
}  # fmt: skip

PROFILE_KEY = "gguf_factory.profile"
CONTEXT_KEY = "gguf_factory.context_length"
RECIPE_KEY = "gguf_factory.recipe"
_KV_STR_MAX = 127  # llama_model_kv_override.val_str is char[128]


@dataclass(frozen=True)
class Profile:
    name: str
    qtype: str
    context_length: int
    description: str


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("production", "Q4_K_M", 2048, "balanced size and quality for serving"),
        Profile("mobile", "Q2_K", 1024, "smallest file for phones and edge devices"),
        Profile("quality", "Q5_K_M", 4096, "quality first (e.g. healthcare)"),
        Profile("development", "Q8_0", 8192, "near-lossless, long context for development"),
    )
}


# --------------------------------------------------------------------------------------------- results


@dataclass
class QuantizeResult:
    path: Path
    qtype: str
    input_path: Path
    input_bytes: int
    size_bytes: int
    seconds: float
    profile: str | None = None
    context_length: int | None = None
    """The recommended context stored in the file (``gguf_factory.context_length``), if any."""
    recipe: str | None = None
    rules: list[TensorRule] = field(default_factory=list)
    imatrix_entries: int = 0
    parts: list[Path] = field(default_factory=list)
    """Every file written, first part first (``[path]`` when not split); ``size_bytes`` counts them all."""

    @property
    def reduction(self) -> float:
        """Fraction of the input size saved (0.75 = a quarter of the input)."""
        return 1.0 - self.size_bytes / self.input_bytes if self.input_bytes else 0.0


# --------------------------------------------------------------------------------------------- names


def normalize_qtype(qtype: str) -> str:
    name = qtype.strip().upper()
    name = TYPE_ALIASES.get(name, name)
    if name not in QUANT_TYPES:
        raise InputError(f"unknown quantization type {qtype!r}; choose one of: {', '.join(QUANT_TYPES)}")
    return name


def normalize_tensor_type(ttype: str, what: str = "tensor type") -> str:
    name = ttype.strip().upper()
    if name not in TENSOR_TYPES:
        hint = ""
        if name in QUANT_TYPES and name not in TENSOR_TYPES:
            hint = f" ({name} is a file type: a single tensor takes {MAIN_TENSOR_TYPE[name]})"
        raise InputError(f"unknown {what} {ttype!r}{hint}; choose one of: {', '.join(TENSOR_TYPES)}")
    return name


def ggml_type_id(name: str) -> int:
    import gguf

    return int(gguf.GGMLQuantizationType[name])


def resolve_profile(profile: str) -> Profile:
    key = profile.strip().lower()
    if key not in PROFILES:
        raise InputError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    return PROFILES[key]


def check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise InputError(f"not a GGUF file (bad magic {magic!r}): {path}")


# --------------------------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class TensorRule:
    """Tensors whose name contains a match of ``pattern`` (a regex, searched) get ``type``."""

    pattern: str
    type: str

    def __str__(self) -> str:
        return f"{self.pattern}={self.type}"

    def matches(self, tensor_name: str) -> bool:
        return re.search(self.pattern, tensor_name) is not None


def make_rule(pattern: str, ttype: str, where: str = "") -> TensorRule:
    at = f"{where}: " if where else ""
    if not pattern:
        raise InputError(f"{at}tensor rule has an empty pattern")
    try:
        re.compile(pattern)
    except re.error as e:
        raise InputError(f"{at}bad regex {pattern!r} in tensor rule: {e}") from None
    return TensorRule(pattern, normalize_tensor_type(ttype, f"{at}tensor type in rule {pattern!r}"))


def parse_rule(text: str, where: str = "") -> TensorRule:
    """Parse ``REGEX=TYPE`` (split at the last ``=``: a type never contains one)."""
    pattern, sep, ttype = text.strip().rpartition("=")
    if not sep or not ttype.strip():
        at = f"{where}: " if where else ""
        raise InputError(f"{at}tensor rule {text!r} must look like REGEX=TYPE, e.g. 'attn_.*=Q6_K'")
    return make_rule(pattern.strip(), ttype, where)


@dataclass
class Recipe:
    name: str
    rules: list[TensorRule] = field(default_factory=list)
    qtype: str | None = None
    output_type: str | None = None
    embedding_type: str | None = None
    description: str = ""
    include: list[str] = field(default_factory=list)
    """Named recipes whose rules follow this recipe's own."""


@dataclass(frozen=True)
class ModelShape:
    """What recipes need to know about the model being quantized."""

    n_layers: int
    base_qtype: str


def _attn_hi(shape: ModelShape) -> list[TensorRule]:
    return [TensorRule(r"attn_", "Q6_K"), TensorRule(r"ffn_", "Q4_K")]


def _edges_hi(shape: ModelShape) -> list[TensorRule]:
    main = MAIN_TENSOR_TYPE[shape.base_qtype]
    up = ONE_LEVEL_UP.get(main, main)
    last = shape.n_layers - 1
    blocks = "0" if last <= 0 else f"(0|{last})"
    return [TensorRule(rf"^blk\.{blocks}\.", up)]


def _ffn_down_hi(shape: ModelShape) -> list[TensorRule]:
    main = MAIN_TENSOR_TYPE[shape.base_qtype]
    return [TensorRule(r"ffn_down", ONE_LEVEL_UP.get(main, main))]


NAMED_RECIPES: dict[str, tuple[str, Callable[[ModelShape], list[TensorRule]]]] = {
    "attn-hi": ("attention tensors Q6_K, FFN tensors Q4_K", _attn_hi),
    "edges-hi": ("first and last blocks one level above the base type", _edges_hi),
    "ffn-down-hi": ("ffn_down one level above the base type", _ffn_down_hi),
}


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read a YAML recipe file (format in the module docstring); errors name the file and the field."""
    from .schema import read_yaml_text

    p, doc = read_yaml_text(path, "recipe file")
    if not isinstance(doc, dict):
        raise InputError(f"{p}: a recipe must be a YAML mapping with a 'rules' list")
    known = {"name", "description", "type", "output_type", "embedding_type", "include", "rules"}
    unknown = sorted(set(map(str, doc)) - known)
    if unknown:
        raise InputError(
            f"{p}: unknown recipe field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    recipe = Recipe(name=str(doc.get("name") or p.stem), description=str(doc.get("description") or ""))
    if doc.get("type") is not None:
        recipe.qtype = normalize_qtype(str(doc["type"]))
    for key in ("output_type", "embedding_type"):
        if doc.get(key) is not None:
            setattr(recipe, key, normalize_tensor_type(str(doc[key]), f"{p}: {key}"))
    rules = doc.get("rules") or []
    if not isinstance(rules, list):
        raise InputError(f"{p}: 'rules' must be a list")
    for i, item in enumerate(rules):
        where = f"{p}: rules[{i}]"
        if isinstance(item, str):
            recipe.rules.append(parse_rule(item, where))
        elif isinstance(item, dict) and set(item) == {"pattern", "type"}:
            recipe.rules.append(make_rule(str(item["pattern"]), str(item["type"]), where))
        elif isinstance(item, dict) and len(item) == 1:
            ((pat, ttype),) = item.items()
            recipe.rules.append(make_rule(str(pat), str(ttype), where))
        else:
            raise InputError(f"{where}: expected 'REGEX=TYPE' or a mapping with 'pattern' and 'type'")
    include = doc.get("include") or []
    if isinstance(include, str):
        include = [include]
    if not isinstance(include, list):
        raise InputError(f"{p}: 'include' must be a list of named recipes")
    for name in include:
        if str(name) not in NAMED_RECIPES:
            raise InputError(
                f"{p}: include: unknown recipe {name!r}; named recipes: {', '.join(NAMED_RECIPES)}"
            )
    recipe.description = recipe.description or f"recipe file {p.name}"
    recipe.include = [str(n) for n in include]
    return recipe


def get_recipe(spec: str | os.PathLike[str] | Recipe) -> Recipe:
    """A :class:`Recipe` from a named recipe (rules filled in by :func:`resolve_recipe`) or a YAML file."""
    if isinstance(spec, Recipe):
        return spec
    if str(spec) in NAMED_RECIPES:
        return Recipe(name=str(spec), description=NAMED_RECIPES[str(spec)][0], include=[str(spec)])
    if Path(spec).exists() or Path(spec).suffix.lower() in (".yml", ".yaml"):
        return load_recipe(spec)
    raise InputError(
        f"unknown recipe {str(spec)!r}: not a named recipe ({', '.join(NAMED_RECIPES)}) nor a file"
    )


def resolve_recipe(spec: str | os.PathLike[str] | Recipe, shape: ModelShape) -> Recipe:
    """The recipe with its rules made concrete for ``shape`` (named recipes depend on layers, base type)."""
    recipe = get_recipe(spec)
    rules = list(recipe.rules)
    for name in recipe.include:
        rules += NAMED_RECIPES[name][1](shape)
    return Recipe(
        recipe.name, rules, recipe.qtype, recipe.output_type, recipe.embedding_type, recipe.description
    )


# --------------------------------------------------------------------------------------------- GGUF facts


@dataclass
class GGUFInfo:
    arch: str | None
    n_layers: int
    context_length: int | None
    tensor_types: dict[str, str]
    """Tensor name -> ggml type name."""
    n_elements: int
    tensor_bytes: int
    parts: list[Path] = field(default_factory=list)
    """The file, or every part of a split set (first part first)."""

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.tensor_bytes / self.n_elements if self.n_elements else 0.0

    def type_counts(self) -> dict[str, int]:
        return dict(Counter(self.tensor_types.values()).most_common())


def read_gguf_info(path: str | os.PathLike[str]) -> GGUFInfo:
    """Architecture, block count, trained context and per-tensor types of a GGUF, from its header only
    (every part's, for a split set given its first part)."""
    import gguf

    from .splitset import scan_gguf_set

    meta, tensors, parts = scan_gguf_set(path)
    arch = meta.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    n_layers = int(meta.get(f"{arch}.block_count") or 0) if arch else 0
    ctx = meta.get(f"{arch}.context_length") if arch else None
    types: dict[str, str] = {}
    n_elements = n_bytes = 0
    for name, type_id, dims in tensors:
        try:
            ttype = gguf.GGMLQuantizationType(type_id)
        except ValueError:
            raise InputError(f"{path}: tensor {name!r} has unknown ggml type {type_id}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[ttype]
        count = math.prod(dims)
        types[name] = ttype.name
        n_elements += count
        n_bytes += count // block * type_size
    return GGUFInfo(
        arch=arch,
        n_layers=n_layers,
        context_length=int(ctx) if isinstance(ctx, int) else None,
        tensor_types=types,
        n_elements=n_elements,
        tensor_bytes=n_bytes,
        parts=parts,
    )


# --------------------------------------------------------------------------------------------- imatrix


def load_imatrix(source: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Importance data per tensor name, as llama.cpp's quantizer takes it (mean squared activations).

    ``source`` is a mapping (tensor name -> values) or a file in either format llama.cpp's tools read: the
    GGUF imatrix (``<tensor>.in_sum2`` sums and ``<tensor>.counts`` per expert) or the legacy ``.dat``.
    """
    import numpy as np

    if isinstance(source, Mapping):
        data = {
            str(k): np.ascontiguousarray(np.asarray(v, dtype=np.float32).reshape(-1))
            for k, v in source.items()
        }
    else:
        p = require_file(source, "importance matrix")
        with open(p, "rb") as f:
            magic = f.read(4)
        data = _read_gguf_imatrix(p) if magic == b"GGUF" else _read_legacy_imatrix(p)
    if not data:
        raise InputError(f"importance matrix {source} holds no entries")
    for name, v in data.items():
        if not np.all(np.isfinite(v)):
            raise InputError(f"importance matrix entry {name!r} has non-finite values")
    return data


def _read_gguf_imatrix(p: Path) -> dict[str, np.ndarray]:
    import numpy as np
    from gguf import GGUFReader

    try:
        reader = GGUFReader(p)
    except Exception as e:
        raise InputError(f"cannot read importance matrix {p}: {e}") from e
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    out: dict[str, np.ndarray] = {}
    for name, s in sums.items():
        c = counts.get(name)
        if c is None or c.size == 0 or s.size % c.size:
            raise InputError(f"importance matrix {p}: entry {name!r} lacks matching counts")
        rows = s.reshape(c.size, -1)
        norm = np.where(c[:, None] > 0, rows / np.maximum(c[:, None], 1e-30), 1.0)
        out[name] = np.ascontiguousarray(norm.reshape(-1), dtype=np.float32)
    return out


def _read_legacy_imatrix(p: Path) -> dict[str, np.ndarray]:
    import numpy as np

    raw = p.read_bytes()
    out: dict[str, np.ndarray] = {}
    try:
        (n,) = struct.unpack_from("<i", raw, 0)
        pos = 4
        for _ in range(n):
            (ln,) = struct.unpack_from("<i", raw, pos)
            name = raw[pos + 4 : pos + 4 + ln].decode("utf-8")
            pos += 4 + ln
            ncall, nval = struct.unpack_from("<ii", raw, pos)
            pos += 8
            vals = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
            pos += 4 * nval
            out[name] = vals / ncall if ncall > 0 else vals.copy()
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"not an importance matrix (GGUF or legacy .dat): {p} ({e})") from None
    return out


# --------------------------------------------------------------------------------------------- quantize


def default_output_path(input_path: str | os.PathLike[str], qtype: str) -> Path:
    """``<name>-<TYPE>.gguf`` beside the input, less a trailing ``-F16``/``-F32``/``-BF16`` of its stem (and
    less the ``-00001-of-0000N`` of a split set's first part)."""
    from .splitset import PART_NAME, output_prefix

    src = Path(input_path)
    stem = output_prefix(src).name if PART_NAME.match(src.name) else src.stem
    stem = re.sub(r"[-_.](F32|F16|BF16|f32|f16|bf16)$", "", stem)
    return src.with_name(f"{stem}-{normalize_qtype(qtype)}.gguf")


def quantize(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str] | None = None,
    qtype: str | None = None,
    *,
    threads: int | None = None,
    allow_requantize: bool = False,
    output_type: str | None = None,
    embedding_type: str | None = None,
    leave_output: bool = False,
    pure: bool = False,
    profile: str | None = None,
    context_length: int | None = None,
    tensor_types: Iterable[str | TensorRule] = (),
    recipe: str | os.PathLike[str] | Recipe | None = None,
    imatrix: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    data: str | os.PathLike[str] | None = None,
    split_max_size: int | str | None = None,
    split_max_tensors: int | None = None,
    keep_split: bool = False,
) -> QuantizeResult:
    """Quantize ``input_path`` to ``qtype``; the result appears at ``output_path`` only when complete.

    A split input is given by its first part (llama.cpp reads the set itself). The output is one file,
    unless ``keep_split`` (llama.cpp's own ``keep_split``: one output part per input part, named
    ``<output less .gguf>-0000i-of-0000N.gguf``) or ``split_max_size`` / ``split_max_tensors`` (llama.cpp
    quantizes to one temporary file, which gguf-py's writer then splits by those limits, as ``convert``
    does); ``QuantizeResult.path`` is then the first part. Every part is written to a temporary file and
    renamed once all are complete.

    ``qtype`` defaults to the profile's type (or the recipe's, or Q4_K_M). ``tensor_types`` are
    ``REGEX=TYPE`` rules; they take precedence over the recipe's rules. ``context_length`` (or the
    profile's) is stored as the recommended context, capped at the model's trained context.
    ``data`` (a ``prepare`` folder or a chat file), when no ``imatrix`` is given: an importance matrix is
    computed from it with :func:`gguf_factory.imatrix.compute_imatrix` and used (not kept).
    """
    import llama_cpp  # imported lazily: loading the shared library costs time the CLI's --help need not pay

    split = _split_settings(split_max_size, split_max_tensors, keep_split)
    src = require_file(input_path, "input GGUF")
    check_gguf_magic(src)
    prof = resolve_profile(profile) if profile else None
    user_rules = [r if isinstance(r, TensorRule) else parse_rule(r, "--tensor-type") for r in tensor_types]
    recipe_obj = get_recipe(recipe) if recipe is not None else None
    name = normalize_qtype(
        qtype or (recipe_obj.qtype if recipe_obj else None) or (prof.qtype if prof else "Q4_K_M")
    )
    out_t, emb_t = _tensor_type_settings(output_type, embedding_type, leave_output)
    if context_length is not None and context_length <= 0:
        raise InputError(f"context length must be positive, got {context_length}")

    info = _read_quantize_input(src, allow_requantize)
    shape = ModelShape(n_layers=info.n_layers, base_qtype=name)
    rec = resolve_recipe(recipe_obj, shape) if recipe_obj is not None else None
    if rec is not None:
        out_t = out_t or rec.output_type
        emb_t = emb_t or rec.embedding_type
    rules = user_rules + (rec.rules if rec else [])
    _check_rules_match(user_rules, info, src)

    if imatrix is None and data is not None:
        imatrix = _imatrix_from_data(src, data, threads)
    imat = load_imatrix(imatrix) if imatrix is not None else None
    if imat is None:
        _refuse_imatrix_types(name, rules, out_t, emb_t)

    in_parts = info.parts or [src]
    imatrix_path = imatrix if isinstance(imatrix, str | os.PathLike) else None
    inputs = [*in_parts, imatrix_path]
    dst, finals = _output_targets(src, output_path, name, len(in_parts), keep_split, inputs)

    ctx = _recommended_context(context_length, prof, info)
    params = _quantize_params(llama_cpp, name, threads, allow_requantize, pure, leave_output, out_t, emb_t)
    recipe_label = _recipe_label(rec, user_rules)
    kv = _quantize_metadata(prof, ctx, recipe_label, imat, imatrix, data)
    keep_alive = _attach_overrides(llama_cpp, params, kv, rules, imat)  # ctypes arrays llama.cpp reads

    t0 = time.perf_counter()
    parts = _run_quantizer(llama_cpp, params, src, dst, name, finals, inputs, n_rules=len(rules), split=split)
    seconds = time.perf_counter() - t0
    del keep_alive
    return QuantizeResult(
        path=parts[0],
        qtype=name,
        input_path=src,
        input_bytes=sum(p.stat().st_size for p in in_parts),
        size_bytes=sum(p.stat().st_size for p in parts),
        seconds=seconds,
        profile=prof.name if prof else None,
        context_length=ctx,
        recipe=recipe_label,
        rules=rules,
        imatrix_entries=len(imat) if imat else 0,
        parts=parts,
    )


def _split_settings(
    split_max_size: int | str | None, split_max_tensors: int | None, keep_split: bool
) -> tuple[int, int]:
    """(bytes, tensors) per output part, 0 meaning no limit; refused together with ``keep_split``."""
    from .gguf_writer import split_limits

    split_size, split_tensors = split_limits(split_max_size, split_max_tensors)
    if keep_split and (split_size or split_tensors):
        raise InputError(
            "--keep-split keeps the input's parts; --split-max-size/--split-max-tensors make new ones: "
            "choose one"
        )
    return split_size, split_tensors


def _tensor_type_settings(
    output_type: str | None, embedding_type: str | None, leave_output: bool
) -> tuple[str | None, str | None]:
    """The ``output.weight`` and ``token_embd.weight`` tensor types asked for (None: the file type's)."""
    out_t = normalize_tensor_type(output_type, "--output-type") if output_type else None
    emb_t = normalize_tensor_type(embedding_type, "--embedding-type") if embedding_type else None
    if leave_output and out_t:
        raise InputError("--leave-output and --output-type contradict each other: choose one")
    return out_t, emb_t


def _read_quantize_input(src: Path, allow_requantize: bool) -> GGUFInfo:
    """``src``'s header, refused when llama.cpp cannot quantize it or (without ``allow_requantize``) when
    its tensors are already quantized."""
    from .splitset import SplitSetError

    try:
        info = read_gguf_info(src)
    except SplitSetError:
        raise  # names the part at fault
    except InputError as e:  # right magic, damaged inside: the quantizer cannot use it
        raise QuantizeError(f"llama.cpp cannot quantize {src}: {e}") from e
    quantized_inputs = sorted({t for t in info.tensor_types.values() if t not in FLOAT_TYPES})
    if quantized_inputs and not allow_requantize:
        raise InputError(
            f"{src} is already quantized ({', '.join(quantized_inputs)} tensors); requantizing loses quality "
            "twice: start from the F16/F32 file, or pass --allow-requantize"
        )
    return info


def _check_rules_match(user_rules: Sequence[TensorRule], info: GGUFInfo, src: Path) -> None:
    """A user rule that touches nothing is a typo, not a wish: refuse it."""
    for r in user_rules:
        if not any(r.matches(t) for t in info.tensor_types):
            example = next(
                (t for t in info.tensor_types if t.startswith("blk.")), next(iter(info.tensor_types), "")
            )
            raise InputError(f"tensor rule {r} matches no tensor of {src} (names look like {example!r})")


def _refuse_imatrix_types(
    name: str, rules: Sequence[TensorRule], out_t: str | None, emb_t: str | None
) -> None:
    """Without an importance matrix: refuse a file type, rule or tensor type that needs one."""
    needs = [name] if name in IMATRIX_TYPES else []
    needs += [str(r) for r in rules if r.type in IMATRIX_TENSOR_TYPES]
    needs += [t for t in (out_t, emb_t) if t in IMATRIX_TENSOR_TYPES]
    if needs:
        raise InputError(
            f"{', '.join(needs)} needs an importance matrix: pass --imatrix FILE "
            "(make one from your chat data with `gguf-factory imatrix`)"
        )


def _output_targets(
    src: Path,
    output_path: str | os.PathLike[str] | None,
    name: str,
    n_parts: int,
    keep_split: bool,
    inputs: Paths,
) -> tuple[Path, list[Path]]:
    """The output path (by default beside ``src``) and the final path of each output part (one per input
    part with ``keep_split``), checked before any work: none may land on an input."""
    from .splitset import output_paths

    dst = check_output_path(
        output_path if output_path is not None else default_output_path(src, name), inputs=inputs
    )
    if dst.resolve() == src.resolve():
        raise InputError(f"output would overwrite the input: {dst}")
    n_keep = n_parts if keep_split else 1
    if keep_split and n_keep == 1:
        log.info("--keep-split: %s is not split; writing one file", src)
    finals = output_paths(dst, n_keep)
    for f in finals:
        check_output_path(f, inputs=inputs)
    return dst, finals


def _recommended_context(context_length: int | None, prof: Profile | None, info: GGUFInfo) -> int | None:
    """The context to record (``context_length``, else the profile's), capped at the trained context."""
    ctx = context_length if context_length is not None else (prof.context_length if prof else None)
    if ctx is not None and info.context_length and ctx > info.context_length:
        log.warning(
            "recommended context %d is above the model's trained context %d: storing %d",
            ctx,
            info.context_length,
            info.context_length,
        )
        ctx = info.context_length
    return ctx


def _quantize_params(
    llama_cpp: Any,
    name: str,
    threads: int | None,
    allow_requantize: bool,
    pure: bool,
    leave_output: bool,
    out_t: str | None,
    emb_t: str | None,
) -> Any:
    """``llama_model_quantize_params`` for the file type and the output/embedding tensor settings."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[name])
    params.nthread = threads or os.cpu_count() or 1
    params.allow_requantize = allow_requantize
    params.pure = pure
    if leave_output:
        params.quantize_output_tensor = False
    if out_t:
        params.output_tensor_type = ggml_type_id(out_t)
    if emb_t:
        params.token_embedding_type = ggml_type_id(emb_t)
    return params


def _quantize_metadata(
    prof: Profile | None,
    ctx: int | None,
    recipe_label: str | None,
    imat: Mapping[str, Any] | None,
    imatrix: str | os.PathLike[str] | Mapping[str, Any] | None,
    data: str | os.PathLike[str] | None,
) -> dict[str, int | str]:
    """The keys the quantizer writes into the output: who quantized it, the profile, the recommended
    context, the recipe and the importance matrix's provenance."""
    kv: dict[str, int | str] = {"general.quantized_by": "gguf-factory"}
    if prof:
        kv[PROFILE_KEY] = prof.name
    if ctx is not None:
        kv[CONTEXT_KEY] = int(ctx)
    if recipe_label:
        kv[RECIPE_KEY] = recipe_label
    if imat is not None:  # the keys llama.cpp's own quantize tool records
        kv["quantize.imatrix.entries_count"] = len(imat)
        if data is not None and imatrix is not None and isinstance(imatrix, Mapping):
            kv["quantize.imatrix.dataset"] = Path(data).name[-_KV_STR_MAX:]
        elif not isinstance(imatrix, Mapping):
            kv["quantize.imatrix.file"] = Path(imatrix).name[-_KV_STR_MAX:]
    return kv


def _attach_overrides(
    llama_cpp: Any,
    params: Any,
    kv: Mapping[str, int | str],
    rules: Sequence[TensorRule],
    imat: Mapping[str, np.ndarray] | None,
) -> list[Any]:
    """Point ``params`` at the metadata overrides, the tensor-type rules and the importance data; returns
    the ctypes arrays (and data) llama.cpp reads during the call, which must stay alive until it returns."""
    keep_alive: list[Any] = []
    kv_arr = _kv_override_array(llama_cpp, kv)
    keep_alive.append(kv_arr)
    params.kv_overrides = ctypes.cast(kv_arr, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    if rules:
        tt_arr = (llama_cpp.llama_model_tensor_override * (len(rules) + 1))()
        for slot, rule in zip(tt_arr, rules, strict=False):
            slot.pattern = rule.pattern.encode("utf-8")
            slot.type = ggml_type_id(rule.type)
        tt_arr[len(rules)].pattern = None  # terminator
        tt_arr[len(rules)].type = ggml_type_id("F32")
        keep_alive.append(tt_arr)
        params.tt_overrides = ctypes.cast(tt_arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    if imat is not None:
        im_arr = (llama_cpp.llama_model_imatrix_data * (len(imat) + 1))()
        for slot, (tname, values) in zip(im_arr, imat.items(), strict=False):
            slot.name = tname.encode("utf-8")
            slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            slot.size = values.size
        im_arr[len(imat)].name = None  # terminator
        keep_alive += [im_arr, imat]
        params.imatrix = ctypes.cast(im_arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    return keep_alive


def _run_quantizer(
    llama_cpp: Any,
    params: Any,
    src: Path,
    dst: Path,
    name: str,
    finals: list[Path],
    inputs: Paths,
    *,
    n_rules: int,
    split: tuple[int, int],
) -> list[Path]:
    """Run llama.cpp's quantizer into a private folder beside ``dst``, then move its output to ``finals``
    (or re-split it by ``split``: bytes and tensors per part, 0 meaning no limit); returns the output
    parts."""
    log.info(
        "quantizing %s -> %s (%s%s, %d threads)",
        src,
        dst,
        name,
        f", {n_rules} tensor rules" if n_rules else "",
        params.nthread,
    )
    n_keep = len(finals)  # llama.cpp writes one part per final part
    split_size, split_tensors = split
    # llama.cpp reports every tensor through llama-cpp-python's logger: keep its errors, and the rest at -v
    lc_logger = logging.getLogger("llama-cpp-python")
    old_level = lc_logger.level
    if not log.isEnabledFor(logging.DEBUG):
        lc_logger.setLevel(logging.ERROR)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent or "."))
    try:
        # llama.cpp writes into a private folder beside the output: one file, or with keep_split
        # <prefix>-0000i-of-0000N.gguf; the parts then reach their final names together
        target = scratch / ("part" if n_keep > 1 else "model.gguf")
        params.keep_split = n_keep > 1
        try:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(target).encode(), ctypes.byref(params))
        finally:
            lc_logger.setLevel(old_level)
        written = [part_path(target, i, n_keep) for i in range(1, n_keep + 1)] if n_keep > 1 else [target]
        if rc != 0 or not all(w.is_file() for w in written):
            raise QuantizeError(
                f"llama.cpp could not quantize {src} to {name} (return code {rc}); "
                "is it a valid GGUF model? (run with -v to see llama.cpp's reason)"
            )
        if split_size or split_tensors:  # gguf-py splits llama.cpp's one file by the new limits
            from .gguf_writer import resplit_gguf

            return resplit_gguf(
                target,
                dst,
                split_max_size=split_size or None,
                split_max_tensors=split_tensors or None,
                inputs=inputs,
            )
        with atomic_paths(finals, inputs=inputs) as tmps:
            for w, tmp in zip(written, tmps, strict=True):
                os.replace(w, tmp)
        return finals
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _imatrix_from_data(
    model: Path, data: str | os.PathLike[str], threads: int | None
) -> dict[str, np.ndarray]:
    """An importance matrix of ``model`` on ``data``, computed now (in a temp file, read back, deleted)."""
    import tempfile

    from .imatrix import compute_imatrix

    with tempfile.TemporaryDirectory(prefix="gguf-factory-imatrix-") as tmp:
        path = Path(tmp) / "imatrix.gguf"
        r = compute_imatrix(model, data, path, threads=threads)
        log.info("importance matrix from %s: %d weights, %d tokens", data, r.entries, r.tokens)
        return load_imatrix(path)


def _recipe_label(rec: Recipe | None, user_rules: Sequence[TensorRule]) -> str | None:
    parts = [rec.name] if rec else []
    parts += [str(r) for r in user_rules]
    if not parts:
        return None
    label = "; ".join(parts)
    return (
        label
        if len(label.encode("utf-8")) <= _KV_STR_MAX
        else label.encode("utf-8")[: _KV_STR_MAX - 3].decode("utf-8", errors="ignore") + "..."
    )


def _kv_override_array(llama_cpp: Any, items: Mapping[str, int | float | bool | str]) -> Any:
    """A ``llama_model_kv_override`` array ending with an empty-key entry (llama.cpp's terminator)."""
    arr = (llama_cpp.llama_model_kv_override * (len(items) + 1))()
    for slot, (key, value) in zip(arr, items.items(), strict=False):
        kb = key.encode("utf-8")
        if len(kb) >= 128:
            raise InputError(f"metadata key too long for llama.cpp: {key}")
        slot.key = kb
        if isinstance(value, bool):
            slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL
            slot.value.val_bool = value
        elif isinstance(value, int):  # llama.cpp's quantizer writes INT overrides as uint32
            slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            slot.value.val_i64 = value
        elif isinstance(value, float):
            slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_FLOAT
            slot.value.val_f64 = value
        else:
            vb = str(value).encode("utf-8")
            if len(vb) > _KV_STR_MAX:
                raise InputError(f"metadata value for {key} longer than {_KV_STR_MAX} bytes")
            slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            slot.value.val_str = vb
    return arr
