"""The engine: a context-forking LLM engine (fill / generate / free_context) over a paged KV cache."""

from parrot_lc.engine.engine import EngineStats, LLMEngine
from parrot_lc.engine.errors import (
    ContextBusyError,
    ContextNotFoundError,
    EngineError,
    EngineStepError,
    InvalidRequestError,
    ModelLoadError,
    OutOfMemoryError,
    RequestCancelledError,
)
from parrot_lc.engine.request import RequestOutput
from parrot_lc.engine.sampling import SamplingParams

__all__ = [
    "ContextBusyError",
    "ContextNotFoundError",
    "EngineError",
    "EngineStats",
    "EngineStepError",
    "InvalidRequestError",
    "LLMEngine",
    "ModelLoadError",
    "OutOfMemoryError",
    "RequestCancelledError",
    "RequestOutput",
    "SamplingParams",
]
