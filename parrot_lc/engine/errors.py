"""Typed errors of the engine: each names what was wrong with one request, so callers can answer that
request alone while the engine keeps serving the others; and how torch's failed allocations read."""

import re


class EngineError(Exception):
    """Base class of every error the engine raises for a request."""


class ContextNotFoundError(EngineError, KeyError):
    """A context id (or parent context id) that the engine does not hold."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "context not found"


class ContextBusyError(EngineError):
    """A fill or generate aimed at a context that another request is still writing into."""


class InvalidRequestError(EngineError, ValueError):
    """Bad arguments: empty fills, token ids outside the vocabulary, invalid sampling values; `field` names the
    sampling field at fault, where one is."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class OutOfMemoryError(EngineError):
    """No KV blocks for a request: none free now (others hold them), or too few in the whole cache."""


class ContextTooLargeError(OutOfMemoryError):
    """A context longer than the whole KV cache holds: it can never fit, so waiting for memory is no use."""


class RequestCancelledError(EngineError):
    """The request was cancelled before it finished."""


class ModelLoadError(EngineError, ValueError):
    """A model path or file that cannot be loaded (missing, corrupt, unsupported architecture or tensor type), or
    whose weights do not fit in the device's memory."""


class EngineStepError(EngineError):
    """A step of the engine raised (a bug): the requests it held were stopped, the engine serves on."""


class EngineUnavailableError(EngineError):
    """The engine cannot be reached (its process died or stopped answering): work moves elsewhere."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation that failed: torch's CPU allocator raises a plain RuntimeError that says so,
    CUDA's a torch.OutOfMemoryError."""
    text = str(exc)
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def allocator_reason(exc: BaseException) -> str:
    """The allocator's message, short: its first two sentences, without the C++ check that failed
    (`[enforce fail at alloc_cpu.cpp:127] err == 0.`). CUDA's goes on with advice on fragmentation."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    text = re.sub(r"^\[enforce fail at [^\]]*\] *[^.]*\. *", "", lines[0])
    return ". ".join(text.split(". ")[:2]).rstrip(".")
