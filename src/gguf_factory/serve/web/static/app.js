// gguf-factory chat page: talks to this server's OpenAI-compatible API.
// Model output only ever reaches the page through text nodes (textContent / appendData).
"use strict";

(() => {
  const KEY_STORE = "gguf-factory.api-key";
  const MODEL_STORE = "gguf-factory.model";
  const AUTO = "auto";

  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model"),
    key: $("api-key"),
    newChat: $("new-chat"),
    system: $("system"),
    temperature: $("temperature"),
    maxTokens: $("max-tokens"),
    note: $("model-note"),
    error: $("error"),
    log: $("log"),
    form: $("composer"),
    input: $("input"),
    send: $("send"),
    stop: $("stop"),
  };

  const history = []; // {role, content} sent with every request
  let controller = null; // AbortController of the reply being streamed
  let loading = false; // the model list is being fetched
  let conversation = 0; // bumped by "New chat": a reply still in flight then belongs to no conversation

  // --- small helpers ---------------------------------------------------------------------------
  function updateState() {
    const state = controller ? "streaming" : loading ? "loading" : "idle";
    document.body.dataset.state = state; // tests and styles read it
    ui.send.disabled = state !== "idle" || ui.model.options.length === 0;
    ui.stop.disabled = state !== "streaming";
  }

  function showError(message) {
    ui.error.textContent = message;
    ui.error.hidden = false;
  }

  function clearError() {
    ui.error.textContent = "";
    ui.error.hidden = true;
  }

  function authHeaders() {
    const key = ui.key.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  // The server's OpenAI-style error body {"error": {"message", "type", "code", "param"}}, else the status.
  async function errorOf(resp) {
    let text = "";
    try {
      text = await resp.text();
    } catch (_) {
      // body unreadable: the status says enough
    }
    let message = "";
    try {
      const body = JSON.parse(text);
      if (body && body.error && typeof body.error.message === "string") message = body.error.message;
    } catch (_) {
      message = text.trim().slice(0, 300);
    }
    const status = `${resp.status}${resp.statusText ? " " + resp.statusText : ""}`;
    return message ? `${message} (HTTP ${status})` : `HTTP ${status}`;
  }

  function nearBottom() {
    return ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 40;
  }

  function scrollDown() {
    ui.log.scrollTop = ui.log.scrollHeight;
  }

  function bubble(role, text) {
    const el = document.createElement("div");
    el.className = `msg ${role}`;
    const body = document.createElement("div");
    body.className = "text";
    const node = document.createTextNode(text);
    body.append(node);
    const meta = document.createElement("div");
    meta.className = "meta";
    el.append(body, meta);
    ui.log.append(el);
    scrollDown();
    return { el, node, meta };
  }

  // --- models ----------------------------------------------------------------------------------
  async function loadModels() {
    loading = true;
    updateState();
    try {
      await fetchModels();
    } catch (e) {
      ui.model.replaceChildren();
      showError(`Cannot read the model list: ${e.message}`);
    } finally {
      loading = false;
      updateState();
    }
  }

  async function fetchModels() {
    ui.model.disabled = true;
    let resp;
    try {
      resp = await fetch("v1/models", { headers: authHeaders(), cache: "no-store" });
    } catch (e) {
      showError(`Cannot reach the server: ${e.message}`);
      ui.model.replaceChildren();
      return;
    }
    if (!resp.ok) {
      const message = await errorOf(resp);
      ui.model.replaceChildren();
      showError(resp.status === 401 ? `${message}. Enter the server's API key above.` : message);
      if (resp.status === 401) ui.key.focus();
      return;
    }
    const body = await resp.json();
    const ids = (body.data || []).map((m) => String(m.id));
    ids.sort((a, b) => (b === AUTO) - (a === AUTO)); // "auto" (router) first, server order otherwise
    ui.model.replaceChildren(
      ...ids.map((id) => {
        const opt = document.createElement("option");
        opt.value = id;
        opt.textContent = id === AUTO ? "auto (route each message)" : id;
        return opt;
      }),
    );
    const saved = sessionStorage.getItem(MODEL_STORE);
    if (saved && ids.includes(saved)) ui.model.value = saved;
    ui.model.disabled = ids.length === 0;
    clearError();
    if (ids.length === 0) showError("The server lists no models.");
    showNote();
  }

  function showNote() {
    const auto = ui.model.value === AUTO;
    ui.note.textContent = auto ? "auto: the server routes each message to a domain; replies show which." : "";
    ui.note.hidden = !auto;
  }

  // --- chat ------------------------------------------------------------------------------------
  function requestBody(model) {
    const messages = [];
    const system = ui.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...history);
    const body = { model, messages, stream: true };
    const temperature = ui.temperature.value.trim();
    if (temperature !== "") body.temperature = Number(temperature);
    const maxTokens = ui.maxTokens.value.trim();
    if (maxTokens !== "") body.max_tokens = Number(maxTokens);
    return body;
  }

  // Server-sent events from a fetch body: calls onEvent(data) for each event's data field.
  async function readEvents(resp, onEvent) {
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    let finished = false;
    try {
      while (!finished) {
        const { value, done } = await reader.read();
        if (done) return;
        buf = (buf + value).replace(/\r\n/g, "\n");
        let end;
        while (!finished && (end = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, end);
          buf = buf.slice(end + 2);
          const data = block
            .split("\n")
            .filter((line) => line.startsWith("data:"))
            .map((line) => line.slice(5).replace(/^ /, ""))
            .join("\n");
          if (data && onEvent(data) === false) finished = true;
        }
      }
    } finally {
      reader.cancel().catch(() => {}); // no-op once the stream has ended; else stops the download
    }
  }

  function routeLabel(header) {
    // "domain; rule=keyword; confidence=1.000"
    const [domain, ...rest] = header.split(";").map((s) => s.trim());
    const info = Object.fromEntries(rest.map((kv) => kv.split("=")));
    const conf = info.confidence !== undefined ? ` ${Number(info.confidence).toFixed(2)}` : "";
    return { domain, text: `→ ${domain}${info.rule ? ` (${info.rule}${conf})` : ""}` };
  }

  async function send(text) {
    const model = ui.model.value;
    if (!model) {
      showError("No model to talk to: the model list is empty (check the API key).");
      return;
    }
    clearError();
    history.push({ role: "user", content: text });
    const user = bubble("user", text);
    const reply = bubble("assistant", "");
    reply.el.dataset.chunks = "0";
    reply.el.dataset.done = "false";
    reply.meta.textContent = model === AUTO ? "routing…" : model;
    const mine = conversation;
    controller = new AbortController();
    updateState();

    let got = "";
    let finish = null;
    let failure = null;
    try {
      const resp = await fetch("v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
        body: JSON.stringify(requestBody(model)),
        signal: controller.signal,
        cache: "no-store",
      });
      if (!resp.ok) throw new Error(await errorOf(resp));
      const route = resp.headers.get("X-Route");
      if (route) {
        const { domain, text: label } = routeLabel(route);
        reply.el.dataset.route = domain;
        reply.meta.textContent = label;
      }
      await readEvents(resp, (data) => {
        if (data === "[DONE]") return false;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message || "the server stopped the reply");
        const choice = (event.choices || [])[0];
        if (!choice) return true;
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          const follow = nearBottom();
          reply.node.appendData(piece);
          got += piece;
          reply.el.dataset.chunks = String(Number(reply.el.dataset.chunks) + 1);
          if (follow) scrollDown();
        }
        if (choice.finish_reason) finish = choice.finish_reason;
        return true;
      });
    } catch (e) {
      failure = e;
    } finally {
      controller = null;
      updateState();
    }
    if (mine !== conversation) return; // "New chat" was pressed meanwhile

    const stopped = failure && failure.name === "AbortError";
    if (got) {
      history.push({ role: "assistant", content: got });
      if (finish === "length") reply.meta.append(" · cut at max tokens");
      if (stopped) reply.meta.append(" · stopped");
      reply.el.dataset.done = stopped ? "stopped" : failure ? "error" : "true";
      if (failure && !stopped) showError(`The reply broke off: ${failure.message}`);
    } else {
      // Nothing came back: take the message back so it can be sent again (after fixing the key, ...).
      history.pop();
      user.el.remove();
      reply.el.remove();
      if (!ui.input.value) ui.input.value = text;
      if (stopped) showError("Stopped before the reply began.");
      else if (failure) showError(failure.message);
      else showError("The model replied with no text.");
    }
  }

  // --- wiring ----------------------------------------------------------------------------------
  ui.form.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = ui.input.value.trim();
    if (!text || controller) return;
    ui.input.value = "";
    send(text);
  });

  ui.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      ui.form.requestSubmit();
    }
  });

  ui.stop.addEventListener("click", () => {
    if (controller) controller.abort();
  });

  ui.newChat.addEventListener("click", () => {
    conversation += 1;
    if (controller) controller.abort();
    history.length = 0;
    ui.log.replaceChildren();
    clearError();
    ui.input.focus();
  });

  ui.model.addEventListener("change", () => {
    sessionStorage.setItem(MODEL_STORE, ui.model.value);
    showNote();
  });

  ui.key.addEventListener("change", () => {
    const key = ui.key.value.trim();
    if (key) sessionStorage.setItem(KEY_STORE, key);
    else sessionStorage.removeItem(KEY_STORE);
    loadModels();
  });

  ui.key.value = sessionStorage.getItem(KEY_STORE) || "";
  loadModels();
})();
