"""The Parrot frontend: Semantic Variables, semantic functions and the clients that submit them, as graphs,
to a Parrot server over HTTP (it never imports the server or the engine)."""

from parrot_lc.frontend.client import AsyncParrotClient, ParrotClient
from parrot_lc.frontend.errors import (
    AuthError,
    CallFailedError,
    GraphError,
    InvalidRequestError,
    NotFoundError,
    ParrotConnectionError,
    ParrotError,
    RequestTimeoutError,
    ServerError,
    VariableTimeoutError,
)
from parrot_lc.frontend.function import Output, SemanticFunction, semantic_function
from parrot_lc.frontend.session import AsyncSession, Session, current_session
from parrot_lc.frontend.template import Placeholder, Template, TemplateError, Text, parse_template
from parrot_lc.frontend.variable import SemanticVariable

__all__ = [
    "AsyncParrotClient",
    "AsyncSession",
    "AuthError",
    "CallFailedError",
    "GraphError",
    "InvalidRequestError",
    "NotFoundError",
    "Output",
    "ParrotClient",
    "ParrotConnectionError",
    "ParrotError",
    "Placeholder",
    "RequestTimeoutError",
    "SemanticFunction",
    "SemanticVariable",
    "ServerError",
    "Session",
    "Template",
    "TemplateError",
    "Text",
    "VariableTimeoutError",
    "current_session",
    "parse_template",
    "semantic_function",
]
