"""Exports: Ollama Modelfile (TEMPLATE proven byte-identical with Go's text/template), LM Studio layout,
model card, release folders and verify-release. Real GGUFs (the tiny model, and copies of it carrying
real-world chat templates written with gguf-py), real Go, no mocks."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import pytest

from cli_helpers import assert_one_line_error, run_cli
from gguf_factory.doctor.template import render_chat
from gguf_factory.errors import InputError
from gguf_factory.package import (
    TemplateExportError,
    derive_ollama_template,
    export_lmstudio,
    export_ollama,
    export_release,
    parse_modelfile,
    read_model_info,
    verify_release,
)
from gguf_factory.package.ollama_template import render_probes
from gguf_factory.package.ollama_tools import json_normalized
from gguf_factory.runtime.templates import render_chat as render_bounded
from tools import missing_tool

# Chat templates as published with well-known models (Jinja, as in their tokenizer_config.json).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] "
    "+ '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
    "{% endif %}"
)
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] "
    "+ eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + "
    "eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n"
    "{% endif %}\n{% endfor %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0)"
    " %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | "
    "trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}"
    "{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
    "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0)"
    " %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
    "system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = "
    "message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
    "content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + "
    "' ' + eos_token }}{% endif %}{% endfor %}"
)
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- endif %}
    {{- "\n\n# Tools\n<tools>" }}{%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. ' }}
        {{- 'You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == \
"assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
# Qwen 2.5 Instruct's chat template exactly as published (tokenizer_config.json of
# Qwen/Qwen2.5-0.5B-Instruct, revision 7ae557604adf): tool definitions in the system turn as JSON, tool
# calls as <tool_call> JSON, runs of tool results in one user turn. (A backslash at a line's end continues
# the line, in this string and LLAMA32's.)
QWEN25_TOOLS = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are\
 provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments\
 within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\":\
 <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful\
 assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role ==\
 "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# Llama 3.2 Instruct's chat template as published: with tools, the tool list (JSON, indent=4) goes into the
# first user message, one tool call per message ({"name": ..., "parameters": ...}), tool results under the
# ipython role as JSON strings.
LLAMA32 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a\
 function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its\
 value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user\
 message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its\
 value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim\
 + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
# Mistral Nemo Instruct 2407's chat template as published (the copy in llama.cpp's
# models/templates/mistralai-Mistral-Nemo-Instruct-2407.jinja, ggerganov/llama.cpp 7b5e080): tool calls
# carry their ids ("id", 9 characters) and tool results the id of the call they answer ("call_id"); the
# tool list goes before the last user message, the system message into the last user turn. (A backslash at
# a line's end continues the line.)
MISTRAL_NEMO = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is\
 defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must\
 alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS][" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST]" + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST]" + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif (message.tool_calls is defined and message.tool_calls is not none) %}
        {{- "[TOOL_CALLS][" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!")\
 }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- message["content"] + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS]{"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an\
 initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""
# Literal text that needs quoting in Go templates and Modelfiles: quotes, braces, a non-breaking space.
AWKWARD = (
    "{% for m in messages %}{{ '\"' + m['role'] + '\" {{\u00a0' + m['content'] + ' }}\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\"assistant\" {{\u00a0' }}{% endif %}"
)

# name -> (chat template, BOS text, EOS text, add_bos_token, system messages supported)
STYLES: dict[str, tuple[str, str, str, bool, bool]] = {
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", True, True),
    "phi3": (PHI3, "<s>", "<|endoftext|>", False, True),
    "zephyr": (ZEPHYR, "<s>", "</s>", True, True),
    "mistral": (MISTRAL, "<s>", "</s>", True, False),
    "gemma": (GEMMA, "<bos>", "<eos>", True, False),
    "llama2": (LLAMA2, "<s>", "</s>", True, True),
    "gemma3": (GEMMA3, "<bos>", "<eos>", True, True),
    "qwen25": (QWEN25, "<|endoftext|>", "<|im_end|>", False, True),
    "qwen25_tools": (QWEN25_TOOLS, "<|endoftext|>", "<|im_end|>", False, True),
    "llama32": (LLAMA32, "<|begin_of_text|>", "<|eot_id|>", True, True),
    "awkward": (AWKWARD, "<s>", "</s>", False, True),
}

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant.\nAnswer in one line."},
    {"role": "user", "content": 'What is "GGUF"?'},
    {"role": "assistant", "content": "A file format for {{ llama.cpp }} models."},
    {"role": "user", "content": "And Q4_K_M?\nBe brief."},
    {"role": "assistant", "content": "A 4-bit k-quant — about 4.8 bits/weight."},
    {"role": "user", "content": "Thanks! ¿Y en español?"},
]


def write_variant(
    src: Path,
    dest: Path,
    template: str | None,
    bos: str = "<s>",
    eos: str = "</s>",
    add_bos: bool = False,
    extra: dict[str, tuple[gguf.GGUFValueType, object]] | None = None,
) -> Path:
    """A copy of ``src`` with another chat template (None: none) and special tokens 1/2 renamed to bos/eos."""
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    vt = gguf.GGUFValueType
    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    tokens = reader.get_field(gguf.Keys.Tokenizer.LIST).contents()
    tokens[1], tokens[2] = bos, eos
    new = {
        gguf.Keys.Tokenizer.LIST: MetadataDetails(vt.ARRAY, tokens, sub_type=vt.STRING),
        gguf.Keys.Tokenizer.BOS_ID: MetadataDetails(vt.UINT32, 1),
        gguf.Keys.Tokenizer.EOS_ID: MetadataDetails(vt.UINT32, 2),
        gguf.Keys.Tokenizer.ADD_BOS: MetadataDetails(vt.BOOL, add_bos),
    }
    if template is not None:
        new[gguf.Keys.Tokenizer.CHAT_TEMPLATE] = MetadataDetails(vt.STRING, template)
    for key, (t, v) in (extra or {}).items():
        new[key] = MetadataDetails(t, v)
    remove = [gguf.Keys.Tokenizer.CHAT_TEMPLATE] if template is None else []
    writer = gguf.GGUFWriter(dest, arch=arch, endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, new, remove)
    return dest


@pytest.fixture(scope="session")
def style_gguf(tiny_f16_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    root = tmp_path_factory.mktemp("styles")

    def make(style: str) -> Path:
        dest = root / f"tiny-{style}-F16.gguf"
        if not dest.exists():
            template, bos, eos, add_bos, _ = STYLES[style]
            write_variant(tiny_f16_gguf, dest, template, bos, eos, add_bos)
        return dest

    return make


Objects = list[dict[str, Any]]  # messages, tools

GO_RENDER = r"""
// Executes an Ollama TEMPLATE (Go text/template) on {"messages": [...], "tools": [...]} with the data
// Ollama gives it: .Messages after merging consecutive same-role messages (tool messages aside), .System,
// .Tools, and the "json" function (json.Marshal). The types follow the shapes of Ollama's template data:
// a tool has .Type and .Function (.Name, .Description, .Parameters); a message has .Role, .Content,
// .ToolCalls (each with .ID and .Function: .Name, .Arguments, a map that prints as JSON), .ToolName and
// .ToolCallID (Ollama 0.12.10's api.Message).
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Args map[string]any

