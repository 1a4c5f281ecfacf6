"""parrot_lc: serve LangChain applications as graphs of Semantic Variables (after Parrot, OSDI'24).

Names are imported on first use, so that `from parrot_lc import ParrotClient` does not load torch.
"""

from importlib import import_module

_EXPORTS = {
    "EngineSettings": "parrot_lc.settings",
    "ServerSettings": "parrot_lc.settings",
    "LLMEngine": "parrot_lc.engine",
    "SamplingParams": "parrot_lc.engine",
    "ParrotClient": "parrot_lc.frontend",
    "AsyncParrotClient": "parrot_lc.frontend",
    "SemanticVariable": "parrot_lc.frontend",
    "SemanticFunction": "parrot_lc.frontend",
    "semantic_function": "parrot_lc.frontend",
    "Output": "parrot_lc.frontend",
    "connect": "parrot_lc.frontend",
    "ParrotLLM": "parrot_lc.integrations.langchain",
    "ChatParrot": "parrot_lc.integrations.langchain",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'parrot_lc' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
