"""Smoke test: llama.cpp loads the file and generates a few tokens, in a child process.

Each prompt goes through the file's own chat template when it has one (rendered in Jinja's sandbox, as
the template check does), so the model sees what a chat client would send; a file without a template, or
one whose template does not render, is prompted with the raw text.

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
from typing import Any

SMOKE_PROMPTS = ("Hello, how are you?", "What is the capital of France?", "Tell me a joke.")


@dataclass
class SmokeResult:
    ok: bool
    code: str | None = None  # finding code when not ok
    message: str = ""
    replies: list[str] = field(default_factory=list)
    n_tokens: int = 0
    seconds: float = 0.0
    chat_template: bool = False  # the prompts went through the file's chat template
    template_note: str = ""  # why the raw text was used instead, when the file has a template


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
    template, note = _chat_template(llm)
    replies: list[str] = []
    n_tokens = 0
    for prompt in SMOKE_PROMPTS:
        tokens: list[int] = []
        if template is not None:
            tokens, why = _templated_tokens(llm, template, prompt)
            if tokens and len(tokens) + max_tokens > n_ctx:
                tokens, why = [], f"the templated prompt takes {len(tokens)} tokens, over the context {n_ctx}"
            if not tokens:
                template, note = None, why  # one failure is enough: raw text for every prompt
        if not tokens:
            tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True)
        if not tokens:
            return {"ok": False, "code": "smoke-tokenize-failed", "message": f"no tokens for {prompt!r}"}
        if len(tokens) + max_tokens > n_ctx:
            return {
                "ok": False,
                "code": "smoke-tokenize-failed",
                "message": f"the prompt for {prompt!r} takes {len(tokens)} tokens, over the context {n_ctx}",
            }
        llm.reset()
        llm.eval(tokens)
        # the last position's logits, through llama.cpp's C API (llama_get_logits_ith)
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))
        if not np.isfinite(logits).all():
            return {"ok": False, "code": "smoke-bad-logits", "message": f"non-finite logits for {prompt!r}"}
        out = llm.create_completion(tokens, max_tokens=max_tokens, temperature=0.0)
        replies.append(out["choices"][0]["text"])
        n_tokens += int(out["usage"]["completion_tokens"])
    llm.close()
    return {
        "ok": True,
        "replies": replies,
        "n_tokens": n_tokens,
        "seconds": time.perf_counter() - t0,
        "chat_template": template is not None,
        "template_note": note,
    }


def _special_text(llm: Any, token: int) -> str:
    if token < 0 or token >= llm.n_vocab():
        return ""
    return llm.detokenize([token], special=True).decode("utf-8", errors="replace")


def _chat_template(llm: Any) -> tuple[str | None, str]:
    """The file's chat template (None when it has none), and a note when there is none."""
    template = llm.metadata.get("tokenizer.chat_template")
    if not isinstance(template, str) or not template.strip():
        return None, "the file has no chat template"
    return template, ""


def _templated_tokens(llm: Any, template: str, prompt: str) -> tuple[list[int], str]:
    """``prompt`` as one user turn through the chat template, tokenized with special tokens parsed;
    ([], reason) when the template does not render in the sandbox."""
    from .template import render_chat

    bos, eos = _special_text(llm, llm.token_bos()), _special_text(llm, llm.token_eos())
    try:
        text = render_chat(template, [{"role": "user", "content": prompt}], bos, eos)
    except Exception as e:  # a broken or unsafe template: the caller falls back to raw text
        return [], f"the chat template did not render ({type(e).__name__}: {e})"
    if prompt not in text:
        return [], "the rendered chat template does not contain the prompt"
    starts_with_bos = bool(bos) and text.startswith(bos)  # the template wrote BOS itself: do not add another
    return llm.tokenize(text.encode("utf-8"), add_bos=not starts_with_bos, special=True), ""


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
        chat_template=bool(d.get("chat_template", False)),
        template_note=str(d.get("template_note", "")),
    )


if __name__ == "__main__":
    result = _run_in_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