func (a Args) String() string { b, _ := json.Marshal(a); return string(b) }

type ToolCallFunction struct {
	Index     int    `json:"index"`
	Name      string `json:"name"`
	Arguments Args   `json:"arguments"`
}

type ToolCall struct {
	ID       string           `json:"id"`
	Function ToolCallFunction `json:"function"`
}

type Message struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	ToolCalls  []ToolCall `json:"tool_calls"`
	ToolName   string     `json:"tool_name"`
	ToolCallID string     `json:"tool_call_id"`
}

type Property struct {
	Type        any    `json:"type,omitempty"`
	Items       any    `json:"items,omitempty"`
	Description string `json:"description,omitempty"`
	Enum        []any  `json:"enum,omitempty"`
}

type Parameters struct {
	Type       string              `json:"type"`
	Defs       any                 `json:"$defs,omitempty"`
	Items      any                 `json:"items,omitempty"`
	Required   []string            `json:"required,omitempty"`
	Properties map[string]Property `json:"properties"`
}

type Function struct {
	Name        string     `json:"name"`
	Description string     `json:"description"`
	Parameters  Parameters `json:"parameters"`
}

type Tool struct {
	Type     string   `json:"type"`
	Items    any      `json:"items,omitempty"`
	Function Function `json:"function"`
}

type Input struct {
	Messages []Message `json:"messages"`
	Tools    []Tool    `json:"tools"`
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}

