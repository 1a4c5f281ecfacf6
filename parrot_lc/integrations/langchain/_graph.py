"""ParrotLLM's calls as calls of a graph of Semantic Variables: the prompts of a batch, and the calls of a deferred
run. Each call is a semantic function of the frontend whose template is its prompt (text, and the outputs of
other calls as inputs) followed by its output, so that it is submitted by the same code as any semantic function.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from parrot_lc.frontend import Placeholder, SemanticFunction, SemanticVariable, Template, Text
from parrot_lc.frontend.session import BaseSession

Prompt = Sequence[str | SemanticVariable]
"""A prompt's parts in order: text, and variables whose values stand there (other calls' outputs)."""


def add_calls(session: BaseSession, prompts: Sequence[Prompt], sampling: dict[str, Any]) -> list[SemanticVariable]:
    """Adds one call per prompt to the session (submitted now, or with the enclosing graph block) and returns their
    outputs. The text that the prompts all begin with (their longest common prefix, before any variable) is a
    piece of its own in every template: the server fills it once and forks each call from it."""
    leading = [prompt[0] if prompt and isinstance(prompt[0], str) else "" for prompt in prompts]
    shared = len(os.path.commonprefix(leading)) if len(prompts) > 1 else 0
    return [_add_call(session, prompt, shared, sampling) for prompt in prompts]


def _add_call(session: BaseSession, prompt: Prompt, shared: int, sampling: dict[str, Any]) -> SemanticVariable:
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
    function = SemanticFunction.from_template(Template.of([*pieces, Placeholder("output", "text")]), **sampling)
    return function(**inputs, text=session.variable("text"))
