"""Routing through the server: every held-out test prompt of every domain of a built multi-domain factory
(`gguf-factory build examples/domains.yaml`, or benchmarks/build.py's output) sent to a `gguf-factory serve
router.yaml` process with `"model": "auto"`; the domain the server chose (its X-Route header) against the
domain the prompt came from, per domain, with latencies and what the pool loaded.

    python benchmarks/serve_routing.py [--build benchmarks/work/build/out]

Writes benchmarks/results/serve_routing.{json,md} (stamped with date, commit, command and machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx

sys.path.insert(0, str(Path(__file__).parent))
from gguf_factory.data import read_chat_file  # noqa: E402
from serve import free_port, percentile, start_server  # noqa: E402
from stamp import git_commit, machine, portable  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def held_out(build_dir: Path) -> dict[str, list[str]]:
    """Each domain's held-out prompts: the first user turn of its test.jsonl, from the build's own steps."""
    doc = json.loads((build_dir / "build.json").read_text())
    out: dict[str, list[str]] = {}
    for step in doc["steps"]:
        name = step["name"]
        if name.startswith("prepare:") and name != "prepare:all" and "." not in name:
            test = Path(step["path"]) / "data" / "test.jsonl"
            prompts = []
            for conv in read_chat_file(test).conversations:
                users = [m.content for m in conv.messages if m.role == "user"]
                if users:
                    prompts.append(users[0])
            out[name.split(":", 1)[1]] = prompts
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, default=Path(__file__).parent / "work" / "build" / "out")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    manifest = args.build / "router.yaml"
    prompts = held_out(args.build)
    port = free_port()
    log = Path(tempfile.mkdtemp()) / "serve.log"
    proc = start_server(manifest, port, args.threads, log)
    url = f"http://127.0.0.1:{port}"
    per: dict[str, dict[str, int]] = {}
    latencies: list[float] = []
    try:
        with httpx.Client(timeout=120) as client:
            for domain, texts in prompts.items():
                per[domain] = {"prompts": len(texts), "correct": 0}
                for text in texts:
                    t0 = time.perf_counter()
                    r = client.post(
                        f"{url}/v1/chat/completions",
                        json={"model": "auto", "max_tokens": 8, "temperature": 0,
                              "messages": [{"role": "user", "content": text}]},
                    )  # fmt: skip
                    latencies.append(time.perf_counter() - t0)
                    r.raise_for_status()
                    routed = r.headers["x-route"].split(";")[0]
                    assert r.json()["model"] == routed
                    per[domain]["correct"] += routed == domain
            health = client.get(f"{url}/health").json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    total = sum(v["prompts"] for v in per.values())
    correct = sum(v["correct"] for v in per.values())
    result = {
        "build": str(args.build),
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(),
        "threads": args.threads,
        "domains": {d: {**v, "accuracy": v["correct"] / v["prompts"]} for d, v in per.items()},
        "accuracy": correct / total,
        "requests": total,
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "latency_p95_ms": 1000 * percentile(latencies, 0.95),
        "loaded": [m["id"] for m in health["models"] if m["loaded"]],
        "models": [m["id"] for m in health["models"]],
    }
    result = portable(result)
    (RESULTS / "serve_routing.json").write_text(json.dumps(result, indent=2) + "\n")
    section = [
        "# Routing through the server (a multi-domain router manifest)",
        "",
        f"{result['date']}, commit {result['commit']}, {result['machine']['cpus']} CPU cores "
        f"({result['machine']['cpu']['model']}); `{result['command']}`.",
        "",
        f"`gguf-factory serve router.yaml` on the `examples/domains.yaml` build; each domain's held-out test "
        f'prompts ({total}) sent with `"model": "auto"` (8-token replies), the server\'s choice read from '
        "its `X-Route` header, compared with the domain the prompt came from.",
        "",
        "| domain | prompts | routed correctly |",
        "|---|---:|---:|",
        *(f"| {d} | {v['prompts']} | {100 * v['correct'] / v['prompts']:.1f} % |" for d, v in per.items()),
        f"| all | {total} | {100 * correct / total:.1f} % |",
        "",
        f"Latency p50 {result['latency_p50_ms']:.0f} ms, p95 {result['latency_p95_ms']:.0f} ms per routed "
        f"request (routing + lazy loading + generation); models loaded at the end: "
        f"{', '.join(result['loaded'])} of {', '.join(result['models'])}.",
    ]
    (RESULTS / "serve_routing.md").write_text("\n".join(section) + "\n")
    print("\n".join(section))


if __name__ == "__main__":
    main()
