"""The engine: a context-forking LLM engine (fill / generate / free_context) over a paged KV cache.

Names are imported on first use, so that what needs only the engine's errors (the command line's help, clients)
does not load torch.
"""

from importlib import import_module

_EXPORTS = {
    "EngineStats": "parrot_lc.engine.engine",
    "LLMEngine": "parrot_lc.engine.engine",
    "RequestOutput": "parrot_lc.engine.request",
    "SamplingParams": "parrot_lc.engine.sampling",
    "Constraint": "parrot_lc.engine.constraints",
    **{name: "parrot_lc.engine.errors" for name in (
        "ContextBusyError", "ContextNotFoundError", "EngineError", "EngineStepError", "InvalidRequestError",
        "ModelLoadError", "OutOfMemoryError", "RequestCancelledError")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'parrot_lc.engine' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
