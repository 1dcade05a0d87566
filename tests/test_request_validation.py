"""Request validation names the real problem: strict numbers and booleans, unions explained.

The app runs without an engine (its loader never finishes): a body that passes validation gets
503 `model_loading`, one that fails gets 400 naming the field, so every case shows which it was.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fake_engine import FakeEngine
from fastapi.testclient import TestClient

from common.settings import SidecarSettings
from sidecar.server.app import create_app
from sidecar.server.protocol import ChatCompletionRequest

MODEL = "m"
BASE: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "hi"}],
    "stream_options": {"include_usage": True},
    "tools": [{"type": "function", "function": {"name": "f"}}],
}
# Wrong values per JSON schema type; each must be refused, none taken for a nearby valid value.
WRONG: dict[str, list[Any]] = {
    "integer": [True, 1.5, 2.0, "3", "NaN"],
    "number": [True, "1", "NaN", "Infinity"],
    "boolean": [1, 0, "true", "yes", "false"],
}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    done = threading.Event()

    def load_when_done(_: SidecarSettings) -> FakeEngine:
        done.wait()
        return FakeEngine(model_id=MODEL)

    app = create_app(SidecarSettings(model_path="/models/none", model_id=MODEL), load_engine=load_when_done)
    with TestClient(app) as test_client:
        yield test_client
        done.set()  # the shutdown waits for the load


def post(client: TestClient, body: dict[str, Any] | bytes) -> tuple[int, dict[str, Any]]:
    if isinstance(body, bytes):
        response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        response = client.post("/v1/chat/completions", json=body)
    return response.status_code, response.json()["error"]


def scalar_fields(schema: dict[str, Any], node: dict[str, Any], base: Any, path: tuple[Any, ...] = ()) -> Iterator:
    """(path, JSON type) of every integer, number and boolean field reachable in `base`."""
    node = _resolve(schema, node)
    for option in node.get("anyOf", ()):
        yield from scalar_fields(schema, option, base, path)
    if node.get("type") in WRONG:
        yield path, node["type"]
    elif node.get("type") == "object" and isinstance(base, dict):
        for name, child in node.get("properties", {}).items():
            yield from scalar_fields(schema, child, base.get(name, {}), (*path, name))
    elif node.get("type") == "array" and isinstance(base, list) and base and "items" in node:
        yield from scalar_fields(schema, node["items"], base[0], (*path, 0))


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    return schema["$defs"][ref.rsplit("/", 1)[-1]] if ref else node


def with_value(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(BASE))
    target = body
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return body


SCHEMA = ChatCompletionRequest.model_json_schema()
FIELDS = sorted({(path, kind) for path, kind in scalar_fields(SCHEMA, SCHEMA, BASE) if "messages" not in path})


def test_the_sweep_covers_every_numeric_and_boolean_field() -> None:
    paths = {".".join(map(str, path)) for path, _ in FIELDS}
    assert {"max_tokens", "max_completion_tokens", "n", "seed", "temperature", "top_p", "stream"} <= paths
    assert {"stream_options.include_usage", "tools.0.function.strict"} <= paths


def test_the_base_body_is_valid(client: TestClient) -> None:
    status, error = post(client, BASE)
    assert (status, error["code"]) == (503, "model_loading")


@pytest.mark.parametrize(("path", "kind"), FIELDS, ids=[".".join(map(str, p)) for p, _ in FIELDS])
def test_numbers_and_booleans_are_strict(client: TestClient, path: tuple[Any, ...], kind: str) -> None:
    for value in WRONG[kind]:
        status, error = post(client, with_value(path, value))
        assert status == 400, f"{path}={value!r} was accepted"
        assert error["param"] == ".".join(map(str, path)), error


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_non_finite_json_numbers_are_refused(client: TestClient, field: str, literal: bytes) -> None:
    # Python's JSON parser accepts these literals, so they reach the model as floats.
    raw = json.dumps(BASE).encode()[:-1] + b', "' + field.encode() + b'": ' + literal + b"}"
    status, error = post(client, raw)
    assert status == 400 and error["param"] == field
    assert "finite" in error["message"]


@pytest.mark.parametrize(
    ("change", "param", "says"),
    [
        ({"stop": [""]}, "stop", "item 0 is empty"),
        ({"stop": ["ok", ""]}, "stop", "item 1 is empty"),
        ({"stop": ""}, "stop", "the string is empty"),
        ({"stop": ["ok", 3]}, "stop", "item 1 is not a string"),
        ({"stop": {"a": 1}}, "stop", "a string or a list of strings"),
        ({"temperature": "NaN"}, "temperature", "valid number"),
        ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"max_tokens": True}, "max_tokens", "valid integer"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", "valid boolean"),
        ({"tool_choice": "sometimes"}, "tool_choice", "none, auto, required"),
        ({"tool_choice": {"type": "function"}}, "tool_choice", "function: {name}"),
        ({"tool_choice": {"type": "other", "function": {"name": "f"}}}, "tool_choice", "function: {name}"),
    ],
)
def test_errors_name_the_real_problem(client: TestClient, change: dict[str, Any], param: str, says: str) -> None:
    status, error = post(client, {**BASE, **change})
    assert status == 400
    assert error["param"] == param and says in error["message"], error
    assert ".str" not in error["message"] and "literal[" not in error["message"]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ([{"type": "image_url", "image_url": {"url": "http://x/cat.png"}}], "part 0 has type 'image_url'"),
        ([{"type": "text", "text": "a"}, {"type": "input_audio"}], "part 1 has type 'input_audio'"),
        ([{"type": "text"}], "part 0 has no 'text' string"),
        (["plain string in a list"], "part 0 is not a {type: 'text', text} object"),
        (7, "a string or a list of {type: 'text', text} parts"),
    ],
)
def test_content_errors_name_the_part(client: TestClient, content: Any, says: str) -> None:
    status, error = post(client, {**BASE, "messages": [{"role": "user", "content": content}]})
    assert status == 400 and says in error["message"], error
    assert "content.str" not in error["message"]
