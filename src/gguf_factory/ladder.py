"""``ladder``: the usual quantization levels of one F16/F32 GGUF, built in one go, evaluated against it and
reported as the compression table (type, size, bits/weight, reduction, PPL, ΔPPL, KLD, top-1) in Markdown
and JSON, with a PNG of size vs KLD. A ladder whose quality is not monotone in size is flagged.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .evaluate import EvalResult, evaluate_many
from .files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    human_size,
    prepare_output_dir,
    require_file,
)
from .quantize import normalize_qtype, quantize, read_gguf_info

log = logging.getLogger(__name__)

LADDER_TYPES = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")


@dataclass
class Rung:
    qtype: str
    path: str
    size_bytes: int
    bits_per_weight: float
    reduction: float
    """1 - size / reference size."""
    tensor_types: dict[str, int]
    """ggml type -> number of tensors (shows K-quant fallbacks on narrow tensors)."""
    perplexity: float | None = None
    delta_ppl: float | None = None
    kld_mean: float | None = None
    kld_p99: float | None = None
    top1: float | None = None
    reply_similarity: float | None = None
    """Mean similarity of greedy replies to the reference's (with ``replies=``)."""


@dataclass
class LadderResult:
    reference: Rung
    rungs: list[Rung]
    non_monotone: list[str] = field(default_factory=list)
    """One line per pair of rungs where the bigger file is not better (higher mean KLD or PPL)."""
    evaluation: EvalResult | None = None
    markdown_path: Path | None = None
    json_path: Path | None = None
    plot_path: Path | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": asdict(self.reference),
            "rungs": [asdict(r) for r in self.rungs],
            "non_monotone": self.non_monotone,
            "evaluation": self.evaluation.to_json() if self.evaluation else None,
            "seconds": self.seconds,
        }

    def to_markdown(self, title: str) -> str:
        lines = [f"# {title}", ""]
        if self.evaluation:
            e = self.evaluation
            lines.append(
                f"Quality on `{e.data_path}`: {e.n_conversations} conversations, "
                f"{e.n_tokens} assistant tokens; "
                f"KLD and top-1 against `{Path(self.reference.path).name}`."
            )
            lines.append("")
        replies = any(r.reply_similarity is not None for r in self.rungs)
        lines += [
            "| type | size | bits/weight | reduction % | PPL | ΔPPL % | mean KLD | p99 KLD | top-1 % "
            + ("| reply sim % " if replies else "")
            + "| tensor types |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if replies else "") + "---|",
        ]
        for r in [self.reference, *self.rungs]:
            types = ", ".join(f"{k}×{v}" for k, v in r.tensor_types.items())
            sim = f"{_f(r.reply_similarity, 100, '.1f')} | " if replies else ""
            lines.append(
                f"| {r.qtype} | {human_size(r.size_bytes)} | {r.bits_per_weight:.2f} | "
                f"{100 * r.reduction:.1f} | {_f(r.perplexity, 1, '.4f')} | {_f(r.delta_ppl, 100, '+.2f')} | "
                f"{_f(r.kld_mean, 1, '.4g')} | "
                f"{_f(r.kld_p99, 1, '.4g')} | {_f(r.top1, 100, '.2f')} | {sim}{types} |"
            )
        lines.append("")
        if self.non_monotone:
            lines.append("**Quality is not monotone in size:**")
            lines += [f"- {x}" for x in self.non_monotone]
        elif self.evaluation:
            lines.append("Quality is monotone in size: every bigger rung has lower mean KLD and PPL.")
        if self.plot_path:
            lines += ["", f"![size vs KLD]({self.plot_path.name})"]
        return "\n".join(lines) + "\n"


def _f(v: float | None, scale: float, spec: str) -> str:
    return "–" if v is None else format(v * scale, spec)


def rung_of(qtype: str, path: Path, ref_bytes: int) -> Rung:
    """A :class:`Rung` for a file: size, bits per weight, reduction, tensor types (no scores yet)."""
    info = read_gguf_info(path)
    size = sum(p.stat().st_size for p in info.parts or [path])  # every part of a split set
    return Rung(
        qtype=qtype,
        path=str(path),
        size_bytes=size,
        bits_per_weight=info.bits_per_weight,
        reduction=1.0 - size / ref_bytes if ref_bytes else 0.0,
        tensor_types=info.type_counts(),
    )


def monotonicity_problems(rungs: Sequence[Rung]) -> list[str]:
    """Neighbours in size order where the bigger file has a higher mean KLD or perplexity.

    Any inversion in the ladder shows up between some pair of neighbours, so neighbours suffice.
    """
    out = []
    ordered = sorted(rungs, key=lambda r: r.size_bytes)
    for small, big in zip(ordered, ordered[1:], strict=False):
        if big.size_bytes == small.size_bytes:
            continue
        for metric in ("kld_mean", "perplexity"):
            a, b = getattr(small, metric), getattr(big, metric)
            if a is not None and b is not None and b > a:
                out.append(
                    f"{big.qtype} ({human_size(big.size_bytes)}) has a higher {metric} ({b:.6g}) than the "
                    f"smaller {small.qtype} ({human_size(small.size_bytes)}, {a:.6g})"
                )
    return out


