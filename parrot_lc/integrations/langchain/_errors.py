"""The frontend's errors as LangChain's standard model errors: what `ChatParrot`, `ParrotLLM` and a deferred run
raise is an instance of both the frontend's class (`InvalidRequestError`...) and langchain-core's of the same
condition (`ContextOverflowError`, `ModelRateLimitError`...), as the provider integrations' errors are both the
provider SDK's and LangChain's: code written against ChatOpenAI that catches `ContextOverflowError` catches a
prompt too long for a Parrot server, and code that catches `parrot_lc.frontend.ParrotError` still does.

langchain-core before its `ModelError` classes (1.x releases before them): the frontend's errors pass unchanged.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from langchain_core import exceptions

from parrot_lc.frontend import errors as frontend_errors
from parrot_lc.frontend.errors import (
    CONTEXT_LENGTH_EXCEEDED,
    AuthError,
    GraphError,
    InvalidRequestError,
    NotFoundError,
    ParrotConnectionError,
    ParrotError,
    RateLimitError,
    RequestTimeoutError,
    ServerFailure,
    VariableTimeoutError,
)

F = TypeVar("F", bound=Callable[..., Any])

# The frontend's classes and the LangChain class of their condition, first match first (a context overflow is an
# InvalidRequestError or, for a deferred call's fetch, a CallFailedError: told by its code).
_CONDITIONS: list[tuple[Callable[[ParrotError], bool], str]] = [
    (lambda e: e.code == CONTEXT_LENGTH_EXCEEDED, "ContextOverflowError"),
    (lambda e: isinstance(e, AuthError) and e.status == 403, "ModelPermissionDeniedError"),
    (lambda e: isinstance(e, AuthError), "ModelAuthenticationError"),
    (lambda e: isinstance(e, NotFoundError) and e.code == "model_not_found", "ModelNotFoundError"),
    (lambda e: isinstance(e, (InvalidRequestError, GraphError)), "ModelInvalidRequestError"),
    (lambda e: isinstance(e, RateLimitError), "ModelRateLimitError"),
    (lambda e: isinstance(e, ServerFailure), "ModelAPIError"),
    (lambda e: isinstance(e, ParrotConnectionError), "ModelConnectionError"),
    (lambda e: isinstance(e, (RequestTimeoutError, VariableTimeoutError)), "ModelTimeoutError"),
]


@functools.cache
def _both(parrot_class: type[ParrotError], langchain_class: type[Exception]) -> type[ParrotError]:
    """The class of both (`InvalidRequestError_ContextOverflowError`), a name of this module (`__getattr__`), so
    that an error pickled in one process loads in another."""
    return type(f"{parrot_class.__name__}_{langchain_class.__name__}", (parrot_class, langchain_class),
                {"__module__": __name__,
                 "__doc__": f"{parrot_class.__doc__}\n\nAlso langchain-core's {langchain_class.__name__}."})


def __getattr__(name: str) -> type[ParrotError]:
    """`_both`'s classes by name, made on first use in this process too (pickle looks them up here)."""
    parrot_name, _, langchain_name = name.partition("_")
    parrot_class = getattr(frontend_errors, parrot_name, None)
    langchain_class = getattr(exceptions, langchain_name, None)
    if (isinstance(parrot_class, type) and issubclass(parrot_class, ParrotError) and isinstance(langchain_class, type)
            and issubclass(langchain_class, exceptions.LangChainException)):
        return _both(parrot_class, langchain_class)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def as_langchain_error(error: ParrotError) -> ParrotError:
    """`error`, its class now also LangChain's class of its condition (the same object: message, fields and
    traceback kept); unchanged where LangChain has no class for it."""
    for matches, name in _CONDITIONS:
        langchain_class = getattr(exceptions, name, None)
        if langchain_class is not None and matches(error):
            if not isinstance(error, langchain_class):
                error.__class__ = _both(type(error), langchain_class)
            break
    return error


def raises_langchain_errors(method: F) -> F:
    """`method` (a function, coroutine function, generator or async generator) with the frontend errors it raises
    turned into LangChain's too (as_langchain_error)."""
    if inspect.isasyncgenfunction(method):
        async def agen(*args: Any, **kwargs: Any) -> Any:
            try:
                async for item in method(*args, **kwargs):
                    yield item
            except ParrotError as error:
                raise as_langchain_error(error)
        wrapper: Callable[..., Any] = agen
    elif inspect.isgeneratorfunction(method):
        def gen(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from method(*args, **kwargs)
            except ParrotError as error:
                raise as_langchain_error(error)
        wrapper = gen
    elif inspect.iscoroutinefunction(method):
        async def coroutine(*args: Any, **kwargs: Any) -> Any:
            try:
                return await method(*args, **kwargs)
            except ParrotError as error:
                raise as_langchain_error(error)
        wrapper = coroutine
    else:
        def function(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except ParrotError as error:
                raise as_langchain_error(error)
        wrapper = function
    return functools.wraps(method)(wrapper)  # type: ignore[return-value]
