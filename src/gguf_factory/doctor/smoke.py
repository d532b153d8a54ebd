"""Smoke test: llama.cpp loads the file and generates a few tokens, in a child process.

A file that passed the static checks can still crash llama.cpp; running it in a separate interpreter
turns a crash (a signal), a hang or an exception into a finding instead of killing the validator.
Run as ``python -m gguf_factory.doctor.smoke FILE`` it prints one JSON object on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

SMOKE_PROMPTS = ("Hello, how are you?", "What is the capital of France?", "Tell me a joke.")


@dataclass
class SmokeResult:
    ok: bool
    code: str | None = None  # finding code when not ok
    message: str = ""
    replies: list[str] = field(default_factory=list)
    n_tokens: int = 0
    seconds: float = 0.0


def _run_in_child(path: str, max_tokens: int, n_ctx: int) -> dict[str, object]:
    import time

    t0 = time.perf_counter()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # llama.cpp logs to fd 2
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    try:
        llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=2, n_batch=64, verbose=False, seed=1)
    except Exception as e:  # llama-cpp-python raises ValueError on a load failure
        return {"ok": False, "code": "smoke-load-failed", "message": f"llama.cpp cannot load it: {e}"}
    replies: list[str] = []
    n_tokens = 0
    for prompt in SMOKE_PROMPTS:
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True)
        if not tokens:
            return {"ok": False, "code": "smoke-tokenize-failed", "message": f"no tokens for {prompt!r}"}
        llm.reset()
        llm.eval(tokens)
        # the last position's logits, through llama.cpp's C API (llama_get_logits_ith)
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))
        if not np.isfinite(logits).all():
            return {"ok": False, "code": "smoke-bad-logits", "message": f"non-finite logits for {prompt!r}"}
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
        replies.append(out["choices"][0]["text"])
        n_tokens += int(out["usage"]["completion_tokens"])
    llm.close()
    return {"ok": True, "replies": replies, "n_tokens": n_tokens, "seconds": time.perf_counter() - t0}


def smoke_test(
    path: str | os.PathLike[str], max_tokens: int = 8, n_ctx: int = 256, timeout: float = 120.0
) -> SmokeResult:
    cmd = [sys.executable, "-m", "gguf_factory.doctor.smoke", os.fspath(path), str(max_tokens), str(n_ctx)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return SmokeResult(False, "smoke-timeout", f"llama.cpp did not finish within {timeout:g} s")
    if proc.returncode < 0:
        return SmokeResult(False, "smoke-crashed", f"llama.cpp crashed (signal {-proc.returncode})")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return SmokeResult(False, "smoke-crashed", f"llama.cpp exited with code {proc.returncode}: {tail[0]}")
    d = json.loads(lines[-1])
    return SmokeResult(
        ok=bool(d.get("ok")),
        code=d.get("code"),
        message=str(d.get("message", "")),
        replies=list(d.get("replies", [])),
        n_tokens=int(d.get("n_tokens", 0)),
        seconds=float(d.get("seconds", 0.0)),
    )


if __name__ == "__main__":
    result = _run_in_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
