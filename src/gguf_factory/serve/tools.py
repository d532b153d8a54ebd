"""Tool calling for the server: OpenAI's ``tools`` / ``tool_choice`` over the model's own chat template.

A template that renders ``tools`` itself (found by rendering a probe tool in the bounded worker) gets them
as its ``tools`` variable; for one that does not, the tools are described in the system message, in the
Hermes / Qwen 2.5 format (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``). ``tool_choice``:

- ``none``: the tools are not shown to the model; a plain reply.
- ``auto`` (the default with tools): the model decides; a reply holding a call in the format its template
  teaches (``<tool_call>`` tags, or a bare ``{"name", "arguments"}`` object) becomes ``tool_calls``.
- ``required`` / a named function: the reply is sampled under a grammar (the tools' parameter schemas
  through :mod:`.structured`), so it *is* a call, with arguments matching the function's schema.

Replies with calls have OpenAI's shape: ``message.tool_calls`` (``id``, ``type: function``,
``function.name``, ``function.arguments`` as a JSON string), ``content: null``,
``finish_reason: "tool_calls"``. History may hold assistant messages with ``tool_calls`` and ``tool``
messages; a call's arguments are handed to the template as an object, as Hugging Face templates expect.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..runtime import ChatModel
from .structured import BadField, check_schema, schema_grammar

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
PROBE_TOOL = "gguf_factory_probe_tool"
TAG_OPEN, TAG_CLOSE = "<tool_call>", "</tool_call>"
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict[str, Any]]  # OpenAI tool definitions, checked
    choice: str  # auto | required | named
    name: str | None = None  # the named function

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    def grammar(self, tagged: bool) -> str | None:
        """The grammar a call is sampled under (``required``/named), or None (``auto``)."""
        if self.choice == "auto":
            return None
        chosen = [t for t in self.tools if self.choice == "required" or t["function"]["name"] == self.name]
        alternatives = []
        for t in chosen:
            f = t["function"]
            alternatives.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
            )
        schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
        grammar = schema_grammar(schema, "tools")
        if not tagged:
            return grammar
        renamed = re.sub(r"(?<![\w-])root(?![\w-])", "call", grammar)
        return f'root ::= "{TAG_OPEN}\\n" call "\\n{TAG_CLOSE}"\n{renamed}'


def plan_tools(
    tools: Any, tool_choice: Any, functions: Any = None, function_call: Any = None
) -> ToolPlan | None:
    """The tool plan a request asks for (None: no tools in play). Raises :class:`BadField`."""
    if functions is not None:  # OpenAI's deprecated names
        if tools is not None:
            raise BadField("functions", "give tools or functions, not both")
        if not isinstance(functions, list):
            raise BadField("functions", "must be a list of function definitions")
        tools = [{"type": "function", "function": f} for f in functions]
        if function_call is not None:
            tool_choice = (
                {"type": "function", "function": function_call}
                if isinstance(function_call, dict)
                else function_call
            )
    elif function_call is not None:
        raise BadField("function_call", "give functions with function_call")
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise BadField("tool_choice", "names a tool, but the request has no tools")
        return None
    if not isinstance(tools, list):
        raise BadField("tools", 'must be a list of {"type": "function", "function": {...}}')
    checked, seen = [], set()
    for i, t in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise BadField(where, 'each tool must be {"type": "function", "function": {"name": ...}}')
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise BadField(f"{where}.function.name", "give a name of 1-64 letters, digits, _ . or -")
        if name in seen:
            raise BadField(f"{where}.function.name", f"{name!r} is defined twice")
        seen.add(name)
        params = f.get("parameters", EMPTY_PARAMETERS)
        if not isinstance(params, dict):
            raise BadField(f"{where}.function.parameters", "must be a JSON schema object")
        desc = f.get("description")
        if desc is not None and not isinstance(desc, str):
            raise BadField(f"{where}.function.description", "must be a string")
        function = {"name": name, "parameters": params} | ({"description": desc} if desc else {})
        checked.append({"type": "function", "function": function})
    choice, name = "auto", None
    if tool_choice is None or tool_choice == "auto":
        pass
    elif tool_choice == "none":
        return None
    elif tool_choice == "required":
        choice = "required"
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in seen:
            raise BadField("tool_choice", f"names the function {name!r}, which is not among the tools")
        choice = "named"
    else:
        raise BadField(
            "tool_choice", 'use "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
        )
    plan = ToolPlan(checked, choice, name)
    if choice != "auto":  # the call is sampled under the parameters' grammar: they must be enforceable
        for i, t in enumerate(checked):
            if choice == "required" or t["function"]["name"] == name:
                check_schema(t["function"]["parameters"], f"tools.{i}.function.parameters")
    return plan


# --- the template ------------------------------------------------------------------------------------
def template_renders_tools(model: ChatModel) -> bool:
    """Whether the model's chat template shows ``tools`` to the model (a probe tool's name appears in the
    rendered prompt), rendered in the bounded worker; cached on the model."""
    cached = getattr(model, "_renders_tools", None)
    if cached is None:
        probe = [{"type": "function", "function": {"name": PROBE_TOOL, "parameters": EMPTY_PARAMETERS}}]
        try:
            text = model.formatter().render([{"role": "user", "content": "hi"}], tools=probe)  # type: ignore[attr-defined]
            cached = PROBE_TOOL in text
        except Exception:  # a template that refuses the probe cannot take tools either
            cached = False
        model._renders_tools = cached  # type: ignore[attr-defined]
    return bool(cached)


def template_tags_calls(model: ChatModel) -> bool:
    """Whether calls are written in ``<tool_call>`` tags: the template's own format, or the fallback's."""
    template = model.chat_template or ""
    return TAG_OPEN in template or not template_renders_tools(model)


def for_template(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as Hugging Face templates take them: a call's arguments as an object, not a string."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        if calls:
            fixed = []
            for c in calls:
                c = json.loads(json.dumps(c))
                fn = c.get("function") or {}
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        fn["arguments"] = json.loads(args)
                    except ValueError:
                        pass
                fixed.append(c)
            m["tool_calls"] = fixed
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out


def fallback_system_text(tools: Sequence[Mapping[str, Any]]) -> str:
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "You may call one or more functions to help with the user's request. The functions, one JSON "
        f"signature per line, within <tools></tools> tags:\n<tools>\n{lines}\n</tools>\n\nTo call a "
        f'function, reply with a JSON object in {TAG_OPEN}{TAG_CLOSE} tags:\n{TAG_OPEN}\n{{"name": '
        f'<function-name>, "arguments": <args-json-object>}}\n{TAG_CLOSE}'
    )


def prepare(
    model: ChatModel, messages: Sequence[Mapping[str, Any]], plan: ToolPlan | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and template variables a request is rendered with."""
    msgs = for_template(messages)
    if plan is None:
        return msgs, {}
    if template_renders_tools(model):
        return msgs, {"tools": plan.tools}
    text = fallback_system_text(plan.tools)
    if msgs and msgs[0].get("role") == "system":
        msgs[0] = {**msgs[0], "content": f"{msgs[0]['content']}\n\n{text}"}
    else:
        msgs.insert(0, {"role": "system", "content": text})
    return msgs, {}


