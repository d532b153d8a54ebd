"""Hostile chat templates, requests and files (issue 13): bounded everywhere, refused with one line (exit 2)
or a JSON error, never a hang, a crash or an overwritten input.

Real parts only: the tests' tiny model run by llama.cpp, GGUFs rewritten here by the test corpus's own
serializer (tests/corrupt_corpus.py, independent of the readers under test), the real server in uvicorn.
Nothing here is timed against a target: benchmarks/hardening.py measures; a subprocess timeout only keeps
a regression (a hang) from hanging the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from cli_helpers import assert_one_line_error
from corrupt_corpus import KV, VT, Raw, load_model, serialize
from generation_checks import assert_chats
from gguf_factory.errors import InputError, TemplateError, TemplateRefusedError
from gguf_factory.runtime import load
from gguf_factory.serve import ModelPool, create_app
from serve_helpers import free_port, running, wait_until_up

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}" + CHATML
HUGE = "{{ 'x' * 2000000000 }}" + CHATML
ESCAPE = "{{ cycler.__init__.__globals__.os.system('true') }}" + CHATML
NO_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + CHATML
)
# passes the probe conversations, loops when a message says "boom": a check at load cannot see it
TRIGGER = (
    "{% for m in messages %}{% if m['content'] == 'boom' %}"
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{% endif %}{% endfor %}" + CHATML
)
CLI_TIMEOUT = 120  # a hang would otherwise hang the suite


def with_template(src: Path, out: Path, template: str) -> Path:
    m = load_model(src)
    m.drop_kv("tokenizer.chat_template")
    m.kvs.append(KV("tokenizer.chat_template", VT.STRING, template))
    out.write_bytes(serialize(m))
    return out


def cli(*args: Any, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gguf_factory.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_refused(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    """Exit 2 with one ``error:`` line naming ``needle`` and no traceback (progress lines may precede)."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and needle in errors[0], proc.stderr


# --- 1. chat templates ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("template", "says"),
    [(LOOP, "template-timeout"), (HUGE, "template-render-error"), (ESCAPE, "template-unsafe")],
    ids=["loop", "huge-string", "sandbox-escape"],
)
def test_generate_refuses_a_hostile_template_in_one_line(
    tiny_f16_gguf: Path, tmp_path: Path, template: str, says: str
) -> None:
    bad = with_template(tiny_f16_gguf, tmp_path / "bad.gguf", template)
    proc = cli("generate", bad, "hello", "--max-tokens", "4")
    assert_one_line_error(proc, "chat template refused", says)


def test_a_template_that_loops_on_a_crafted_message_is_stopped(tiny_f16_gguf: Path, tmp_path: Path) -> None:
    """The probe at load passes; the render of the crafted conversation is stopped (worker killed) and
    the same model answers the next conversation."""
    bad = with_template(tiny_f16_gguf, tmp_path / "trigger.gguf", TRIGGER)
    with load(bad) as m:
        with pytest.raises(TemplateError, match="did not finish"):
            m.chat([{"role": "user", "content": "boom"}], max_tokens=2)
        with pytest.raises(TemplateError):
            m.prompt_ids([{"role": "user", "content": "boom"}])
        assert_chats(m, [{"role": "user", "content": "hi"}], max_tokens=2)  # a reply, the greedy one
    refusing = with_template(tiny_f16_gguf, tmp_path / "nosystem.gguf", NO_SYSTEM)
    with load(refusing) as m, pytest.raises(TemplateRefusedError, match="no system role"):
        m.chat([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}], max_tokens=2)
    proc = cli("generate", bad, "boom", "--max-tokens", "2")
    assert_one_line_error(proc, "did not finish rendering")


