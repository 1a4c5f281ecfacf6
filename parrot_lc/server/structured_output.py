"""Structured output: what a request asks its output to match, as the engine's Constraint (engine/constraints.py),
in one place for every route: OpenAI's `response_format` (`text`, `json_object`, `json_schema`), vLLM's guided
decoding fields of its OpenAI-compatible routes (`guided_json`, `guided_regex`, `guided_choice`) and the Parrot
API's sampling `constraint` (`regex`, `choice`, `json_schema`, `json_object`), which is also how the manager sends
a constraint to an engine in another process. A bad one is a `FieldError` naming the part of the body at fault."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from parrot_lc.engine.constraints import Constraint
from parrot_lc.engine.errors import InvalidRequestError

if TYPE_CHECKING:
    from parrot_lc.server.schemas import ResponseFormat, SamplingConstraint

CONSTRAINT_KINDS = ("regex", "choice", "json_schema", "json_object")
# vLLM's guided decoding fields (extra parameters of its OpenAI-compatible server), by the kind of constraint each is.
GUIDED_KINDS = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice"}


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
    return kind_constraint("json_schema", schema.schema_, "json_schema.schema")


def sampling_constraint(spec: SamplingConstraint | None) -> Constraint | None:
    """The constraint of the Parrot API's sampling settings: exactly one of their fields."""
    if spec is None:
        return None
    given = [kind for kind in CONSTRAINT_KINDS if getattr(spec, kind) not in (None, False)]
    if len(given) != 1:
        raise FieldError("", f"give exactly one of {', '.join(CONSTRAINT_KINDS)} (got {', '.join(given) or 'none'})")
    return kind_constraint(given[0], getattr(spec, given[0]), given[0])


def guided_constraint(field: str, value: Any) -> Constraint | None:
    """The constraint of one of vLLM's guided decoding fields (None: not given); `guided_json` is a schema or its
    JSON text."""
    if value is None:
        return None
    if field == "guided_json" and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise FieldError("", f"not JSON text: {exc}") from None
        if not isinstance(value, dict):
            raise FieldError("", f"a JSON schema is an object, or its JSON text (got {type(value).__name__})")
    return kind_constraint(GUIDED_KINDS[field], value, "")


def openai_constraint(response_format: ResponseFormat | None, guided: dict[str, Any]) -> Constraint | None:
    """The one constraint of an OpenAI-compatible request: its `response_format`'s or one of vLLM's guided fields'
    (`guided`: their values by name). A bad one, or a second one, is a FieldError naming it in full."""
    constraints = {"response_format": named(response_format_constraint, "response_format", response_format),
                   **{field: named(guided_constraint, field, field, value) for field, value in guided.items()}}
    given = [field for field, constraint in constraints.items() if constraint is not None]
    if len(given) > 1:
        raise FieldError(given[1], f"{given[0]} and {given[1]} both constrain the output: send one")
    return constraints[given[0]] if given else None


def named(make: Callable[..., Constraint | None], field: str, *args: Any) -> Constraint | None:
    """make(*args), whose FieldError is named in full: under `field`."""
    try:
        return make(*args)
    except FieldError as exc:
        raise FieldError(".".join(part for part in (field, exc.field) if part), exc.message) from None


def kind_constraint(kind: str, value: Any, field: str) -> Constraint:
    """The checked constraint of a kind of CONSTRAINT_KINDS, from its value (a regex, a list of choices, a schema;
    any for json_object); a FieldError at `field` if it is no grammar."""
    if kind == "json_object":
        return Constraint("json_object")
    return checked(Constraint(kind, value if kind == "regex" else json.dumps(value)), field)


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