func main() {
	src, err := os.ReadFile(os.Args[1])
	if err != nil {
		fail(err)
	}
	raw, err := os.ReadFile(os.Args[2])
	if err != nil {
		fail(err)
	}
	var in Input
	if err := json.Unmarshal(raw, &in); err != nil {
		fail(err)
	}
	var systems []string
	var msgs []*Message
	for i := range in.Messages {
		m := in.Messages[i]
		if m.Role == "system" {
			systems = append(systems, m.Content)
		}
		if n := len(msgs); n > 0 && msgs[n-1].Role == m.Role && m.Role != "tool" {
			msgs[n-1].Content += "\n\n" + m.Content
		} else {
			msgs = append(msgs, &m)
		}
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(string(src))
	if err != nil {
		fail(err)
	}
	data := map[string]any{
		"System": strings.Join(systems, "\n\n"), "Messages": msgs, "Tools": in.Tools, "Response": "",
	}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		fail(err)
	}
}
"""


@pytest.fixture(scope="session")
def go_render(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """Render a Go template on messages (and tools) with a Go program built once per session."""
    go = shutil.which("go")
    if go is None:
        missing_tool("`go` not found (Debian package golang-go): cannot execute Ollama templates")
    root = tmp_path_factory.mktemp("go")
    (root / "render.go").write_text(GO_RENDER, encoding="utf-8")
    env = {
        **os.environ,
        "GOCACHE": str(root / "cache"),
        "GOPATH": str(root / "gopath"),
        "GO111MODULE": "off",
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
    }
    exe = root / "render"
    subprocess.run([go, "build", "-o", str(exe), "render.go"], cwd=root, env=env, check=True, timeout=300)
    n = 0

    def render(template: str, messages: Objects, tools: Objects | None = None) -> str:
        nonlocal n
        n += 1
        t, m = root / f"t{n}.tmpl", root / f"m{n}.json"
        t.write_text(template, encoding="utf-8")
        # a tool message's "name" is Ollama's tool_name (as its OpenAI endpoint maps it)
        ollama = [{("tool_name" if k == "name" else k): v for k, v in x.items()} for x in messages]
        m.write_text(json.dumps({"messages": ollama, "tools": tools}), encoding="utf-8")
        proc = subprocess.run([str(exe), str(t), str(m)], capture_output=True, check=False, timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.decode("utf-8")

    return render


def modelfile_of(folder: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in parse_modelfile((folder / "Modelfile").read_text(encoding="utf-8")):
        out.setdefault(k, []).append(v)
    return out


def has_tools(messages: Objects, tools: Objects | None) -> bool:
    return bool(tools) or any("tool_calls" in m for m in messages)


def jinja_prompt(gguf_path: Path, messages: Objects, tools: Objects | None = None) -> str:
    """The reference: the GGUF's own chat template, rendered in the doctor's sandbox (with tools: in the
    bounded template worker), generation prompt on."""
    info = read_model_info(gguf_path)
    assert info.chat_template is not None
    if not has_tools(messages, tools):
        return render_chat(info.chat_template, messages, info.bos, info.eos)
    return render_bounded(info.chat_template, messages, bos_token=info.bos, eos_token=info.eos, tools=tools)


def assert_same_as_jinja(
    gguf_path: Path, out_dir: Path, messages: Objects, go_render: Callable, tools: Objects | None = None
) -> str:
    """Go renders the exported TEMPLATE as the Jinja template renders: byte for byte, except that JSON
    (tool definitions, tool-call arguments) is compared after parsing: Go's json.Marshal and Python's
    json.dumps differ in spacing, key order and escapes (Ollama's own templates write Go's JSON too)."""
    r = export_ollama(gguf_path, out_dir)
    template = modelfile_of(out_dir)["template"][0]  # as Ollama's parser reads it back
    assert template == r.template.template
    expected = jinja_prompt(gguf_path, messages, tools)
    if r.template.strip_bos:  # Ollama adds BOS itself (add_bos_token): the TEMPLATE leaves it out
        assert expected.startswith(r.template.bos)
        expected = expected[len(r.template.bos) :]
    got = go_render(template, messages, tools)
    if has_tools(messages, tools):
        assert json_normalized(got) == json_normalized(expected)
    else:
        assert got == expected
    return got


# ---------------------------------------------------------------------------------------------------
# the proof: Go's text/template renders byte-identical prompts
# ---------------------------------------------------------------------------------------------------


def test_chatml_template_renders_like_jinja_in_go(tiny_f16_gguf, tmp_path, go_render):
    got = assert_same_as_jinja(tiny_f16_gguf, tmp_path / "ollama", CONVERSATION, go_render)
    assert got.startswith("<|im_start|>system\nYou are a terse assistant.")
    assert got.endswith("¿Y en español?<|im_end|>\n<|im_start|>assistant\n")
    mf = modelfile_of(tmp_path / "ollama")
    assert mf["from"] == ["./tiny-F16.gguf"]
    assert (tmp_path / "ollama" / "tiny-F16.gguf").read_bytes() == tiny_f16_gguf.read_bytes()
    assert mf["parameter stop"] == ["<|im_end|>"]  # end of turn, and the EOS token's text
    assert mf["parameter num_ctx"] == ["128"]  # the model's trained context
    assert "system" not in mf


@pytest.mark.parametrize(
    "style", ["llama3", "phi3", "zephyr", "llama2", "gemma3", "qwen25", "qwen25_tools", "llama32", "awkward"]
)
def test_real_world_templates_render_like_jinja_in_go(style, style_gguf, tmp_path, go_render):
    assert_same_as_jinja(style_gguf(style), tmp_path, CONVERSATION, go_render)
    # without a system message, and a single turn
    assert_same_as_jinja(style_gguf(style), tmp_path, CONVERSATION[1:], go_render)
    assert_same_as_jinja(style_gguf(style), tmp_path, CONVERSATION[1:2], go_render)


@pytest.mark.parametrize("style", ["mistral", "gemma"])
def test_templates_without_system_role(style, style_gguf, tmp_path, go_render):
    path = style_gguf(style)
    assert_same_as_jinja(path, tmp_path / "a", CONVERSATION[1:], go_render)
    r = export_ollama(path, tmp_path / "b")
    assert r.template.system_note and "system" in r.template.system_note
    assert any("renders no system messages" in w for w in r.warnings)
    # a system prompt cannot be honoured: refused, not silently dropped
    with pytest.raises(InputError, match="system prompt"):
        export_ollama(path, tmp_path / "c", system="Be brief.")


@pytest.mark.parametrize("style", ["chatml", *STYLES])
def test_last_assistant_message_is_continued(style, style_gguf, tiny_f16_gguf, tmp_path, go_render):
    """Ollama's convention: a trailing assistant message is left open (no end of turn) to be continued."""
    path = tiny_f16_gguf if style == "chatml" else style_gguf(style)
    msgs = CONVERSATION if style not in ("mistral", "gemma") else CONVERSATION[1:]
    msgs = [*msgs, {"role": "assistant", "content": "Sure:"}]
    r = export_ollama(path, tmp_path)
    info = read_model_info(path)
    # the Jinja render of the whole conversation without the generation prompt (sandboxed)
    [(status, full)] = render_probes(info.chat_template, [(msgs, False)], info.bos, info.eos)
    assert status == "ok"
    if r.template.strip_bos:
        full = full[len(r.template.bos) :]
    got = go_render(r.template.template, msgs)
    assert got.endswith("Sure:") and full.startswith(got)
    assert full[len(got) :] == r.template.format.suffix["assistant"] + r.template.format.trailer


@pytest.mark.parametrize("style", ["chatml", *STYLES])
def test_go_template_matches_its_python_model(style, style_gguf, tiny_f16_gguf, tmp_path, go_render):
    """Odd role orders (system mid-way, assistant first, tool): Go renders what ChatFormat predicts."""
    path = tiny_f16_gguf if style == "chatml" else style_gguf(style)
    fmt = export_ollama(path, tmp_path).template

    def m(role: str, content: str) -> dict[str, str]:
        return {"role": role, "content": content}

    convs = [
        [m("assistant", "a0"), m("user", "u1")],
        [m("user", "u1"), m("system", "s1"), m("user", "u2")],
        [m("system", "s0"), m("assistant", "a1")],
        [m("user", "u1"), m("tool", "t1")],
        [m("system", "only")],
        [m("system", "s0"), m("user", "u1"), m("user", "u2"), m("assistant", "a1")],  # Ollama merges u1+u2
    ]
    for msgs in convs:
        assert go_render(fmt.template, msgs) == fmt.format.ollama_equivalent(msgs), msgs