# --- the reply ---------------------------------------------------------------------------------------
def parse_calls(text: str, names: Sequence[str]) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls`` from a reply, in the formats chat templates teach: ``<tool_call>`` blocks
    (Hermes, Qwen), Mistral's ``[TOOL_CALLS]`` followed by a JSON list of calls (v3 tokenizers) or by
    ``name[ARGS]{...}`` (v11), a bare JSON list of calls (Mistral's, its control token dropped), or the
    whole reply as one call object (Llama 3.1's ``{"name", "parameters"}``); [] when the reply holds no
    call of a known function."""
    objects = _call_objects(text)
    if objects is None:
        return []
    calls = []
    for obj in objects:
        if not isinstance(obj, dict) or obj.get("name") not in names:
            return []
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return []
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)},
            }
        )
    return calls


MISTRAL_CALLS, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"


def _json_prefix(text: str) -> Any:
    """The JSON value ``text`` starts with (trailing text ignored); ValueError when there is none."""
    return json.JSONDecoder().raw_decode(text.strip())[0]


def _call_objects(text: str) -> list[Any] | None:
    """The call objects a reply holds, before their names are checked; None for a plain reply."""
    try:
        if MISTRAL_CALLS in text:
            parts = [p.strip() for p in text.split(MISTRAL_CALLS)[1:]]
            if parts and parts[0].startswith("["):  # v3: [TOOL_CALLS][{"name": ..., "arguments": ...}]
                listed = _json_prefix(parts[0])
                return listed if isinstance(listed, list) and listed else None
            objects = []  # v11: [TOOL_CALLS]name[ARGS]{...}, once per call
            for part in parts:
                name, sep, args = part.partition(MISTRAL_ARGS)
                if not sep:
                    return None
                objects.append({"name": name.strip(), "arguments": _json_prefix(args)})
            return objects or None
        blocks = re.findall(rf"{re.escape(TAG_OPEN)}\s*(.*?)\s*(?:{re.escape(TAG_CLOSE)}|$)", text, re.S)
        if blocks:
            return [json.loads(b) for b in blocks]
        stripped = text.strip()
        if stripped.startswith("{"):
            return [json.loads(stripped)]
        if stripped.startswith("[{"):
            listed = json.loads(stripped)
            return listed if isinstance(listed, list) else None
    except ValueError:
        return None
    return None


def with_tool_calls(out: dict[str, Any], plan: ToolPlan) -> dict[str, Any]:
    """A chat completion whose reply holds calls, in OpenAI's ``tool_calls`` shape."""
    choice = out["choices"][0]
    text = choice["message"].get("content") or ""
    calls = parse_calls(text, plan.names)
    if calls and choice.get("finish_reason") != "length":
        choice["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
        choice["finish_reason"] = "tool_calls"
    return out