def test_bounded_renders_equal_llama_cpp_pythons(tiny_f16_gguf: Path) -> None:
    """Replies and prompt token counts through the bounded chat handler equal llama-cpp-python's own
    Jinja2ChatFormatter rendering of the same template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    with load(tiny_f16_gguf) as m:
        fmt = Jinja2ChatFormatter(
            template=m.chat_template,
            eos_token=m.llm._model.token_get_text(m.llm.token_eos()),
            bos_token=m.llm._model.token_get_text(m.llm.token_bos()),
        )
        assert m.render_prompt(msgs) == fmt(messages=msgs).prompt
        assert m.llm.chat_handler is not None  # ours, not llama-cpp-python's in-process renderer
        out = m.llm.create_chat_completion(messages=msgs, max_tokens=6, temperature=0)
        ids = m.tokenize(fmt(messages=msgs).prompt, special=True)
        assert out["usage"]["prompt_tokens"] == len(ids)


def test_terminal_chat_goes_on_after_a_refused_message(tiny_f16_gguf: Path, tmp_path: Path) -> None:
    from rich.console import Console

    from gguf_factory.chat import chat_loop

    refusing = with_template(tiny_f16_gguf, tmp_path / "nosystem.gguf", NO_SYSTEM)
    lines = iter(["hello", "/exit"])
    console = Console(record=True, width=200)
    with load(refusing) as m:
        chat_loop(m, system="be nice", max_tokens=4, console=console, read=lambda _: next(lines))
    out = console.export_text()
    assert "no system role" in out and "message not sent" in out


def test_eval_and_imatrix_templates_are_bounded() -> None:
    from gguf_factory.evaluate import ChatTemplate

    with pytest.raises(TemplateError, match="template-timeout"):
        ChatTemplate(LOOP, "<s>", "</s>")
    t = ChatTemplate(TRIGGER, "<s>", "</s>")
    assert "<|im_start|>user\nhi" in t.render([{"role": "user", "content": "hi"}], True)
    t0 = time.monotonic()
    with pytest.raises(TemplateError):
        t.render([{"role": "user", "content": "boom"}], True)
    with pytest.raises(TemplateError):  # broken from now on: no second wait
        t.render([{"role": "user", "content": "hi"}], True)
    assert time.monotonic() - t0 < 60
    refuses = "{{ raise_exception('no system role') }}"
    with pytest.raises(TemplateError):
        ChatTemplate(refuses)


def test_eval_and_imatrix_refuse_a_hostile_template_in_one_line(
    tiny_f16_gguf: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """Both load the GGUF with llama-cpp-python themselves: the check runs before it compiles the
    template in-process (where Jinja would fold 'x' * 2000000000 into a 2 GB constant)."""
    bad = with_template(tiny_f16_gguf, tmp_path / "huge.gguf", HUGE)
    proc = cli("eval", bad, "--data", tiny_data_dir / "test.jsonl", "--limit", "2")
    assert_refused(proc, "chat template refused")  # after eval's own progress line
    out = tmp_path / "m.imatrix.gguf"
    proc = cli("imatrix", bad, "--data", tiny_data_dir, "-o", out, "--max-tokens", "64")
    assert_refused(proc, "chat template")
    assert not out.exists()


def test_export_ollama_refuses_a_looping_template(tiny_f16_gguf: Path, tmp_path: Path) -> None:
    bad = with_template(tiny_f16_gguf, tmp_path / "loop.gguf", LOOP)
    proc = cli("export", "ollama", bad, "-o", tmp_path / "out")
    assert_one_line_error(proc, "did not finish")


def test_template_modules_import_without_resource() -> None:
    """`resource` is POSIX-only: the template checks and the Ollama export work without it (Windows)."""
    script = (
        "import sys\n"
        "sys.modules['resource'] = None  # import resource -> ImportError, as on Windows\n"
        "from gguf_factory.doctor.template import check_template\n"
        "import gguf_factory.package.ollama_template\n"
        "import gguf_factory.doctor.validate, gguf_factory.doctor.repair\n"
        f"assert check_template({CHATML!r}) == []\n"
        "assert [p.code for p in check_template('{{ x.__class__ }}')] == ['template-unsafe']\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# --- 2. outputs never overwrite inputs ------------------------------------------------------------
def test_writers_refuse_their_own_inputs(
    tiny_f16_gguf: Path, tiny_hf_model: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf_model, hf)
    weights = next(hf.glob("*.safetensors"))
    before = weights.read_bytes()
    assert_one_line_error(cli("convert", hf, "-o", weights), "inside the input folder")
    assert weights.read_bytes() == before

    m = tmp_path / "m.gguf"
    shutil.copyfile(tiny_f16_gguf, m)
    data = m.read_bytes()
    assert_one_line_error(cli("imatrix", m, "--data", tiny_data_dir, "-o", m), "its own input")
    assert m.read_bytes() == data

    t = tmp_path / "t"
    t.mkdir()
    shutil.copyfile(tiny_f16_gguf, t / "Modelfile")  # a GGUF named Modelfile
    assert_one_line_error(cli("export", "ollama", t / "Modelfile", "-o", t), "its own input")
    assert (t / "Modelfile").read_bytes() == data

    d = tmp_path / "data"
    shutil.copytree(tiny_data_dir, d)
    train = (d / "train.jsonl").read_bytes()
    assert_one_line_error(cli("prepare", d / "train.jsonl", "-o", d), "its own input")
    assert (d / "train.jsonl").read_bytes() == train

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    proc = cli("convert-lora", adapter, "--base", hf, "-o", adapter / "adapter_model.safetensors")
    assert_one_line_error(proc, "inside the input folder")
    assert (adapter / "adapter_model.safetensors").read_bytes() == b"weights"

    link = tmp_path / "same.gguf"  # a hard link: another name, the same file
    os.link(m, link)
    assert_one_line_error(cli("quantize", m, "-o", link, "--type", "Q8_0"), "its own input")
    assert m.read_bytes() == data


def test_outputs_are_never_written_through_a_symlink(tiny_f16_gguf: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "out.gguf"
    link.symlink_to(victim)
    assert_one_line_error(cli("quantize", tiny_f16_gguf, "-o", link, "--type", "Q8_0"), "symbolic link")
    assert victim.read_text() == "keep me" and link.is_symlink()

    real = tmp_path / "elsewhere"
    real.mkdir()
    rel = tmp_path / "release"
    rel.symlink_to(real, target_is_directory=True)
    assert_one_line_error(cli("export", "release", tiny_f16_gguf, "-o", rel), "symbolic link")
    assert rel.is_symlink() and not any(real.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".old")]


def test_output_rule_unit(tmp_path: Path) -> None:
    from gguf_factory.files import check_output_dir, check_output_path

    a = tmp_path / "a.bin"
    a.write_bytes(b"x")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "in.txt").write_text("x")
    check_output_path(tmp_path / "new.bin", inputs=[a, sub])  # a new file beside the inputs: fine
    check_output_path(sub / "new.bin", inputs=[sub])  # a new file inside an input folder: fine
    with pytest.raises(InputError, match="its own input"):
        check_output_path(tmp_path / "sub" / ".." / "a.bin", inputs=[a])
    with pytest.raises(InputError, match="inside the input folder"):
        check_output_path(sub / "in.txt", inputs=[sub])
    with pytest.raises(InputError, match="holds the input"):
        check_output_dir(sub, inputs=[sub / "in.txt"])  # a folder written whole would destroy it


# --- 3, 6, 8. the server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_server(
    tiny_f16_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Any]]:
    """Three models: clean, one whose template loops on "boom", one whose template loops at once."""
    d = tmp_path_factory.mktemp("hostile-serve")
    models = {
        "good": tiny_f16_gguf,
        "trigger": with_template(tiny_f16_gguf, d / "trigger.gguf", TRIGGER),
        "loop": with_template(tiny_f16_gguf, d / "loop.gguf", LOOP),
        "nosystem": with_template(tiny_f16_gguf, d / "nosystem.gguf", NO_SYSTEM),
    }
    pool = ModelPool(models, queue_timeout=5)
    app = create_app(
        pool, max_tokens_limit=16, max_body_bytes=64 << 10, allowed_hosts=["localhost", "127.0.0.1"]
    )
    with running(app) as url:
        yield url, pool
    pool.close()


def chat(url: str, model: str, content: Any, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_serve_survives_hostile_templates(hostile_server: tuple[str, Any]) -> None:
    url, pool = hostile_server
    r = chat(url, "trigger", "boom")
    assert r.status_code == 500 and r.json()["error"]["code"] == "chat_template_error", r.text
    assert "did not finish" in r.json()["error"]["message"]
    assert chat(url, "trigger", "hi").status_code == 200  # the same model, the next request: answered
    assert chat(url, "good", "hi").status_code == 200
    r = chat(url, "loop", "hi")  # refused when it loads: a clear 500, not a hung request or a 503
    assert r.status_code == 500 and "chat template refused" in r.json()["error"]["message"], r.text
    assert chat(url, "good", "hello").status_code == 200
    body = {"model": "nosystem", "max_tokens": 4, "messages": [{"role": "system", "content": "x"}, *[
        {"role": "user", "content": "hi"}]]}  # fmt: skip
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "chat_template_refused", r.text
    assert "no system role" in r.json()["error"]["message"]
    assert not any(m["busy"] for m in pool.status())


def test_serve_request_limits(hostile_server: tuple[str, Any]) -> None:
    url, _ = hostile_server
    big = json.dumps({"model": "good", "messages": [{"role": "user", "content": "x" * (1 << 20)}]})
    r = httpx.post(f"{url}/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b"x" * 4096

    r = httpx.post(
        f"{url}/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413

    r = chat(url, "good", "word " * 12000)  # 60 kB: refused from its length, before it is tokenized
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert "at least" in r.json()["error"]["message"]

    raw = '{"model": "good", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    r = httpx.post(f"{url}/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{url}/v1/completions", json={"model": "good", "prompt": ""})
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"], r.text
    for field, value in [
        ("tools", [{"type": "function", "function": {"name": "bad name!", "parameters": {}}}]),
        ("tool_choice", {"type": "function", "function": {"name": "f"}}),
    ]:
        r = chat(url, "good", "hi", **{field: value})
        assert r.status_code == 400, (field, r.text)
        assert r.json()["error"]["param"].startswith(field), r.text
    assert chat(url, "good", "hi", response_format={"type": "text"}).status_code == 200
    r = chat(url, "good", "hi", response_format={"type": "json_schema", "json_schema": {"schema": {
        "type": "integer", "minimum": 1}}})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"].endswith("schema.minimum"), r.text


def test_serve_checks_the_host_header(hostile_server: tuple[str, Any]) -> None:
    url, _ = hostile_server
    port = url.rsplit(":", 1)[1]
    for host, ok in [
        (f"localhost:{port}", True),
        (f"127.0.0.1:{port}", True),
        (f"10.1.2.3:{port}", True),  # an address: never a rebinding page's own name
        (f"evil.example:{port}", False),
        (f"localhost.evil.example:{port}", False),
        ("", False),
    ]:
        r = httpx.get(f"{url}/v1/models", headers={"Host": host})
        assert (r.status_code == 200) == ok, (host, r.status_code, r.text)
        if not ok:
            assert r.json()["error"]["code"] == "invalid_host"


def test_non_streaming_generation_stops_when_the_client_goes(tiny_f16_gguf: Path) -> None:
    """The app driven as ASGI: a client that disconnects right after its request gets a generation that
    stopped at once; one that stays gets every token (EOS banned so the reply cannot end early)."""
    import anyio

    pool = ModelPool({"m": tiny_f16_gguf}, queue_timeout=10)
    app = create_app(pool, max_tokens_limit=64)
    with load(tiny_f16_gguf) as m:
        eos = m.llm.token_eos()
    body = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "logit_bias": {str(eos): -100}}
    ).encode()

    async def call(disconnect: bool) -> dict[str, Any]:
        sent: list[dict[str, Any]] = []
        gone = anyio.Event()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            if not disconnect:
                await gone.wait()  # the client stays until the response is complete
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                gone.set()

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
            "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())],
        }  # fmt: skip
        await app(scope, receive, send)
        return json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))

    try:
        stayed = anyio.run(call, False)
        left = anyio.run(call, True)
    finally:
        pool.close()
    assert stayed["usage"]["completion_tokens"] > 8, stayed
    assert left["usage"]["completion_tokens"] <= 2, left
    assert not pool.status()[0]["busy"]


def test_serve_key_rules(tiny_f16_gguf: Path) -> None:
    pool = ModelPool({"m": tiny_f16_gguf})
    with pytest.raises(InputError, match="empty"):
        create_app(pool, api_key="  ")
    assert_one_line_error(cli("serve", tiny_f16_gguf, "--api-key", ""), "--api-key is empty")
    env = {**os.environ, "GGUF_FACTORY_API_KEY": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "gguf_factory.cli", "serve", str(tiny_f16_gguf)],
        capture_output=True, text=True, timeout=CLI_TIMEOUT, env=env, check=False,
    )  # fmt: skip
    assert_one_line_error(proc, "GGUF_FACTORY_API_KEY is set but empty")


def test_serve_warns_on_a_public_address_without_a_key(tiny_f16_gguf: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "GGUF_FACTORY_API_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gguf_factory.cli", "serve", str(tiny_f16_gguf), "--host", "0.0.0.0",
         "--port", str(port), "--no-web-ui"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}")
        r = httpx.get(f"http://127.0.0.1:{port}/health")
        assert r.json() == {"status": "ok", "models": r.json().get("models")} or r.status_code == 200
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "without an API key" in out, out


# --- 4. nested arrays, files llama.cpp refuses -----------------------------------------------------
def nested_arrays(src: Path, out: Path, depth: int = 20000) -> Path:
    m = load_model(src)
    value = struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * depth + struct.pack("<IQ", 4, 0)
    m.kvs.append(KV("x.nested", VT.ARRAY, Raw(value)))
    out.write_bytes(serialize(m))
    return out


def test_nested_arrays_are_refused_by_every_reader(
    tiny_f16_gguf: Path, tiny_hf_model: Path, tmp_path: Path
) -> None:
    from gguf_factory.quantize import scan_gguf_header

    bad = nested_arrays(tiny_f16_gguf, tmp_path / "nested.gguf")
    with pytest.raises(InputError, match="nested"):
        scan_gguf_header(bad)
    assert_one_line_error(cli("generate", bad, "hi"), "nested")
    assert_one_line_error(cli("quantize", bad, "-o", tmp_path / "q.gguf", "--type", "Q8_0"), "nested")
    assert_one_line_error(cli("verify", bad, "--against", tiny_hf_model), "nested")
    assert_one_line_error(cli("serve", bad), "nested")
    proc = cli("validate", bad, "--no-smoke")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_verify_on_a_file_llama_cpp_refuses_is_one_line(
    tiny_f16_gguf: Path, tiny_hf_model: Path, tmp_path: Path
) -> None:
    data = tiny_f16_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 4096])  # the header reads; llama.cpp refuses the missing data
    assert_one_line_error(cli("verify", cut, "--against", tiny_hf_model), "llama.cpp could not load")


# --- 5. crafted headers: findings and tables stay small ---------------------------------------------
def many_tensors(path: Path, n: int, name: str | None = None) -> Path:
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, n, 1))
    key, val = b"general.architecture", b"llama"
    out += struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, len(val)) + val
    for i in range(n):
        nm = (name if name is not None else f"t{i}").encode()
        out += struct.pack("<Q", len(nm)) + nm + struct.pack("<IQ", 1, 32) + struct.pack("<IQ", 0, 0)
    out += b"\0" * (-len(out) % 32) + b"\0" * 128
    path.write_bytes(bytes(out))
    return path


def test_repeated_defects_are_capped(tmp_path: Path) -> None:
    from gguf_factory.doctor import inspect_gguf, validate
    from gguf_factory.doctor.validate import MAX_PER_CODE

    f = many_tensors(tmp_path / "dups.gguf", 3000, name="")
    r = validate(f, smoke=False)
    per_code: dict[str, int] = {}
    for x in r.findings:
        per_code[x.code] = per_code.get(x.code, 0) + 1
    assert per_code["tensor-duplicate-name"] == MAX_PER_CODE + 1  # the first ones and one summary
    assert any("2979 more" in x.message for x in r.findings if x.code == "tensor-duplicate-name")
    assert len(r.findings) < 200
    report = inspect_gguf(f, max_rows=40)
    assert report.n_tensors == 3000 and len(report.tensors) == 40
    proc = cli("inspect", f)
    assert proc.returncode == 0 and "2960 more" in proc.stdout and len(proc.stdout.splitlines()) < 400


def test_header_checks_run_without_the_cyclic_collector(tmp_path: Path) -> None:
    """Reading and checking a crafted header allocates millions of cycle-free objects: the collector is
    paused meanwhile (each collection walks everything alive) and restored after, also after an error."""
    import gc

    from gguf_factory.doctor import validate
    from gguf_factory.doctor.reader import gc_paused

    collections = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    f = many_tensors(tmp_path / "dups.gguf", 20_000, name="x")
    gc.callbacks.append(count)
    try:
        validate(f, smoke=False)
        assert len(collections) <= 1  # the one the allocations owe, as the collector comes back on
        assert gc.isenabled()
        gc.collect()
        assert collections  # the callback sees collections: the empty list above means something
    finally:
        gc.callbacks.remove(count)
    with pytest.raises(RuntimeError), gc_paused():
        assert not gc.isenabled()
        raise RuntimeError
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()
    r = validate(f, smoke=False)  # 20 000 tensors of one foreign name: named once, duplicates counted
    unexpected = [x for x in r.findings if x.code == "tensor-unexpected"]
    assert len(unexpected) == 1 and "'x'" in unexpected[0].message
    assert any("19979 more" in x.message for x in r.findings if x.code == "tensor-duplicate-name")


# --- 7. YAML, manifests, release folders -------------------------------------------------------------
def _bomb() -> str:
    """Seven levels of ten aliases each: 10^7 strings from about 300 bytes (each level x10)."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdef", "bcdefg", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    return "\n".join(lines) + "\ndomains: *g\n"