def test_bos_left_to_ollama_only_when_the_model_adds_it(style_gguf, tmp_path):
    r = export_ollama(style_gguf("llama3"), tmp_path / "a")
    assert r.template.strip_bos and "<|begin_of_text|>" not in r.template.template
    assert modelfile_of(tmp_path / "a")["parameter stop"] == ["<|eot_id|>"]
    # same template, but the model does not add BOS: the TEMPLATE must write it
    src = style_gguf("llama3")
    no_bos = write_variant(
        src, tmp_path / "nobos.gguf", LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", False
    )
    r = export_ollama(no_bos, tmp_path / "b")
    assert not r.template.strip_bos and r.template.template.startswith("<|begin_of_text|>")
    assert modelfile_of(tmp_path / "b")["parameter stop"] == ["<|eot_id|>", "<|end_of_text|>"]


def test_trimming_template_is_reported(style_gguf, tmp_path):
    r = export_ollama(style_gguf("llama3"), tmp_path)
    assert any("trims whitespace" in w for w in r.warnings)


# ---------------------------------------------------------------------------------------------------
# tools: .Tools, tool calls and tool results, where the chat template writes them
# ---------------------------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city, in °C & <units>",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["C", "F"]},
            },
            "required": ["city"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
    },
}


def call(name: str, **arguments: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_CONVERSATION: Objects = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Weather in Paris, and the time in Tokyo?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [call("get_weather", city="Paris", unit="C"), call("get_time", tz="Asia/Tokyo")],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "tool", "content": "09:30"},
    {"role": "assistant", "content": "Paris: 21 °C. Tokyo: 09:30."},
    {"role": "user", "content": "And Lyon?"},
    {"role": "assistant", "content": "Checking Lyon.", "tool_calls": [call("get_weather", city="Lyon")]},
    {"role": "tool", "content": '{"temp": 19}'},
]


def test_json_is_compared_after_parsing():
    python = 'x {"b": 1, "a": [1, {"c": "<&>"}]} y'
    go = 'x {"a":[1,{"c":"\\u003c\\u0026\\u003e"}],"b":1} y'
    assert json_normalized(python) == json_normalized(go)
    assert json_normalized(python) != json_normalized(go.replace(" y", "  y"))  # text around: byte for byte
    assert json_normalized('{"a": 1}') != json_normalized('{"a": 2}')


