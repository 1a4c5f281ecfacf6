"""Structured output: what a request asks its output to match, as the engine's Constraint (engine/constraints.py),
in one place for every route: OpenAI's `response_format` (`text`, `json_object`, `json_schema`) and the Parrot
API's sampling `constraint` (`regex`, `choice`, `json_schema`, `json_object`), which is also how the manager sends
a constraint to an engine in another process. A bad one is a `FieldError` naming the part of the body at fault."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from parrot_lc.engine.constraints import Constraint
from parrot_lc.engine.errors import InvalidRequestError

if TYPE_CHECKING:
    from parrot_lc.server.schemas import ResponseFormat, SamplingConstraint

CONSTRAINT_KINDS = ("regex", "choice", "json_schema", "json_object")


@dataclass
class FieldError(Exception):
    """A constraint that is not a grammar: `field` is its place under the field that holds it."""

    field: str
    message: str


def response_format_constraint(response_format: ResponseFormat | None) -> Constraint | None:
    """The constraint of OpenAI's `response_format` (None: plain text)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return Constraint("json_object")
    schema = response_format.json_schema
    if schema is None:
        raise FieldError("json_schema", "a json_schema response format needs `json_schema` (its name and schema)")
    return checked(Constraint("json_schema", json.dumps(schema.schema_)), "json_schema.schema")


def sampling_constraint(spec: SamplingConstraint | None) -> Constraint | None:
    """The constraint of the Parrot API's sampling settings: exactly one of their fields."""
    if spec is None:
        return None
    given = [kind for kind in CONSTRAINT_KINDS if getattr(spec, kind) not in (None, False)]
    if len(given) != 1:
        raise FieldError("", f"give exactly one of {', '.join(CONSTRAINT_KINDS)} (got {', '.join(given) or 'none'})")
    kind = given[0]
    if kind == "json_object":
        return Constraint("json_object")
    value = getattr(spec, kind)
    return checked(Constraint(kind, value if kind == "regex" else json.dumps(value)), kind)


def constraint_fields(constraint: Constraint) -> dict[str, Any]:
    """A constraint as the Parrot API's sampling `constraint` sends it (`sampling_constraint` reads it back)."""
    if constraint.kind == "json_object":
        return {"json_object": True}
    return {constraint.kind: constraint.spec if constraint.kind == "regex" else json.loads(constraint.spec)}


def checked(constraint: Constraint, field: str) -> Constraint:
    """The constraint, if it is a grammar (checked without a tokenizer); else a FieldError at `field`."""
    try:
        constraint.validate()
    except InvalidRequestError as exc:
        raise FieldError(field, str(exc).removeprefix("sampling.constraint ")) from None
    return constraint