BOMB = _bomb()


def test_yaml_alias_bomb_is_refused(tmp_path: Path) -> None:
    from gguf_factory.schema import safe_yaml

    f = tmp_path / "factory.yaml"
    f.write_text(BOMB)
    assert len(BOMB) < 600
    assert_one_line_error(cli("build", f), "aliases")
    recursive = "a: &a [1, *a]\n"
    with pytest.raises(InputError, match="refers to itself"):
        safe_yaml(recursive, "x.yaml")
    assert safe_yaml("base: &b {x: 1}\nother: *b\n", "ok.yaml") == {"base": {"x": 1}, "other": {"x": 1}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BOMB.replace("domains:", "rules:"))
    from gguf_factory.quantize import load_recipe

    with pytest.raises(InputError, match="aliases"):
        load_recipe(recipe)


def test_manifest_paths_stay_in_their_folder(tmp_path: Path, tiny_f16_gguf: Path) -> None:
    from gguf_factory.router import Router

    root = tmp_path / "proj"
    root.mkdir()
    (tmp_path / "secret.jsonl").write_text('{"messages": []}\n')
    for files, says in [("../secret.jsonl", "climbs out"), (str(tmp_path / "secret.jsonl"), "absolute path")]:
        (root / "factory.yaml").write_text(
            f"domains:\n  a: {{files: [{json.dumps(files)}]}}\n  b: {{categories: [food]}}\n"
        )
        assert_one_line_error(cli("build", root / "factory.yaml"), says)
    shutil.copyfile(tiny_f16_gguf, tmp_path / "outside.gguf")
    (root / "router.yaml").write_text("domains:\n  a: {model: ../outside.gguf}\n")
    with pytest.raises(InputError, match="climbs out"):
        Router(root / "router.yaml")
    (root / "router.yaml").write_text(
        f"domains:\n  a: {{model: {json.dumps(str(tmp_path / 'outside.gguf'))}}}\n"
    )
    assert Router(root / "router.yaml").targets["a"].model == (tmp_path / "outside.gguf").resolve()


