"""The Parrot frontend: Semantic Variables, semantic functions, and the clients that submit them to a Parrot server
over HTTP, as graphs, and ask its OpenAI-compatible API for completions and chat replies. It is the one client of
the server: LangChain's classes go through it too. It never imports the server or the engine, but for
`connect()`, which starts a server in this process on first use (`parrot_lc.frontend.inprocess`)."""

from parrot_lc.frontend.client import AsyncParrotClient, ParrotClient
from parrot_lc.frontend.completions import Completion, MessageDict
from parrot_lc.frontend.errors import (
    AuthError,
    CallFailedError,
    GraphError,
    IdleTimeoutError,
    InvalidRequestError,
    NotFoundError,
    ParrotConnectionError,
    ParrotError,
    RateLimitError,
    RequestTimeoutError,
    ServerFailure,
    VariableTimeoutError,
)
from parrot_lc.frontend.function import Output, SemanticFunction, semantic_function
from parrot_lc.frontend.inprocess import connect
from parrot_lc.frontend.session import AsyncSession, Session, current_session
from parrot_lc.frontend.template import Placeholder, Template, TemplateError, Text, parse_template
from parrot_lc.frontend.variable import SemanticVariable

__all__ = [
    "AsyncParrotClient",
    "AsyncSession",
    "AuthError",
    "CallFailedError",
    "Completion",
    "GraphError",
    "IdleTimeoutError",
    "InvalidRequestError",
    "MessageDict",
    "NotFoundError",
    "Output",
    "ParrotClient",
    "ParrotConnectionError",
    "ParrotError",
    "Placeholder",
    "RateLimitError",
    "RequestTimeoutError",
    "SemanticFunction",
    "SemanticVariable",
    "ServerFailure",
    "Session",
    "Template",
    "TemplateError",
    "Text",
    "VariableTimeoutError",
    "connect",
    "current_session",
    "parse_template",
    "semantic_function",
]
