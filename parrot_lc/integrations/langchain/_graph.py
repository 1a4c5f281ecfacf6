"""LangChain's LLM calls as calls of a graph of Semantic Variables: the prompts of a batch, and the calls of a
deferred run. Each call is a semantic function of the frontend whose template is its prompt (text, and the outputs
of other calls as inputs) followed by its output, so that it is submitted by the same code as any semantic function.

Calls that begin with the same text share it on the server when it is a piece of its own in each template (the
server fills it once and forks the calls from it): each call's leading text is cut where the most prefill is saved
(`shared_prefix_lengths`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from parrot_lc.frontend import (
    CallFailedError,
    InvalidRequestError,
    Placeholder,
    SemanticFunction,
    SemanticVariable,
    Template,
    Text,
)
from parrot_lc.frontend.errors import CONTEXT_LENGTH_EXCEEDED
from parrot_lc.frontend.session import BaseSession

Prompt = Sequence[str | SemanticVariable]
"""A prompt's parts in order: text, and variables whose values stand there (other calls' outputs)."""


def add_calls(session: BaseSession, prompts: Sequence[Prompt],
              sampling: dict[str, Any] | Sequence[dict[str, Any]]) -> list[SemanticVariable]:
    """Adds one call per prompt to the session (submitted now, or with the enclosing graph block) and returns their
    outputs; `sampling`: the calls', or each call's."""
    shared = shared_prefix_lengths([leading_text(prompt) for prompt in prompts])
    samplings = [sampling] * len(prompts) if isinstance(sampling, dict) else sampling
    return [add_call(session, prompt, length, each) for prompt, length, each in zip(prompts, shared, samplings)]


def add_call(session: BaseSession, prompt: Prompt, shared: int, sampling: dict[str, Any],
             output: SemanticVariable | None = None) -> SemanticVariable:
    """Adds the call of one prompt whose first `shared` characters are a piece of their own; its output goes to
    `output` (a new variable if None), which it returns."""
    pieces: list[Text | Placeholder] = []
    inputs: dict[str, SemanticVariable] = {}
    names: dict[int, str] = {}  # a variable read twice is one input
    for part in prompt:
        if isinstance(part, str):
            pieces.append(Text(part))
        else:
            name = names.setdefault(id(part), f"input{len(names)}")
            inputs[name] = part
            pieces.append(Placeholder("input", name))
    if shared and isinstance(pieces[0], Text):
        first = pieces[0].text
        pieces[:1] = [Text(first[:shared]), Text(first[shared:])]
    # The output's own settings: a shared keyword whose value is a dict (a `constraint`) would name an output.
    function = SemanticFunction.from_template(Template.of([*pieces, Placeholder("output", "text")]), text=sampling)
    return function(**inputs, text=output if output is not None else session.variable("text"))


@contextmanager
def refused_as_requests(field: str) -> Iterator[None]:
    """Raises the failure of a graph call whose values the block fetches as the call's eager request is refused,
    where it would be: a prompt longer than the model's context, which a graph call's fetch finds once it ran (its
    prompt's tokens are counted then: it may hold other calls' outputs), is InvalidRequestError naming `field` (the
    request's `prompt` or `messages`), with the server's message and code."""
    try:
        yield
    except CallFailedError as exc:
        if exc.code != CONTEXT_LENGTH_EXCEEDED:
            raise
        raise InvalidRequestError(exc.message, status=400, type="BadRequestError", field=field,
                                  code=exc.code) from exc


def leading_text(prompt: Prompt) -> str:
    """The text a prompt begins with, before its first variable."""
    return prompt[0] if prompt and isinstance(prompt[0], str) else ""


def shared_prefix_lengths(heads: Sequence[str], others: Sequence[str] = ()) -> list[int]:
    """For each of `heads` (the leading texts of calls), where to cut it: the length L of a prefix it shares with
    other calls (of `heads`, or `others`: calls sent earlier) that saves the most, L times the calls that share it
    (0: none shares). Map calls of one instruction are cut at the end of the instruction, not where two of their
    parts happen to begin alike too, nor where an unrelated call happens to begin alike."""
    texts = [*heads, *others]
    order = sorted(range(len(texts)), key=texts.__getitem__)
    rank = {index: position for position, index in enumerate(order)}
    adjacent = [len(os.path.commonprefix([texts[a], texts[b]])) for a, b in zip(order, order[1:])]
    lengths = []
    for index in range(len(heads)):
        # The prefixes it shares with the others, longest first: in sorted order they shrink with the distance.
        shared = sorted((*_running_min(reversed(adjacent[:rank[index]])), *_running_min(adjacent[rank[index]:])),
                        reverse=True)
        best = max(((length * count, length) for count, length in enumerate(shared, 1)), default=(0, 0))
        lengths.append(best[1])
    return lengths


def _running_min(values: Sequence[int] | Any) -> list[int]:
    """The running minimum of `values` up to its first 0 (the LCPs of a text with its neighbours, one way)."""
    result: list[int] = []
    smallest = None
    for value in values:
        smallest = value if smallest is None else min(smallest, value)
        if smallest == 0:
            break
        result.append(smallest)
    return result
