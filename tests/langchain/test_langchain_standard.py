"""LangChain's own standard test suites (the `langchain-tests` package) on ChatParrot, against the tiny model
served on loopback. `langchain-tests` has standard suites for chat models only (none for text LLMs:
ParrotLLM's tests are in test_langchain_llm.py).

Skipped, by the suites themselves, from the capabilities declared below (a random-weight 2-layer model behind
an OpenAI-compatible text endpoint has none of them): tool calling and everything built on it (tool choice,
tool messages, agent loop, few-shot tool examples, unicode tool calls), structured output, JSON mode, image /
audio / PDF / video inputs and tool messages, Anthropic-format inputs, per-call model override (a Parrot
server serves one model: the `model` name does not select another), VCR-recorded timing (no recorded HTTP
cassettes: the server is real and local), and serialization snapshots (ChatParrot is not
`lc_serializable`).
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from parrot_lc.integrations.langchain import ChatParrot

UNREACHABLE = "http://127.0.0.1:9"  # unit tests never send a request: constructing a model contacts nothing
_server: dict[str, str] = {}


@pytest.mark.disable_socket  # pytest-socket: any network use by the unit suite fails the test
class TestChatParrotUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatParrot]:
        return ChatParrot

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"base_url": UNREACHABLE, "model": "tiny"}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        env = {"PARROT_BASE_URL": UNREACHABLE, "PARROT_API_KEY": "secret-key"}
        return env, {}, {"base_url": UNREACHABLE, "api_key": "secret-key"}

    @property
    def supports_model_override(self) -> bool:
        return False  # one model per Parrot server


class TestChatParrotIntegration(ChatModelIntegrationTests):
    # The suite's async tests carry no asyncio mark (LangChain runs them in pytest-asyncio's auto mode);
    # marking the class marks its sync tests too, which pytest-asyncio warns about: silenced.
    pytestmark = [
        pytest.mark.asyncio,
        pytest.mark.filterwarnings("ignore:The test <Function .*> is marked with '@pytest.mark.asyncio' "
                                   "but it is not an async function"),
    ]

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _tiny_server(cls, parrot_server: str) -> None:
        _server["base_url"] = parrot_server  # read by chat_model_params (also outside the `model` fixture)

    @property
    def chat_model_class(self) -> type[ChatParrot]:
        return ChatParrot

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"base_url": _server["base_url"], "model": "tiny", "max_tokens": 6, "temperature": 0}

    @property
    def supports_model_override(self) -> bool:
        return False  # one model per Parrot server