def test_verify_release_flags_links_and_never_follows_them(tiny_f16_gguf: Path, tmp_path: Path) -> None:
    from gguf_factory.package import export_release, verify_release

    rel = tmp_path / "release"
    export_release([tiny_f16_gguf], rel)
    assert verify_release(rel, data=False).exit_code == 0
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-BYTES")
    (rel / "leak.gguf").symlink_to(secret)
    (rel / "sub").symlink_to(tmp_path, target_is_directory=True)
    r = verify_release(rel, data=False)
    codes = {(f.code, f.file) for f in r.findings}
    assert ("symlink", "leak.gguf") in codes and ("symlink", "sub") in codes
    assert "TOP-SECRET" not in json.dumps([f.message for f in r.findings] + r.notes)
    proc = cli("verify-release", rel, "--no-data")
    assert proc.returncode == 1 and "TOP-SECRET" not in proc.stdout + proc.stderr


# --- 9. metadata that contradicts the tensors ------------------------------------------------------
def test_validate_reports_contradicting_metadata(tiny_f16_gguf: Path, tmp_path: Path) -> None:
    from gguf_factory.doctor import validate

    assert validate(tiny_f16_gguf, smoke=False).exit_code == 0
    m = load_model(tiny_f16_gguf)
    m.kv("llama.vocab_size").value = 1000  # the token list and token_embd say 512
    m.drop_kv("llama.attention.head_count")
    m.kvs.append(KV("llama.attention.head_count", VT.ARRAY, [4, 4, 4], VT.UINT32))  # 3 layers of 2
    m.kvs.append(KV("llama.rope.scaling.original_context_length", VT.UINT32, 4096))  # > context 128
    bad = tmp_path / "contradicts.gguf"
    bad.write_bytes(serialize(m))
    r = validate(bad, smoke=False)
    msgs = {f.code: [] for f in r.findings}
    for f in r.findings:
        msgs[f.code].append(f.message)
    assert any("vocab_size = 1000" in x for x in msgs.get("vocab-size-mismatch", [])), r.findings
    assert any("3 per-layer values" in x for x in msgs.get("hparam-contradiction", [])), r.findings
    assert any("original_context_length" in x for x in msgs.get("hparam-contradiction", [])), r.findings
    assert r.exit_code == 1
