"""Semantic functions: prompt templates whose inputs and outputs are Semantic Variables.

Declared from a template string::

    summarize = SemanticFunction.from_template(
        "Summarize: {{input:report}}\\nSummary: {{output:summary}}", max_tokens=64, temperature=0.0)

or with a decorator, the docstring being the template and the parameters naming its placeholders::

    @semantic_function(temperature=0.0)
    def review(code: str, verdict: Output(max_tokens=8), fix: Output(max_tokens=200)):
        \"\"\"Review this code: {{input:code}}
        Verdict: {{output:verdict}}
        Fixed code: {{output:fix}}\"\"\"

Calling one with variables or plain strings submits one call and returns its output variable (a tuple of
them, in template order, when there are several). Sampling settings given as keywords apply to every output;
a keyword naming an output with a dict (`fix={"max_tokens": 200}`) or an `Output(...)` annotation sets that
output's own settings; settings not given take the server's defaults (those of the engine's SamplingParams).
A `constraint` setting holds an output to a grammar: `verdict: Output(constraint={"choice": ["yes", "no"]})`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from parrot_lc.frontend.session import BaseSession, GraphCall, current_session
from parrot_lc.frontend.template import Template, TemplateError, parse_template
from parrot_lc.frontend.variable import SemanticVariable

# `constraint`: what the output must match, exactly one of {"regex": pattern}, {"choice": [strings]},
# {"json_schema": schema}, {"json_object": True} (the server's SamplingConstraint).
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "constraint")


def _sampling(settings: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Checks the names of sampling settings (the server checks their values and names the bad field)."""
    unknown = sorted(set(settings) - set(SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"{where}: unknown sampling setting {unknown[0]!r} (known: {', '.join(SAMPLING_FIELDS)})")
    result = dict(settings)
    if isinstance(result.get("stop"), str):
        result["stop"] = [result["stop"]]
    return result


class Output:
    """Annotation of a decorated function's parameter that is an output: `summary: Output`, or with the
    output's own sampling settings, `summary: Output(max_tokens=64)`."""

    def __init__(self, **sampling: Any) -> None:
        self.sampling = _sampling(sampling, "Output()")

    def __repr__(self) -> str:
        return f"Output({', '.join(f'{k}={v!r}' for k, v in self.sampling.items())})"


class SemanticFunction:
    """A template of constant text, input and output variables, with sampling settings per output.
    Build one with `from_template()` or `@semantic_function`."""

    def __init__(self, template: Template, signature: inspect.Signature, sampling: dict[str, dict[str, Any]],
                 name: str = "semantic_function") -> None:
        self.template = template
        self.sampling = sampling
        self.__signature__ = signature
        self.__name__ = name

    @classmethod
    def from_template(cls, template: str | Template, /, **sampling: Any) -> SemanticFunction:
        """A function whose parameters are the template's inputs (positional or keyword, in order of first
        appearance), then its outputs (keyword only: pass a variable to produce into an existing one). The
        template is a string to parse, or a Template built of pieces (`Template.of`)."""
        parsed = template if isinstance(template, Template) else parse_template(template)
        parameters = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in parsed.inputs]
        parameters += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in parsed.outputs]
        return cls(parsed, inspect.Signature(parameters), _per_output(sampling, parsed.outputs, {}))

    @classmethod
    def from_callable(cls, func: Callable[..., Any], /, **sampling: Any) -> SemanticFunction:
        """A function from a Python function: its docstring (dedented) is the template, its parameters name
        every placeholder. Template error positions count in the dedented docstring."""
        name = getattr(func, "__qualname__", repr(func))
        if not func.__doc__:
            raise TemplateError(f"{name} has no docstring: a semantic function's docstring is its template", 0)
        signature = _signature(func)
        for parameter in signature.parameters.values():
            if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                raise TypeError(f"{name}: *{parameter.name} cannot name a placeholder; list each parameter")
        parsed = parse_template(inspect.cleandoc(func.__doc__), list(signature.parameters))
        annotated = {n: p.annotation for n, p in signature.parameters.items()
                     if p.annotation is Output or isinstance(p.annotation, Output)}
        for placeholder in parsed.placeholders:
            if placeholder.kind == "input" and placeholder.name in annotated:
                raise TemplateError(f"{placeholder.name!r} is annotated as an output but the template reads it "
                                    f"as an input", placeholder.position)
        own = {n: a.sampling for n, a in annotated.items() if isinstance(a, Output)}
        function = cls(parsed, signature, _per_output(sampling, parsed.outputs, own), name)
        functools.update_wrapper(function, func)
        return function

    def __call__(self, *args: Any, **kwargs: Any) -> SemanticVariable | tuple[SemanticVariable, ...]:
        """Submits one call (at once, or when the enclosing `graph()` block ends) and returns its outputs.
        Inputs are SemanticVariables or strings (which become variables set by this client)."""
        bound = self.__signature__.bind_partial(*args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        missing = [n for n in self.template.inputs if values.get(n) is None]
        if missing:
            raise TypeError(f"{self.__name__}() is missing input {missing[0]!r}")
        session = self._session(values.values())
        bindings: dict[str, SemanticVariable] = {}
        for name in self.template.inputs:
            value = values[name]
            if isinstance(value, str):
                value = session.variable(name, value)
            elif not isinstance(value, SemanticVariable):
                raise TypeError(f"input {name!r} is a SemanticVariable or a str, not {type(value).__name__}")
            bindings[name] = value
        for name in self.template.outputs:
            given = values.get(name)
            if given is not None and not isinstance(given, SemanticVariable):
                raise TypeError(f"output {name!r} takes a SemanticVariable to produce into, "
                                f"not {type(given).__name__}")
            bindings[name] = given if given is not None else session.variable(name)
        call = GraphCall(self.template, bindings, self.sampling)
        session._add_call(call)
        outputs = tuple(call.outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def _session(self, values: Any) -> BaseSession:
        """The session of the variables passed, else the current one (`with session:`)."""
        sessions = list({id(v.session): v.session for v in values if isinstance(v, SemanticVariable)}.values())
        if len(sessions) > 1:
            raise ValueError(f"{self.__name__}() got variables of different sessions")
        if sessions:
            return sessions[0]
        session = current_session()
        if session is None:
            raise RuntimeError(f"{self.__name__}() got no SemanticVariable and runs outside any session: call it "
                               f"inside `with client.session():` (or `async with`)")
        return session

    def __repr__(self) -> str:
        return f"<SemanticFunction {self.__name__}{self.__signature__}>"


def semantic_function(func: Callable[..., Any] | None = None, /, **sampling: Any) -> Any:
    """Decorator making a SemanticFunction of a Python function (see `SemanticFunction.from_callable`):
    `@semantic_function` or `@semantic_function(max_tokens=64, temperature=0.0, summary={"stop": ["\\n"]})`."""
    if func is not None:
        return SemanticFunction.from_callable(func, **sampling)
    return lambda f: SemanticFunction.from_callable(f, **sampling)


def _per_output(settings: Mapping[str, Any], outputs: tuple[str, ...],
                own: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The sampling settings of each output: the shared keywords, then its annotation, then its own keyword."""
    shared = {k: v for k, v in settings.items() if not isinstance(v, Mapping)}
    specific = {k: v for k, v in settings.items() if isinstance(v, Mapping)}
    for name in specific:
        if name not in outputs:
            raise TypeError(f"sampling settings for {name!r}, which is not an output (outputs: {', '.join(outputs)})")
    shared = _sampling(shared, "sampling settings")
    return {name: {**shared, **own.get(name, {}), **_sampling(specific.get(name, {}), f"output {name!r}")}
            for name in outputs}


def _signature(func: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(func, eval_str=True)
    except NameError:
        # String annotations naming what is not importable at run time: outputs can still be named by the
        # template, only `Output(...)` sampling in annotations is lost.
        return inspect.signature(func)
