"""LangChain integration: `ParrotLLM` (a text-completion LLM) and `ChatParrot` (a chat model), drop-in
classes served by a Parrot server at `base_url=`, or by one started in this process (`model=`); and
`deferred(chain)`, which runs an unchanged chain (LCEL, langchain-classic, LangGraph) as graphs of Semantic
Variables, with the result of an eager run.

Server errors raise the frontend's typed errors (`parrot_lc.frontend.ParrotError` and its subclasses,
re-exported here), each also langchain-core's standard error of its condition (`ContextOverflowError`,
`ModelRateLimitError`...); a structured reply cut by `max_tokens` raises `LengthFinishReasonError`.
"""

from parrot_lc.frontend.errors import ParrotConnectionError, ParrotError
from parrot_lc.integrations.langchain.chat_models import ChatParrot, LengthFinishReasonError
from parrot_lc.integrations.langchain.deferred import deferred
from parrot_lc.integrations.langchain.llms import ParrotLLM

__all__ = ["ChatParrot", "LengthFinishReasonError", "ParrotConnectionError", "ParrotError", "ParrotLLM", "deferred"]