def ladder(
    input_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    types: Sequence[str] = LADDER_TYPES,
    threads: int | None = None,
    limit: int | None = None,
    imatrix: str | os.PathLike[str] | None = None,
    plot: bool = True,
    reuse: bool = False,
    replies: int = 0,
) -> LadderResult:
    """Quantize ``input_path`` to every type in ``types`` under ``out_dir``, evaluate (with ``data``), report.

    With ``reuse``, a rung whose file already exists and is newer than the input is not rebuilt.
    """
    t0 = time.perf_counter()
    src = require_file(input_path, "input GGUF")
    names = [normalize_qtype(t) for t in types]
    if not names:
        raise InputError("no quantization types for the ladder")
    if len(set(names)) != len(names):
        raise InputError(f"duplicate types in the ladder: {', '.join(names)}")
    info = read_gguf_info(src)
    quantized = sorted({t for t in info.tensor_types.values() if t not in ("F32", "F16", "BF16")})
    if quantized:
        raise InputError(
            f"{src} is already quantized ({', '.join(quantized)}): a ladder starts from F16/F32/BF16"
        )
    out = prepare_output_dir(out_dir)
    stem = re.sub(r"[-_.](F32|F16|BF16|f32|f16|bf16)$", "", src.stem)
    ref_label = _float_label(info.type_counts())
    reference = rung_of(ref_label, src, sum(p.stat().st_size for p in info.parts or [src]))
    rungs: list[Rung] = []
    for name in names:
        path = out / f"{stem}-{name}.gguf"
        if reuse and path.is_file() and path.stat().st_mtime >= src.stat().st_mtime:
            log.info("reusing %s", path)
        else:
            quantize(src, path, name, threads=threads, imatrix=imatrix)
        rungs.append(rung_of(name, path, reference.size_bytes))

    result = LadderResult(reference=reference, rungs=rungs)
    if data is not None:
        ev = evaluate_many(
            [r.path for r in rungs],
            data,
            ref=src,
            limit=limit,
            threads=threads,
            labels=names,
            replies=replies,
        )
        result.evaluation = ev
        assert ev.reference is not None
        reference.perplexity, reference.delta_ppl = ev.reference.perplexity, 0.0
        reference.kld_mean, reference.kld_p99, reference.top1 = 0.0, 0.0, 1.0
        for r, s in zip(rungs, ev.models, strict=True):
            r.perplexity, r.delta_ppl = s.perplexity, s.delta_ppl
            r.kld_mean, r.kld_p99, r.top1 = s.kld_mean, s.kld_p99, s.top1
            r.reply_similarity = s.reply_similarity
        if replies:
            reference.reply_similarity = 1.0
        result.non_monotone = monotonicity_problems(rungs)
        for line in result.non_monotone:
            log.warning("non-monotone ladder: %s", line)
        if plot:
            result.plot_path = write_plot(rungs, out / "ladder-size-vs-kld.png", title=stem)
    result.seconds = time.perf_counter() - t0
    result.json_path = atomic_write_json(out / "ladder.json", result.to_json())
    result.markdown_path = atomic_write_text(
        out / "ladder.md", result.to_markdown(f"{stem}: quantization ladder")
    )
    return result


def _float_label(counts: dict[str, int]) -> str:
    for t in ("BF16", "F16", "F32"):
        if t in counts:
            return t
    return "F32"


def write_plot(
    rungs: Sequence[Rung],
    path: Path,
    title: str = "",
    *,
    label: str | None = None,
    others: Mapping[str, Sequence[Rung]] | None = None,
) -> Path:
    """Size (MB) vs mean KLD (log scale), one labelled point per rung, written atomically.

    ``others``: more series (label -> rungs) drawn on the same axes, e.g. imatrix or auto-quant variants
    of the same levels; then ``label`` names the first series in the legend.
    """
    heading = f"{title}: size vs KLD" if title else "size vs KLD"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2) if not others else (7.2, 4.8), dpi=110)
    series = [(label, rungs), *(others or {}).items()]
    styles = ["o-", "s--", "^-", "d:", "v-."]
    colors = ["#3465a4", "#f57900", "#4e9a06", "#75507b", "#cc0000"]
    for k, (name, rs) in enumerate(series):
        pts = sorted((r for r in rs if r.kld_mean is not None), key=lambda r: r.size_bytes)
        xs = [r.size_bytes / 1e6 for r in pts]
        ys = [max(r.kld_mean or 0.0, 1e-9) for r in pts]
        ax.plot(xs, ys, styles[k % len(styles)], color=colors[k % len(colors)], label=name)
        for r, x, y in zip(pts, xs, ys, strict=True):
            ax.annotate(r.qtype, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KL divergence vs reference (nats, log)")
    ax.set_title(heading)
    ax.grid(True, which="both", alpha=0.3)
    if others:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
