"""The /v1/explain body model: typed parsing naming the field, and the published JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from atman_server.errors import ServiceError
from atman_server.http_bodies import explain_request_schema, parse_explain_body

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "docs" / "schema" / "explain_request.json"
BASE = {"prompt": "Ben likes to eat burgers and", "target": " fries"}

BAD = {
    # name: (options or body override, field)
    "factor true": ({"options": {"factor": True}}, "factor"),
    "factor string": ({"options": {"factor": "0.5"}}, "factor"),
    "factor above range": ({"options": {"factor": 1000.0}}, "factor"),
    "factor below range": ({"options": {"factor": 1e-9}}, "factor"),
    "kappa true": ({"options": {"kappa": True}}, "kappa"),
    "kappa string": ({"options": {"kappa": "0.6"}}, "kappa"),
    "spans not a list": ({"options": {"spans": 5}}, "spans"),
    "spans of objects": ({"options": {"spans": [{"start": 0, "length": 3}]}}, "spans"),
    "span of three": ({"options": {"spans": [[0, 1, 2]]}}, "spans"),
    "span with a bool": ({"options": {"spans": [[0, True]]}}, "spans"),
    "negative span start": ({"options": {"spans": [[-1, 3]]}}, "spans"),
    "normalize 1": ({"options": {"normalize": 1}}, "normalize"),
    "options a list": ({"options": []}, "options"),
    "unknown option": ({"options": {"factr": 0.1}}, "factr"),
    "unknown field": ({"temperature": 1}, "temperature"),
    "prompt a number": ({"prompt": 5}, "prompt"),
    "model a number": ({"model": 5}, "model"),
    "mode unknown": ({"options": {"mode": "additive"}}, "mode"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_body_names_the_field_and_the_schema_agrees(case):
    override, field = BAD[case]
    body = {**BASE, **override}
    with pytest.raises(ServiceError) as err:
        parse_explain_body(json.dumps(body).encode())
    assert err.value.field == field and err.value.message.startswith(f"{field}: ")
    with pytest.raises(jsonschema.ValidationError):  # the published schema refuses it too
        jsonschema.validate(body, explain_request_schema())


def test_good_bodies_parse_and_validate_against_the_schema():
    bodies = [BASE, {**BASE, "model": None, "options": {"factor": 1, "kappa": 1, "spans": [[0, 3]], "mode": "multiplicative",
                                                          "normalize": True}}]
    for body in bodies:
        jsonschema.validate(body, explain_request_schema())
        parsed = parse_explain_body(json.dumps(body).encode())
        assert (parsed.prompt, parsed.target, parsed.messages) == (BASE["prompt"], BASE["target"], None)
        options = parsed.options
    assert options.factor == 1.0 and isinstance(options.factor, float) and options.spans == ((0, 3),)


@pytest.mark.parametrize("raw", [b"[" * 100_000, b"{\"prompt\": ", b"\xff\xfe", b"[]", b"NaN"])
def test_bodies_that_are_no_object_are_refused_as_body(raw):
    with pytest.raises(ServiceError) as err:
        parse_explain_body(raw)
    assert err.value.field == "body"


def test_the_published_schema_is_the_generated_one():
    # Regenerate with: python -c "from atman_server.http_bodies import write_schema; write_schema()"
    assert json.loads(SCHEMA_FILE.read_text()) == explain_request_schema()
