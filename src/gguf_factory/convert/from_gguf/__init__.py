"""GGUF -> Hugging Face checkpoint: the reverse of :func:`gguf_factory.convert.convert`.

A GGUF someone already has (say a Q4_1 SmolLM2 from a package) becomes a folder that transformers loads with
``AutoModelForCausalLM`` / ``AutoTokenizer`` (``local_files_only``, no remote code), so it can be fine-tuned:

* ``config.json`` rebuilt from the GGUF's hyper-parameters by the architecture's plug-in
  (:mod:`.archs`), ``generation_config.json``;
* ``model.safetensors`` (sharded with an index past ``max_shard_bytes``): every tensor dequantized by
  gguf-py (``gguf.quants.dequantize``), the converter's layout changes undone (e.g. the LLaMA Q/K row
  permutation), written with ``safetensors`` in float32 (dequantized values are exact in float32), or
  float16 / bfloat16 on request;
* ``tokenizer.json``, ``tokenizer_config.json`` (chat template, special tokens, BOS/EOS behaviour) and
  ``special_tokens_map.json``, rebuilt with ``tokenizers`` to give llama.cpp's ids (:mod:`.tokenizer`).

Nothing is written until the GGUF has been read and checked (architecture, every tensor's type, size and
place, the tokenizer); the folder is written beside the destination and renamed into place, so a failure
leaves nothing at ``out_dir``. A GGUF that cannot be rebuilt exactly is a one-line :class:`ModelError`.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import InputError, ModelError
from ...files import atomic_path, check_output_dir
from .archs import reverse_for, supported_architectures
from .base import PlannedWeight, ReverseArch
from .source import GGUFSource
from .tokenizer import rebuild_tokenizer

__all__ = ["FromGGUFResult", "gguf_to_hf", "supported_architectures", "DTYPES", "ReverseArch"]

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_MAX_SHARD_BYTES = 4 * 10**9
F16_MAX = 65504.0
# What a rebuild writes: an existing output folder may hold only these (a previous rebuild), nothing else.
_OUTPUT_NAMES = re.compile(
    r"(config\.json|generation_config\.json|model\.safetensors|model\.safetensors\.index\.json"
    r"|model-\d{5}-of-\d{5}\.safetensors|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json"
    r"|chat_template\.jinja|gguf_factory_source\.json)"
)


@dataclass
class FromGGUFResult:
    path: Path
    arch: str  # llama.cpp architecture (general.architecture)
    hf_architecture: str  # e.g. LlamaForCausalLM
    n_tensors: int  # GGUF tensors read
    n_params: int  # parameters written (tied embeddings counted once)
    source_types: dict[str, int]  # GGUF tensor type -> number of tensors of that type
    dtype: str
    tokenizer: str  # e.g. "gpt2 (pre smollm)"
    seconds: float
    files: list[str] = field(default_factory=list)


def gguf_to_hf(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> FromGGUFResult:
    """Rebuild a Hugging Face causal-LM checkpoint folder at ``out_dir`` from the GGUF at ``gguf_path``.

    ``dtype``: float32 (default: dequantized values are exact), float16 or bfloat16.
    """
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if max_shard_bytes <= 0:
        raise InputError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    out = _check_output(out_dir)
    src = GGUFSource.open(gguf_path)
    rev = reverse_for(src)(src)
    config = rev.build_config(dtype)
    plan = rev.plan(config)
    tok = rebuild_tokenizer(
        src, rev.n_vocab, model_max_length=getattr(config, "max_position_embeddings", None)
    )
    n_params = sum(w.n_elements for w in plan)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        config.save_pretrained(tmp)
        _generation_config(config, src).save_pretrained(tmp)
        _write_weights(tmp, plan, dtype, max_shard_bytes, src)
        tok.save(tmp)
        files = sorted(p.name for p in tmp.iterdir())
    seconds = time.perf_counter() - t0
    tokenizer = tok.model + (f" (pre {tok.pre})" if tok.pre else "")
    log.info(
        "rebuilt %s from %s (%s, %d tensors, %.1f M parameters, %s, %.1f s)",
        out,
        src.path.name,
        rev.hf_architecture,
        len(src.tensors),
        n_params / 1e6,
        dtype,
        seconds,
    )
    return FromGGUFResult(
        path=out,
        arch=src.arch,
        hf_architecture=rev.hf_architecture,
        n_tensors=len(src.tensors),
        n_params=n_params,
        source_types=src.type_counts(),
        dtype=dtype,
        tokenizer=tokenizer,
        seconds=seconds,
        files=files,
    )


def _check_output(out_dir: str | Path) -> Path:
    out = check_output_dir(out_dir)
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not _OUTPUT_NAMES.fullmatch(p.name))
        if foreign:
            raise InputError(
                f"output folder {out} exists and holds other files ({', '.join(foreign[:3])}); "
                "choose a new or empty folder"
            )
    return out


def _generation_config(config: Any, src: GGUFSource) -> Any:
    from transformers import GenerationConfig

    from .base import KT

    eos: list[int] = []
    for key in (KT.EOS_ID, KT.EOT_ID, KT.EOM_ID):
        tid = src.integer(key, None)
        if tid is not None and 0 <= tid < config.vocab_size and tid not in eos:
            eos.append(tid)
    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=(eos[0] if len(eos) == 1 else eos) or None,
        pad_token_id=config.pad_token_id,
    )


def _write_weights(
    tmp: Path, plan: list[PlannedWeight], dtype: str, max_shard_bytes: int, src: GGUFSource
) -> None:
    """The planned weights as safetensors, one shard at a time (a shard's tensors are the only ones held)."""
    import json

    import torch
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    itemsize = torch.tensor([], dtype=torch_dtype).element_size()
    shards: list[list[PlannedWeight]] = [[]]
    size = 0
    for w in plan:
        nbytes = w.n_elements * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(w)
        size += nbytes
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, 1):
        name = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        tensors: dict[str, Any] = {}
        for w in shard:
            arr = w.produce()
            if dtype == "float16" and float(abs(arr).max(initial=0.0)) > F16_MAX:
                raise ModelError(
                    f"{src.path}: tensor {w.gguf_name} has values beyond float16's range "
                    f"(max |x| = {float(abs(arr).max()):.4g}); use dtype float32 or bfloat16"
                )
            t = torch.from_numpy(arr)
            tensors[w.hf_name] = (t if torch_dtype == torch.float32 else t.to(torch_dtype)).contiguous()
            weight_map[w.hf_name] = name
            total += w.n_elements * itemsize
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2) + "\n", encoding="utf-8"
        )