def test_tools_render_like_jinja_in_go(style_gguf, tmp_path, go_render):
    """Qwen 2.5: the tool list in the system turn, tool calls, runs of tool results, all where the Jinja
    template writes them (JSON compared after parsing, see assert_same_as_jinja; the rest byte for byte)."""
    path = style_gguf("qwen25_tools")
    r = export_ollama(path, tmp_path / "x")
    assert r.tools and r.template.tools and r.template.tools_note is None
    assert not any(w.startswith("tools") or "tool calls" in w for w in r.warnings)
    got = assert_same_as_jinja(path, tmp_path, TOOL_CONVERSATION, go_render, tools=[WEATHER, CLOCK])
    assert got.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\n")
    # one JSON object per tool and line, as Go writes it: the same JSON as the tools after parsing
    listed = got.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0].split("\n")
    assert [json.loads(line) for line in listed] == [WEATHER, CLOCK]
    assert listed[0].startswith('{"type":"function","function":{"name":"get_weather"')
    assert "°C \\u0026 \\u003cunits\\u003e" in listed[0]  # json.Marshal escapes HTML characters
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city":"Paris","unit":"C"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
        '{"tz":"Asia/Tokyo"}}\n</tool_call>'
        '<|im_end|>\n<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>\n<tool_response>\n'
        "09:30\n</tool_response><|im_end|>\n<|im_start|>assistant\nParis: 21 °C. Tokyo: 09:30.<|im_end|>\n"
    ) in got
    assert got.endswith(
        '<|im_start|>assistant\nChecking Lyon.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city":"Lyon"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{"temp": 19}\n'
        "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    # no system message: Qwen's default one carries the tool list; one tool
    got = assert_same_as_jinja(path, tmp_path, TOOL_CONVERSATION[1:], go_render, tools=[CLOCK])
    assert got.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    # tool calls and results in a request without tools: the template's tool-free system turn
    got = assert_same_as_jinja(path, tmp_path, TOOL_CONVERSATION, go_render)
    assert "# Tools" not in got and '<tool_call>\n{"name": "get_time"' in got


# Not a named family: the tool list as one indented JSON array of the tools' functions, each call as a JSON
# object, each tool result a turn of its own.
ARRAY_TOOLS = (
    "{% if tools %}<|tools|>{{ tools | map(attribute='function') | list | tojson(indent=2) }}<|end|>\n"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<|assistant|>{{ m.content }}"
    "{% for c in m.tool_calls %}<|call|>{{ c.function | tojson }}{% endfor %}<|end|>\n"
    "{% elif m.role == 'tool' %}<|tool|>{{ m.content }}<|end|>\n"
    "{% else %}<|{{ m.role }}|>{{ m.content }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_tool_list_as_an_indented_json_array(go_render):
    """json.dumps does not give objects nested in an indented list on its own: the decomposition is
    verified with the JSON compared after parsing there too, and Go renders like Jinja."""
    t = derive_ollama_template(ARRAY_TOOLS, "<s>", "</s>", False)
    assert t.tools and t.tools_format.tools.function_only and not t.tools_format.exact_json
    for msgs, tools in ((TOOL_CONVERSATION, [WEATHER, CLOCK]), (TOOL_CONVERSATION[1:], [CLOCK])):
        expected = render_bounded(ARRAY_TOOLS, msgs, bos_token="<s>", eos_token="</s>", tools=tools)
        assert json_normalized(go_render(t.template, msgs, tools)) == json_normalized(expected)
    got = go_render(t.template, TOOL_CONVERSATION[1:4], [WEATHER, CLOCK])
    assert got.startswith('<|tools|>[\n  {"name":"get_weather",') and '},\n  {"name":"get_time",' in got
    assert '<|assistant|><|call|>{"name": "get_weather", "arguments": {"city":"Paris","unit":"C"}}' in got
    assert got.endswith('{"tz":"Asia/Tokyo"}}<|end|>\n<|tool|>{"temp": 21}<|end|>\n<|assistant|>')


def test_tool_calls_whose_content_the_template_drops(go_render):
    drops = (
        "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n{% endif %}"
        "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}<a>{% for c in m.tool_calls %}"
        "<call>{{ c.function.name }}|{{ c.function.arguments | tojson }}</call>{% endfor %}</a>\n"
        "{% else %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<a>{% endif %}"
    )
    t = derive_ollama_template(drops, "<s>", "</s>", False)
    assert t.tools and t.tools_format.calls.with_content is None
    expected = render_bounded(drops, TOOL_CONVERSATION, bos_token="<s>", eos_token="</s>", tools=[CLOCK])
    got = go_render(t.template, TOOL_CONVERSATION, [CLOCK])
    assert json_normalized(got) == json_normalized(expected) and "Checking Lyon." not in got
    assert '<a><call>get_weather|{"city":"Lyon"}</call></a>\n<tool>{"temp": 19}</tool>\n<a>' in got


def test_tool_template_matches_its_python_model(style_gguf, tmp_path, go_render):
    """Odd orders (a trailing tool call is continued, a system message mid-way, a tool result first,
    consecutive assistant messages merged): Go renders what the Python model predicts."""
    t = export_ollama(style_gguf("qwen25_tools"), tmp_path).template
    convs = [
        TOOL_CONVERSATION,
        TOOL_CONVERSATION[:3],
        [*TOOL_CONVERSATION[:6], {"role": "system", "content": "Be brief."}, *TOOL_CONVERSATION[6:]],
        [TOOL_CONVERSATION[3], *TOOL_CONVERSATION[1:3]],
        [*TOOL_CONVERSATION[1:3], {"role": "assistant", "content": "Done."}],
    ]
    for msgs in convs:
        for tools in (None, [WEATHER], [WEATHER, CLOCK]):
            got = go_render(t.template, msgs, tools)
            assert json_normalized(got) == json_normalized(t.ollama_equivalent(msgs, tools)), (msgs, tools)


def test_tool_call_tag_is_where_ollama_looks_for_it(style_gguf, tmp_path):
    """Ollama reads a tool call's opening tag in the model's output from the first raw text inside the first
    ``if`` whose argument is .ToolCalls, up to any "{" (its tool parser's rule): for Qwen, <tool_call>."""
    template = export_ollama(style_gguf("qwen25_tools"), tmp_path).template.template
    at = template.index("{{ if .ToolCalls }}")
    conditions = re.findall(r"\{\{ (?:else )?if ([^}]*)\}\}", template[:at])
    assert conditions and not any(".ToolCalls" in c.split() for c in conditions)
    opening = template[at + len("{{ if .ToolCalls }}") :].split("{{", 1)[0]
    assert opening.split("{", 1)[0].strip() == "<tool_call>"
    assert 'eq .Role "tool"' in template  # what Ollama looks for to see that tool results round-trip


def test_tools_that_cannot_be_reproduced_are_left_out_with_the_reason(style_gguf, tiny_f16_gguf, tmp_path):
    # a tool result that repeats the id of the call before it: Ollama's tool message has no such field
    looks_back = ARRAY_TOOLS.replace(
        "<|tool|>{{ m.content }}",
        "<|tool|>{% if messages[loop.index0 - 1].tool_calls %}"
        "{{ messages[loop.index0 - 1].tool_calls[0].id }}{% endif %}{{ m.content }}",
    )
    t = derive_ollama_template(looks_back, "<s>", "</s>", False)
    assert not t.tools and ".Tools" not in t.template
    assert "writes a tool call's id (tool_calls[i].id; Ollama's .ID) in its tool results" in t.tools_note
    # a trimmed copy of Qwen 2.5's template writes tools but drops assistant messages with tool calls
    r = export_ollama(style_gguf("qwen25"), tmp_path / "q")
    assert not r.tools and "does not write a tool call's name" in r.template.tools_note
    # tool definitions as text, not JSON
    text_tools = (
        "{% if tools %}Tools:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    t = derive_ollama_template(text_tools, "<s>", "</s>", False)
    assert not t.tools and "other than as the JSON of the tool or of its function" in t.tools_note
    # tool results numbered by their position in the conversation: caught on the verification conversations
    numbered = ARRAY_TOOLS.replace("<|tool|>", "<|tool {{ loop.index }}|>")
    t = derive_ollama_template(numbered, "<s>", "</s>", False)
    assert not t.tools and t.tools_note.startswith("with tools, the chat template cannot be expressed")
    assert ".Tools" not in t.template and any(w.startswith("tools: with tools") for w in t.warnings)
    # no tool support at all: nothing about tools but the summary
    r = export_ollama(tiny_f16_gguf, tmp_path / "c")
    assert not r.tools and r.template.tools_note is None and "Tools" not in r.template.template
    assert r.tools_summary == "not rendered (the chat template has no tool support)"
    assert not any("tool" in w for w in r.warnings)


def test_cli_reports_tools(style_gguf, tmp_path):
    proc = run_cli("export", "ollama", style_gguf("qwen25_tools"), "-o", tmp_path / "q")
    assert proc.returncode == 0, proc.stderr
    assert "tools: rendered (tool definitions, tool calls and tool results" in proc.stdout
    proc = run_cli("export", "ollama", style_gguf("llama32"), "-o", tmp_path / "l")
    assert proc.returncode == 0, proc.stderr
    assert "tools: rendered" in proc.stdout
    assert "warning: tools: the chat template refuses more than one tool call in a message" in proc.stderr


LLAMA_TOOL_CONVERSATION: Objects = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Paris", unit="C")]},
    {"role": "tool", "content": '{"temp": 21, "sky": "clear\\nwindy"}'},
    {"role": "assistant", "content": "Paris: 21 °C."},
    {"role": "user", "content": "And the time in Tokyo?"},
    {"role": "assistant", "content": "", "tool_calls": [call("get_time", tz="Asia/Tokyo")]},
    {"role": "tool", "content": "09:30"},
]


def test_llama32_tools_in_the_first_user_message(style_gguf, tmp_path, go_render):
    """Llama 3.2: the tool list in the first user turn (after the system turn), one tool call per message
    as {"name": ..., "parameters": ...}, tool results as JSON strings under the ipython role."""
    path = style_gguf("llama32")
    r = export_ollama(path, tmp_path / "x")
    assert r.tools and r.template.tools_note is None
    assert "{{ if eq $i $fu }}" in r.template.template  # the first user message, found by its index
    assert any("refuses more than one tool call" in w for w in r.warnings)
    got = assert_same_as_jinja(path, tmp_path, LLAMA_TOOL_CONVERSATION, go_render, tools=[WEATHER, CLOCK])
    first_user = got.split("<|start_header_id|>user<|end_header_id|>\n\n", 2)[1]
    assert first_user.startswith("Given the following functions")
    assert first_user.split("<|eot_id|>")[0].endswith("\n\nWeather in Paris?")
    assert '{"type":"function","function":{"name":"get_weather"' in first_user  # Go's compact JSON
    assert "<|start_header_id|>user<|end_header_id|>\n\nAnd the time in Tokyo?<|eot_id|>" in got
    assert (
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": '
        '{"city":"Paris","unit":"C"}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n'
        '"{\\"temp\\": 21, \\"sky\\": \\"clear\\\\nwindy\\"}"<|eot_id|>'
    ) in got
    assert got.endswith('"09:30"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n')
    # without a system message, a single user turn, and a trailing tool call to continue
    assert_same_as_jinja(path, tmp_path, LLAMA_TOOL_CONVERSATION[1:], go_render, tools=[CLOCK])
    assert_same_as_jinja(path, tmp_path, LLAMA_TOOL_CONVERSATION[1:2], go_render, tools=[WEATHER])
    t = r.template
    for msgs in (LLAMA_TOOL_CONVERSATION[:3], LLAMA_TOOL_CONVERSATION[1:], TOOL_CONVERSATION):
        got = go_render(t.template, msgs, [WEATHER])
        assert json_normalized(got) == json_normalized(t.ollama_equivalent(msgs, [WEATHER])), msgs


def with_ids(messages: Objects) -> Objects:
    """``messages`` with an id on each tool call and, on each tool result, the id and name of the call it
    answers (ids of 9 characters, as Mistral's templates require)."""
    out, pending = [], []
    for n, m in enumerate(messages):
        m = json.loads(json.dumps(m))
        for k, c in enumerate(m.get("tool_calls") or []):
            c["id"] = f"call{n}x{k}yz"[:9].ljust(9, "0")
            pending.append(c)
        if m["role"] == "tool":
            c = pending.pop(0)
            m["tool_call_id"], m["name"] = c["id"], c["function"]["name"]
        out.append(m)
    return out


def test_tool_call_ids_render_like_jinja_in_go(tiny_f16_gguf, tmp_path, go_render):
    """Mistral Nemo: each tool call written with its id (Ollama's .ID), each tool result with the id of the
    call it answers (.ToolCallID); the tool list before the last user message."""
    path = write_variant(tiny_f16_gguf, tmp_path / "nemo.gguf", MISTRAL_NEMO, "<s>", "</s>", True)
    r = export_ollama(path, tmp_path / "x")
    assert r.tools and r.template.tools_note is None
    assert "{{ .ToolCallID }}" in r.template.template and "{{ $pid = .ID }}" in r.template.template
    assert any("uses .ID, .ToolCallID: Ollama versions before 0.12.10" in w for w in r.warnings)
    convs = [TOOL_CONVERSATION[1:], TOOL_CONVERSATION[1:5], [*TOOL_CONVERSATION[1:6], TOOL_CONVERSATION[6]]]
    for msgs in convs:
        msgs = with_ids(msgs)
        got = assert_same_as_jinja(path, tmp_path, msgs, go_render, tools=[WEATHER, CLOCK])
        assert got.count("[AVAILABLE_TOOLS]") == 1
    got = go_render(r.template.template, with_ids(TOOL_CONVERSATION[1:6]), [CLOCK])
    assert (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city":"Paris","unit":"C"}, "id": "call1x0yz"}, '
        '{"name": "get_time", "arguments": {"tz":"Asia/Tokyo"}, "id": "call1x1yz"}]</s>'
        '[TOOL_RESULTS]{"content": {"temp": 21}, "call_id": "call1x0yz"}[/TOOL_RESULTS]'
        '[TOOL_RESULTS]{"content": 09:30, "call_id": "call1x1yz"}[/TOOL_RESULTS]'
    ) in got
    assert got.startswith("[AVAILABLE_TOOLS][") and got.endswith("Tokyo: 09:30.")  # continued


# Not a named family: a tool result's tool name (message.name) and call id in its header.
NAMED_RESULTS = ARRAY_TOOLS.replace(
    "<|tool|>{{ m.content }}", "<|tool name={{ m.name }} id={{ m.tool_call_id }}|>{{ m.content }}"
)


def test_tool_result_names_render_like_jinja_in_go(go_render):
    t = derive_ollama_template(NAMED_RESULTS, "<s>", "</s>", False)
    assert t.tools and "{{ .ToolName }}" in t.template
    for msgs in (with_ids(TOOL_CONVERSATION), with_ids(TOOL_CONVERSATION[1:5])):
        expected = render_bounded(NAMED_RESULTS, msgs, bos_token="<s>", eos_token="</s>", tools=[CLOCK])
        got = go_render(t.template, msgs, [CLOCK])
        assert json_normalized(got) == json_normalized(expected)
    assert "<|tool name=get_time id=call1x1yz|>09:30<|end|>" in got


# ---------------------------------------------------------------------------------------------------
# refusals: templates that a per-role Go template cannot reproduce
# ---------------------------------------------------------------------------------------------------


def test_content_transforming_template_is_refused():
    upper = "{% for m in messages %}<{{ m.role }}>{{ m.content | upper }}\n{% endfor %}"
    with pytest.raises(TemplateExportError, match="transforms or repeats message content"):
        derive_ollama_template(upper, "<s>", "</s>", False)


def test_position_dependent_template_is_refused_with_the_mismatch():
    third = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if loop.index0 == 3 %}[4th]{% endif %}"
        "</{{ m.role }}>\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    with pytest.raises(TemplateExportError, match=r"cannot be expressed per role.*\[4th\]"):
        derive_ollama_template(third, "<s>", "</s>", False)


def test_unsafe_template_is_refused():
    with pytest.raises(TemplateExportError, match="Python internals"):
        derive_ollama_template("{{ messages.__class__ }}", "<s>", "</s>", False)


@pytest.mark.parametrize("style", ["llama2", "gemma3"])
def test_system_folded_into_first_user_turn(style, style_gguf, tmp_path):
    r = export_ollama(style_gguf(style), tmp_path, system="Be brief.")
    assert r.template.format.fold is not None and r.template.system_note is None
    assert '"system" }}' not in r.template.template  # no system turn: it goes into the first user turn
    assert modelfile_of(tmp_path)["system"] == ["Be brief."]


def test_system_turn_that_varies_is_dropped_with_the_mismatch():
    varies = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>"
        "{% if m.role == 'system' and messages | length > 2 %}[long]{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    t = derive_ollama_template(varies, "<s>", "</s>", False)
    assert t.system_note and "[long]" in t.system_note and '"system"' not in t.template
    assert any("renders no system messages" in w and "[long]" in w for w in t.warnings)


def test_system_rendered_elsewhere_is_reported():
    last = (
        "{% for m in messages if m.role != 'system' %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
        "{% for m in messages if m.role == 'system' %}[SYS]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    t = derive_ollama_template(last, "<s>", "</s>", False)
    assert t.system_note and '"system"' not in t.template
    assert any("renders no system messages" in w for w in t.warnings)


# ---------------------------------------------------------------------------------------------------
# Modelfile parameters
# ---------------------------------------------------------------------------------------------------


def test_modelfile_system_and_context(tiny_f16_gguf, tmp_path):
    vt = gguf.GGUFValueType
    rec = write_variant(
        tiny_f16_gguf,
        tmp_path / "rec.gguf",
        read_model_info(tiny_f16_gguf).chat_template,
        "<|endoftext|>",
        "<|im_end|>",
        extra={"gguf_factory.context_length": (vt.UINT32, 64)},
    )
    export_ollama(rec, tmp_path / "a", system='Answer "briefly".\nNo lists.')
    mf = modelfile_of(tmp_path / "a")
    assert mf["system"] == ['Answer "briefly".\nNo lists.']
    assert mf["parameter num_ctx"] == ["64"]  # the recommended context wins over the trained one
    big = write_variant(
        tiny_f16_gguf,
        tmp_path / "big.gguf",
        read_model_info(tiny_f16_gguf).chat_template,
        extra={"llama.context_length": (vt.UINT32, 131072)},
    )
    export_ollama(big, tmp_path / "b", num_ctx=None)
    assert modelfile_of(tmp_path / "b")["parameter num_ctx"] == ["8192"]  # capped
    export_ollama(big, tmp_path / "c", num_ctx=2048)
    assert modelfile_of(tmp_path / "c")["parameter num_ctx"] == ["2048"]
    with pytest.raises(InputError, match='"""'):
        export_ollama(tiny_f16_gguf, tmp_path / "d", system='say """')


def test_gguf_without_chat_template(tiny_f16_gguf, tmp_path):
    plain = write_variant(tiny_f16_gguf, tmp_path / "plain.gguf", None, "<s>", "</s>")
    r = export_ollama(plain, tmp_path / "out")
    assert r.template is None and any("no chat template" in w for w in r.warnings)
    mf = modelfile_of(tmp_path / "out")
    assert "template" not in mf and "parameter stop" not in mf
    assert mf["from"] == ["./plain.gguf"]


# ---------------------------------------------------------------------------------------------------
# LM Studio
# ---------------------------------------------------------------------------------------------------


def test_lmstudio_layout(tiny_f16_gguf, tmp_path):
    r = export_lmstudio(tiny_f16_gguf, tmp_path / "models")
    assert r.gguf == tmp_path / "models" / "gguf-factory" / "model-hf-GGUF" / "tiny-F16.gguf"
    assert r.gguf.read_bytes() == tiny_f16_gguf.read_bytes()
    r = export_lmstudio(tiny_f16_gguf, tmp_path / "models", publisher="acme labs", name="sub-ai", copy=True)
    assert r.gguf == tmp_path / "models" / "acme-labs" / "sub-ai-GGUF" / "tiny-F16.gguf"
    assert not os.path.samefile(r.gguf, tiny_f16_gguf)
    proc = run_cli("export", "lmstudio", tiny_f16_gguf, "-o", tmp_path / "cli", "--publisher", "me")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cli" / "me" / "model-hf-GGUF" / "tiny-F16.gguf").is_file()


# ---------------------------------------------------------------------------------------------------
# release + verify-release
# ---------------------------------------------------------------------------------------------------


def ladder_json(tmp_path: Path, ref: Path, rung: Path) -> Path:
    """A ladder.json written through ladder.py's own result classes."""
    from gguf_factory.ladder import LadderResult, Rung

    def r(p: Path, qtype: str, ppl: float, kld: float | None, top1: float | None) -> Rung:
        return Rung(
            qtype=qtype,
            path=str(p),
            size_bytes=p.stat().st_size,
            bits_per_weight=8.0,
            reduction=0.0,
            tensor_types={},
            perplexity=ppl,
            kld_mean=kld,
            top1=top1,
        )

    res = LadderResult(
        reference=r(ref, "F32", 12.3456, None, None), rungs=[r(rung, "F16", 12.5, 0.0123, 0.975)]
    )
    path = tmp_path / "ladder.json"
    path.write_text(json.dumps(res.to_json()), encoding="utf-8")
    return path


@pytest.fixture
def release(tiny_f16_gguf, tiny_f32_gguf, tmp_path) -> Path:
    out = tmp_path / "release"
    ladder = ladder_json(tmp_path, tiny_f32_gguf, tiny_f16_gguf)
    r = export_release([tiny_f16_gguf, tiny_f32_gguf], out, ladder=ladder, system="Be kind.")
    assert r.folder == out
    return out


def test_release_contents(release, tiny_f16_gguf, tiny_f32_gguf):
    names = sorted(p.name for p in release.iterdir())
    assert names == ["Modelfile", "README.md", "SHA256SUMS", "tiny-F16.gguf", "tiny-F32.gguf"]
    assert not [p for p in release.parent.iterdir() if p.name.startswith(".release")]  # no temp left
    sums = (release / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 4
    for line in sums:
        digest, name = line.split("  ")
        assert hashlib.sha256((release / name).read_bytes()).hexdigest() == digest
    assert (release / "tiny-F32.gguf").read_bytes() == tiny_f32_gguf.read_bytes()
    mf = modelfile_of(release)
    assert mf["from"] == ["./tiny-F16.gguf"] and mf["system"] == ["Be kind."]
    card = (release / "README.md").read_text()
    assert "| `tiny-F16.gguf` | F16 |" in card and "| `tiny-F32.gguf` | F32 |" in card
    assert "12.500" in card and "0.0123" in card and "97.5%" in card and "12.346 (reference)" in card
    assert "`llama`" in card and "128 tokens" in card and "<|im_start|>" in card
    assert "ollama create model-hf -f Modelfile" in card and "llama-cli -m tiny-F16.gguf" in card
    assert ".lmstudio/models/gguf-factory/model-hf-GGUF/tiny-F16.gguf" in card
    report = verify_release(release)
    assert report.findings == [] and report.exit_code == 0
    assert sorted(report.checked) == sorted(line.split("  ")[1] for line in sums)


def test_release_refuses_non_empty_folder(tiny_f16_gguf, tmp_path):
    out = tmp_path / "rel"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        export_release([tiny_f16_gguf], out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    proc = run_cli("export", "release", tiny_f16_gguf, "-o", out)
    assert_one_line_error(proc, "not empty")


def test_verify_release_corrupted_byte(release):
    path = release / "tiny-F32.gguf"
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x01  # one bit in the last tensor's data
    path.write_bytes(bytes(data))
    report = verify_release(release)
    assert [(f.code, f.file) for f in report.findings] == [("checksum-mismatch", "tiny-F32.gguf")]
    proc = run_cli("verify-release", release)
    assert proc.returncode == 1, proc.stdout
    assert "tiny-F32.gguf" in proc.stdout and "checksum-mismatch" in proc.stdout


def test_verify_release_corrupted_header(release):
    path = release / "tiny-F16.gguf"
    data = bytearray(path.read_bytes())
    data[0:4] = b"GGUX"
    path.write_bytes(bytes(data))
    codes = {(f.code, f.file) for f in verify_release(release).findings}
    assert ("checksum-mismatch", "tiny-F16.gguf") in codes and ("gguf-invalid", "tiny-F16.gguf") in codes


def test_verify_release_missing_unlisted_and_dangling(release, tiny_f16_gguf):
    (release / "tiny-F32.gguf").unlink()
    shutil.copyfile(tiny_f16_gguf, release / "extra.gguf")
    report = verify_release(release)
    found = {(f.code, f.file) for f in report.findings}
    assert found == {
        ("missing-file", "tiny-F32.gguf"),
        ("unlisted-gguf", "extra.gguf"),
        ("card-missing-file", "README.md"),
    }
    proc = run_cli("verify-release", release)
    assert proc.returncode == 1 and "tiny-F32.gguf" in proc.stdout and "extra.gguf" in proc.stdout


def test_verify_release_modelfile_from(release):
    mf = release / "Modelfile"
    mf.write_text(mf.read_text().replace("FROM ./tiny-F16.gguf", "FROM ./gone.gguf"))
    found = {f.code for f in verify_release(release).findings}
    assert found == {"checksum-mismatch", "modelfile-from-missing"}


def test_cli_export_ollama_and_release(tiny_f16_gguf, style_gguf, tmp_path):
    proc = run_cli("export", "ollama", tiny_f16_gguf, "-o", tmp_path / "ol", "--system", "Hi there")
    assert proc.returncode == 0, proc.stderr
    assert "tools: not rendered (the chat template has no tool support)" in proc.stdout
    assert modelfile_of(tmp_path / "ol")["system"] == ["Hi there"]
    proc = run_cli("export", "ollama", style_gguf("gemma"), "-o", tmp_path / "g", "--system", "x")
    assert_one_line_error(proc, "system prompt", "System role not supported")
    proc = run_cli("export", "ollama", style_gguf("gemma"), "-o", tmp_path / "g2")
    assert proc.returncode == 0 and "warning:" in proc.stderr and "no system messages" in proc.stderr
    proc = run_cli("export", "release", tiny_f16_gguf, "-o", tmp_path / "rel")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("verify-release", tmp_path / "rel")
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stdout
    proc = run_cli("verify-release", tmp_path / "nope")
    assert_one_line_error(proc, "nope")
