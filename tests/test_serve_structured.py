"""`serve` constrained output: ``response_format`` (json_object, json_schema) and the ``grammar`` extension
on the real server (uvicorn + llama.cpp) with the tiny GGUF; the official `openai` client's ``parse``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx2 as httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from gguf_factory.serve import ModelPool
from gguf_factory.serve.structured import BadField, check_schema, schema_grammar
from serve_helpers import assert_error, assert_idle_soon, client_of, pool_of, serving

MESSAGES = [{"role": "user", "content": "Tell me about your mood"}]


class Mood(BaseModel):
    name: str = Field(max_length=12)
    age: int
    mood: Literal["happy", "sad", "hungry"]
    likes: list[Literal["food", "jokes", "greetings"]] = Field(max_length=3)
    awake: bool
    note: str | None = Field(default=None, max_length=8)


@pytest.fixture(scope="module")
def pool(tiny_f16_gguf: Path) -> Iterator[ModelPool]:
    with pool_of({"tiny": tiny_f16_gguf}) as p:
        yield p


@pytest.fixture(scope="module")
def url(pool: ModelPool) -> Iterator[str]:
    with serving(pool, max_tokens_limit=256) as u:
        yield u


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return client_of(url)


def post(url: str, path: str = "/v1/chat/completions", **body: Any) -> httpx.Response:
    body.setdefault("model", "tiny")
    if path.endswith("chat/completions"):
        body.setdefault("messages", MESSAGES)
    return httpx.post(f"{url}{path}", json=body, timeout=60)


# --- json_schema ----------------------------------------------------------------------------------
def test_openai_parse_fifty_requests_all_valid(client: openai.OpenAI) -> None:
    """50 json_schema requests (greedy and sampled, several prompts) through the official client's
    ``parse``: every one parses into the pydantic model and validates against the schema it sent."""
    schema = Mood.model_json_schema()
    prompts = [
        "Tell me about your mood",
        "hello",
        "what do you like to eat?",
        "tell me a joke",
        "who are you",
    ]
    for i in range(50):
        kw: dict[str, Any] = {"temperature": 0} if i < 5 else {"temperature": 1.0, "seed": i}
        r = client.beta.chat.completions.parse(
            model="tiny",
            messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
            response_format=Mood,
            max_tokens=200,
            **kw,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice
        assert isinstance(choice.message.parsed, Mood), choice.message
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_schema_raw_http_and_stream_agree(url: str) -> None:
    schema = {
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no", "maybe"]},
            "score": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
            "when": {"type": "string", "format": "date"},
        },
        "required": ["answer", "score", "tags", "when"],
        "additionalProperties": False,
    }
    rf = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
    r = post(url, response_format=rf, max_tokens=120, temperature=0)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    text = choice["message"]["content"]
    value = json.loads(text)
    jsonschema.validate(value, schema)
    assert r.json()["usage"]["completion_tokens"] > 5

    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": MESSAGES,
            "response_format": rf,
            "max_tokens": 120,
            "stream": True,
        },
        timeout=60,
    ) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line and line != "data: [DONE]"]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert streamed == text
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_cut_says_length(url: str, client: openai.OpenAI) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "m", "schema": Mood.model_json_schema()}}
    r = post(url, response_format=rf, max_tokens=5, temperature=0)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    with pytest.raises(openai.LengthFinishReasonError):
        client.beta.chat.completions.parse(
            model="tiny", messages=MESSAGES, response_format=Mood, max_tokens=5
        )


def test_json_object(url: str, pool: ModelPool) -> None:
    """Any JSON object: sampled replies that end by themselves parse as objects; with every token holding
    a quote banned, the grammar leaves only the empty object."""
    stopped = 0
    for seed in range(8):
        r = post(url, response_format={"type": "json_object"}, max_tokens=48, temperature=1.0, seed=seed)
        choice = r.json()["choices"][0]
        text = choice["message"]["content"]
        assert text.lstrip().startswith("{"), text
        if choice["finish_reason"] == "stop":
            stopped += 1
            assert isinstance(json.loads(text), dict)
    with pool.use("tiny") as m:
        quotes = {str(t): -100 for t in range(m.llm.n_vocab()) if '"' in m.detokenize([t])}
    r = post(url, response_format={"type": "json_object"}, max_tokens=48, logit_bias=quotes)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and json.loads(choice["message"]["content"]) == {}


# --- the grammar extension --------------------------------------------------------------------------
def test_grammar_extension_chat_and_completions(url: str) -> None:
    g = 'root ::= ("yes" | "no") " " [0-9]{1,3}'
    for seed in range(4):
        r = post(url, grammar=g, max_tokens=20, temperature=1.0, seed=seed)
        text = r.json()["choices"][0]["message"]["content"]
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        word, number = text.split(" ")
        assert word in ("yes", "no") and number.isdigit() and 1 <= len(number) <= 3
    r = post(url, "/v1/completions", prompt="Hello", grammar="root ::= [a-c]{4}", max_tokens=10)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert len(text) == 4 and set(text) <= set("abc")
    r = post(url, "/v1/completions", prompt="Hello", response_format={"type": "json_object"}, max_tokens=8)
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("{")


# --- refusals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"response_format": {"type": "xml"}}, "response_format.type", "unknown type"),
        ({"response_format": "json"}, "response_format", "dictionary"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}},
            "response_format.json_schema.schema",
            "give the JSON schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "integer", "minimum": 0}},
                }
            },  # fmt: skip
            "response_format.json_schema.schema.minimum",
            "'minimum' is not supported",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "a": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}
                            },
                        }
                    },
                }
            },  # fmt: skip
            "response_format.json_schema.schema.properties.a.uniqueItems",
            "uniqueItems",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"$ref": "https://example.com/schema.json"}},
                }
            },  # fmt: skip
            "response_format.json_schema.schema.$ref",
            "only local references",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "schema": {"type": "array", "items": {"type": "integer"}, "maxItems": 10**9}
                    },
                }
            },  # fmt: skip
            "response_format.json_schema.schema.maxItems",
            "from 0 to 1000",
        ),
        ({"response_format": {"type": "json_object"}, "stop": ["}"]}, "stop", "cut a JSON reply"),
        ({"grammar": "root ::= foo"}, "grammar", "could not parse"),
        ({"grammar": 'root ::= root "a" | "a"'}, "grammar", "could not parse"),
        ({"grammar": 'root ::= "a"{1,100000}'}, "grammar", "limit of 1000"),
        ({"grammar": 'line ::= "a"'}, "grammar", "no root rule"),
        ({"grammar": ""}, "grammar", "non-empty"),
        (
            {"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}},
            "grammar",
            "not both",
        ),
    ],
)
def test_bad_constraints_are_400s(url: str, pool: ModelPool, body: dict, param: str, says: str) -> None:
    r = post(url, **body, max_tokens=8)
    err = assert_error(r, 400, says=says)
    assert err["param"] == param, err
    assert_idle_soon(pool)


def test_a_refused_grammar_leaves_the_model_working(url: str) -> None:
    assert post(url, grammar="root ::= (").status_code == 400
    r = post(url, grammar='root ::= "ok"', max_tokens=4)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"
    assert post(url, max_tokens=4).status_code == 200


# --- the schema check -------------------------------------------------------------------------------
class Address(BaseModel):
    city: str = Field(max_length=10)
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str
    home: Address
    past: list[Address] = Field(max_length=2)
    kind: Literal["a", "b"] | None = None


def test_check_schema_takes_pydantic_schemas() -> None:
    for model in (Mood, Person):
        schema = model.model_json_schema()
        normalized = check_schema(schema)
        assert "title" not in normalized and "$defs" in normalized or model is Mood
        assert "root ::=" in schema_grammar(schema)
    assert check_schema({}) == check_schema(True) == {"type": ["object", "array", "string", "number",
                                                                "boolean", "null"]}  # fmt: skip
    assert check_schema({"type": "string", "format": "email"}) == {"type": "string"}  # an annotation
    assert check_schema({"type": "string", "format": "date"}) == {"type": "string", "format": "date"}
    for bad, where in [
        ({"type": "object", "required": ["x"]}, "schema.required"),
        ({"type": "object", "properties": {}, "required": ["x"]}, "schema.required"),
        ({"type": ["string", "null"], "maxLength": 3}, "schema.maxLength"),
        ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "schema.maxLength"),
        ({"type": "string", "pattern": "a+"}, "schema.pattern"),
        ({"anyOf": [{"type": "string"}], "oneOf": [{"type": "null"}]}, "schema"),
        ({"not": {"type": "string"}}, "schema"),
        ({"type": "frog"}, "schema.type"),
        ({"properties": {"a": False}}, "schema.properties.a"),
        ({"$ref": "#/$defs/missing"}, "schema.$ref"),
        ({"allOf": [{"type": "string"}]}, "schema.allOf.0"),
        ({"type": "string", "pattern": r"^\d{5}$"}, "schema.pattern"),  # the converter writes "\d" as is
        ({"type": "string", "pattern": "^[ -~]+$"}, "schema.pattern"),  # the range holds '"' and '\'
        ({"type": "string", "pattern": "^[^a]$"}, "schema.pattern"),
    ]:
        with pytest.raises(BadField) as e:
            check_schema(bad)
        assert e.value.param.startswith(where), (bad, e.value.param)
    # a JSON string holds no raw control character, quote or backslash (llama.cpp's JSON char rule)
    assert 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |' in schema_grammar({"type": "string"})
    assert 'dot ::= [^"\\\\\\x7F\\x00-\\x1F]' in schema_grammar({"type": "string", "pattern": "^a.b$"})
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    with pytest.raises(BadField, match="deeper than"):
        check_schema(deep)


def test_grammar_matches_every_pydantic_reply(url: str) -> None:
    """A schema with $defs, a pattern and an optional nested enum: the reply validates."""
    schema = Person.model_json_schema()
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}
    for seed in range(5):
        r = post(url, response_format=rf, max_tokens=256, temperature=0.8, seed=seed)
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
            Person.model_validate_json(choice["message"]["content"])
        else:  # unbounded name strings may run past max_tokens with a tiny model: cut, and said so
            assert choice["finish_reason"] == "length"
