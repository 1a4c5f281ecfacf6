"""parrot_lc: serve LangChain applications as graphs of Semantic Variables (after Parrot, OSDI'24)."""

from parrot_lc.engine import LLMEngine, SamplingParams
from parrot_lc.settings import EngineSettings

__all__ = ["EngineSettings", "LLMEngine", "SamplingParams"]
