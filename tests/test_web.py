"""The chat page at `/` of `serve`: its HTTP side (HTML, assets, Content-Security-Policy) with raw HTTP, and
the page itself driven in headless Chromium over the DevTools protocol against the real server and the tiny
GGUF: the user types a key and a message and clicks, and the streamed reply must appear."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from gguf_factory.serve import ModelPool, create_app
from gguf_factory.serve.app import AUTO
from gguf_factory.serve.web import STATIC_DIR
from serve_helpers import assert_idle_soon, running
from tools import missing_tool

KEY = "web-key-456"
MAX_TOKENS = 32
GREETING = "Hello, how are you?"
FOLLOW_UP = "What is your favorite food?"


@pytest.fixture(scope="module")
def pool(tiny_f16_gguf: Path) -> Iterator[ModelPool]:
    p = ModelPool({tiny_f16_gguf.stem: tiny_f16_gguf}, queue_timeout=20)
    yield p
    p.close()


@pytest.fixture(scope="module")
def keyed_url(pool: ModelPool) -> Iterator[str]:
    with running(create_app(pool, api_key=KEY, max_tokens_limit=MAX_TOKENS)) as url:
        yield url


def plain_reply(url: str, model: str, messages: list[dict[str, str]]) -> str:
    """The same request the page makes, without streaming: the reference for what the page shows."""
    body = {"model": model, "messages": messages, "temperature": 0}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def streamed_pieces(url: str, model: str, messages: list[dict[str, str]]) -> list[str]:
    """The content pieces the server streams for that request, read as raw server-sent events."""
    body = {"model": model, "messages": messages, "stream": True}
    pieces = []
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                pieces += [c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"]]
    return [p for p in pieces if p]


# --- plain HTTP ------------------------------------------------------------------------------------
class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline_code: list[str] = []
        self.links: list[dict[str, str | None]] = []
        self.bad_attrs: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.bad_attrs += [f"{tag}[{k}]" for k in a if k.startswith("on") or k == "style"]
        if tag == "script":
            self.scripts.append(a)
            self._in_script = True
        elif tag == "link":
            self.links.append(a)
        elif tag == "style":
            self.inline_code.append("<style>")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_code.append(data)


def test_page_assets_and_csp(keyed_url: str) -> None:
    r = httpx.get(f"{keyed_url}/")  # the page itself needs no key: it holds no data
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
    assert directives["default-src"] == ["'self'"]
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"

    page = _Page()
    page.feed(r.text)
    assert page.inline_code == [] and page.bad_attrs == [], "no inline script, style or handlers"
    assert page.scripts and all(s.get("src") for s in page.scripts)
    assets = [s["src"] for s in page.scripts] + [link["href"] for link in page.links]
    assert len(assets) == 3  # app.js, icon, stylesheet
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for href in assets:
        assert not href.startswith(("http:", "https:", "//")), f"{href}: nothing from elsewhere"
        a = httpx.get(f"{keyed_url}/{href}")
        assert a.status_code == 200, href
        assert a.headers["content-type"].startswith(types[Path(href).suffix]), (href, a.headers)
        assert a.headers["content-security-policy"] == csp
        assert a.content == (STATIC_DIR / Path(href).name).read_bytes()
        etag = a.headers["etag"]  # Starlette's static files: revalidation is cheap
        assert httpx.get(f"{keyed_url}/{href}", headers={"If-None-Match": etag}).status_code == 304

    assert httpx.head(f"{keyed_url}/").status_code == 200
    assert httpx.get(f"{keyed_url}/web/__init__.py").status_code == 404  # only static/ is served
    assert httpx.get(f"{keyed_url}/web/..%2F__init__.py").status_code == 404
    assert httpx.get(f"{keyed_url}/v1/models").status_code == 401  # while the API keeps its key

    # model output reaches the page only as text; Trusted Types (in the CSP) enforce that in Chromium
    js = (STATIC_DIR / "app.js").read_text(encoding="utf-8")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function("):
        assert sink not in js, sink


def test_page_can_be_turned_off(pool: ModelPool) -> None:
    with running(create_app(pool, web_ui=False)) as url:
        r = httpx.get(f"{url}/")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        assert httpx.get(f"{url}/web/app.js").status_code == 404
        assert httpx.get(f"{url}/v1/models").status_code == 200


# --- headless Chromium over the DevTools protocol ----------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def chromium_present() -> None:
    if CHROMIUM is None:
        missing_tool(
            "no chromium binary on PATH (Debian: apt-get install -y --no-install-recommends chromium)"
        )


needs_chromium = pytest.mark.usefixtures("chromium_present")


_ON_FDS_3_4 = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
    "os.execv(sys.argv[3], sys.argv[3:])"
)


class DevToolsError(RuntimeError):
    pass


class Chromium:
    """Headless Chromium spoken to with the DevTools protocol over a pipe (``--remote-debugging-pipe``):
    JSON messages ending in a NUL byte, written to the browser's fd 3 and read from its fd 4."""

    def __init__(self, binary: str, profile: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        self._log = profile.parent / f"{profile.name}.log"
        args = [
            binary,
            "--headless=new",
            "--no-sandbox",  # root in a container
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1000,800",
            "about:blank",
        ]
        with open(self._log, "wb") as log:
            # a tiny trampoline puts the pipe ends on fds 3 and 4, then becomes chromium (not preexec_fn:
            # the server runs in a thread; not /bin/sh: dash only knows one-digit fd numbers)
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    "-c",
                    _ON_FDS_3_4,
                    str(to_browser_r),
                    str(from_browser_w),
                    *args,
                ],
                pass_fds=(to_browser_r, from_browser_w),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float = 15,
    ) -> Any:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            for reply in self._read(deadline):
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise DevToolsError(f"{method}: {reply['error']}")
                    return reply["result"]
                if "method" in reply:
                    self.events.append(reply)

    def _read(self, deadline: float) -> Iterator[dict[str, Any]]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise DevToolsError(f"no answer from chromium in time; its log: {self.log_tail()}")
            data = os.read(self._from_browser, 1 << 16)
            if not data:
                raise DevToolsError(f"chromium closed the pipe; its log: {self.log_tail()}")
            self._buf += data
        *messages, self._buf = self._buf.split(b"\0")
        for m in messages:
            yield json.loads(m)

    def log_tail(self) -> str:
        return self._log.read_text(errors="replace")[-2000:]

    @contextlib.contextmanager
    def tab(self) -> Iterator[Tab]:
        """A fresh tab (its own sessionStorage), closed afterwards."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        try:
            yield Tab(self, session)
        finally:
            self.call("Target.closeTarget", {"targetId": target})

    def close(self) -> None:
        with contextlib.suppress(DevToolsError, OSError):
            self.call("Browser.close")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


class Tab:
    def __init__(self, browser: Chromium, session: str):
        self.browser, self.session = browser, session
        self.call("Runtime.enable")
        self.call("Log.enable")

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return self.browser.call(method, params, self.session)

    def js(self, expression: str) -> Any:
        out = self.call(
            "Runtime.evaluate",
            {
                "expression": expression,
                "returnByValue": True,
                "awaitPromise": True,
                "includeCommandLineAPI": True,
            },
        )
        if "exceptionDetails" in out:
            raise DevToolsError(f"{expression}: {out['exceptionDetails']}")
        return out["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10) -> Any:
        """Poll ``expression`` in the page until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                state = self.js("[document.body && document.body.dataset.state, $('#error').textContent]")
                raise AssertionError(f"timed out waiting for {expression!r}; page state, error: {state}")
            time.sleep(0.03)

    def open(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete' && document.body.dataset.state === 'idle'")

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element."""
        x, y = self.js(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView();"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}
            )

    def type(self, selector: str, text: str) -> None:
        """Click into the field and type ``text`` (as the keyboard's text input would)."""
        self.click(selector)
        assert self.js(f"document.activeElement === document.querySelector({json.dumps(selector)})")
        self.call("Input.insertText", {"text": text})

    def problems(self) -> list[str]:
        """Script errors and Content-Security-Policy / Trusted Types reports in this tab."""
        out = []
        for e in self.browser.events:
            if e.get("sessionId") != self.session:
                continue
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                out.append(str(p["exceptionDetails"]))
            elif e["method"] == "Log.entryAdded":
                text = p["entry"].get("text", "")
                if "Content Security Policy" in text or "Trusted Type" in text:
                    out.append(text)
        return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    assert CHROMIUM is not None
    # a freshly installed chromium's first start (fontconfig cache, new profile) on a busy 2-core CI
    # machine has taken longer than the 15 s a DevTools call gets: wait longer for the first answer,
    # and start it once more if it never comes
    for attempt in (1, 2):
        b = Chromium(CHROMIUM, tmp_path_factory.mktemp("chromium") / "profile")
        try:
            b.call("Browser.getVersion", timeout=90)
            break
        except DevToolsError:
            b.close()
            if attempt == 2:
                raise
    try:
        yield b
    finally:
        b.close()


BUBBLES = "[...$$('#log .msg')].map(m => [m.className, m.querySelector('.text').textContent])"
LAST_REPLY = "document.querySelector('#log .msg.assistant:last-child')"


def send_and_wait(tab: Tab, text: str, n_replies: int) -> dict[str, Any]:
    """Type ``text``, click Send, wait for reply number ``n_replies`` to finish streaming."""
    tab.type("#input", text)
    tab.click("#send")
    tab.wait_for(f"document.querySelectorAll('#log .msg.assistant').length === {n_replies}")
    tab.wait_for(f"{LAST_REPLY}.dataset.done !== 'false' && document.body.dataset.state === 'idle'")
    return tab.js(
        f"(() => {{ const m = {LAST_REPLY}; return {{text: m.querySelector('.text').textContent,"
        " done: m.dataset.done, chunks: Number(m.dataset.chunks), route: m.dataset.route || null,"
        " meta: m.querySelector('.meta').textContent}; })()"
    )


@needs_chromium
def test_browser_chat_with_api_key(browser: Chromium, keyed_url: str, tiny_f16_gguf: Path) -> None:
    model = tiny_f16_gguf.stem
    with browser.tab() as tab:
        tab.open(f"{keyed_url}/")
        # no key yet: the server's 401 is shown, the picker stays empty
        error = tab.js("$('#error').hidden ? '' : $('#error').textContent")
        assert "missing API key" in error and "401" in error, error
        assert tab.js("$('#model').options.length") == 0 and tab.js("$('#send').disabled")

        # the key, typed in; leaving the field loads the models with it
        tab.type("#api-key", KEY)
        tab.click("#input")
        tab.wait_for("$('#model').options.length > 0 && document.body.dataset.state === 'idle'")
        assert tab.js("[...$('#model').options].map(o => o.value)") == [model]
        assert tab.js("$('#error').hidden")
        assert tab.js("sessionStorage.getItem('gguf-factory.api-key')") == KEY
        tab.js(f"$('#model').value = {json.dumps(model)}")

        first = send_and_wait(tab, GREETING, 1)
        history = [{"role": "user", "content": GREETING}]
        pieces = streamed_pieces(keyed_url, model, history)
        assert first["done"] == "true" and first["text"].strip(), first
        assert first["text"] == plain_reply(keyed_url, model, history), "the pieces make the server's reply"
        assert first["chunks"] == len(pieces) > 1, f"{first['chunks']} piece(s) shown, {pieces} streamed"
        assert first["meta"].startswith(model)

        # the conversation goes on: the page sends its history
        second = send_and_wait(tab, FOLLOW_UP, 2)
        history += [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": FOLLOW_UP}]
        assert second["text"] == plain_reply(keyed_url, model, history) and second["done"] == "true"
        assert tab.js(BUBBLES) == [
            ["msg user", GREETING],
            ["msg assistant", first["text"]],
            ["msg user", FOLLOW_UP],
            ["msg assistant", second["text"]],
        ]
        assert tab.js("$('#input').value") == "" and tab.js("$('#error').hidden")

        # the key survives a reload (sessionStorage), so the models load at once
        tab.open(f"{keyed_url}/")
        assert tab.js("$('#api-key').value") == KEY and tab.js("$('#model').options.length") == 1

        # a wrong key: the server's message is shown
        tab.js("$('#api-key').value = ''")
        tab.type("#api-key", "wrong")
        tab.click("#input")
        tab.wait_for("!$('#error').hidden")
        assert "invalid API key" in tab.js("$('#error').textContent")

        # the CSP holds in the browser: no HTML from strings, and nothing was blocked or thrown
        assert (
            tab.js(
                "try { document.createElement('p').innerHTML = '<b>x</b>'; 'allowed' } catch (e) { e.name }"
            )
            == "TypeError"
        )
        assert tab.problems() == []


@needs_chromium
def test_browser_stop_button(browser: Chromium, keyed_url: str, pool: ModelPool, tiny_f16_gguf: Path) -> None:
    """Stop while the request waits for a busy model: the page takes the message back, the server the
    model."""
    model = tiny_f16_gguf.stem
    with browser.tab() as tab:
        tab.open(f"{keyed_url}/")
        tab.type("#api-key", KEY)
        tab.click("#input")
        tab.wait_for("$('#model').options.length > 0 && document.body.dataset.state === 'idle'")
        lease = pool.acquire(model, timeout=10)
        try:
            tab.type("#input", GREETING)
            tab.click("#send")
            tab.wait_for("document.body.dataset.state === 'streaming'")
            assert tab.js("[$('#send').disabled, $('#stop').disabled]") == [True, False]
            time.sleep(0.2)  # the request is queued on the server
            tab.click("#stop")
            tab.wait_for("document.body.dataset.state === 'idle'")
        finally:
            lease.release()
        assert "Stopped" in tab.js("$('#error').textContent")
        assert tab.js(BUBBLES) == [] and tab.js("$('#input').value") == GREETING
        assert_idle_soon(pool)
        reply = send_and_wait(tab, "", 1)  # the restored message, sent again
        assert reply["done"] == "true" and reply["text"].strip()
        assert tab.problems() == []


@needs_chromium
def test_browser_router_auto(browser: Chromium, tiny_f16_gguf: Path, tmp_path: Path) -> None:
    """With a router the picker offers "auto" first, and a routed reply says where it went."""
    from gguf_factory.serve import pool_models

    manifest = tmp_path / "router.yaml"
    manifest.write_text(
        f"version: 1\ndefault: chat\ndomains:\n  chat: {{model: {tiny_f16_gguf}}}\n"
        f"  jokes: {{model: {tiny_f16_gguf}, keywords: [joke]}}\n",
        encoding="utf-8",
    )
    router, specs = pool_models(manifest)
    routed = ModelPool(specs, queue_timeout=20)
    try:
        with (
            running(create_app(routed, router=router, max_tokens_limit=MAX_TOKENS)) as url,
            browser.tab() as tab,
        ):
            tab.open(f"{url}/")
            assert tab.js("[...$('#model').options].map(o => o.value)") == [AUTO, "chat", "jokes"]
            assert tab.js("$('#model').value") == AUTO and not tab.js("$('#model-note').hidden")
            reply = send_and_wait(tab, "Tell me a joke", 1)
            assert reply["done"] == "true" and reply["text"].strip()
            assert reply["route"] == "jokes" and reply["meta"].startswith("→ jokes (keyword"), reply
            assert tab.problems() == []
    finally:
        routed.close()
