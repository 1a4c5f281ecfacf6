"""LangChain's own standard test suites (the `langchain-tests` package) on ChatParrot, against the tiny model
served on loopback. `langchain-tests` has standard suites for chat models only (none for text LLMs:
ParrotLLM's tests are in test_langchain_llm.py).

Declared: tool calling, tool choice, structured output (json_schema, the default method) and JSON mode. Skipped,
by the suites themselves: image / audio / PDF / video inputs and tool messages, Anthropic-format inputs,
per-call model override (a Parrot server serves one model: the `model` name does not select another),
VCR-recorded timing (no recorded HTTP cassettes: the server is real and local), and serialization snapshots
(ChatParrot is not `lc_serializable`).

On the tiny model (random weights) the tests that check what a model chooses are expected to fail (xfail, as
the suite asks of tests it cannot pass): the arguments it calls a tool with (`magic_function(3)` must be called
with 3), the fields of a JSON-mode reply (only the prompt asks for them), an agent's answer. They run on SmolLM2, the
default model, in `TestChatParrotOnSmolLM2`: the whole integration suite, a few minutes on a CPU, run by hand
(`PARROT_SMOLLM2_SUITE=1 python -m pytest tests/langchain/test_langchain_standard.py -k SmolLM2`;
benchmarks/RESULTS.md has its last result).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from parrot_lc.integrations.langchain import ChatParrot
from parrot_lc.server.local import LocalServer
from parrot_lc.settings import EngineSettings

UNREACHABLE = "http://127.0.0.1:9"  # unit tests never send a request: constructing a model contacts nothing
CHOOSES = "random weights choose no argument or field asked for: run on SmolLM2 (TestChatParrotOnSmolLM2)"
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


class ParrotIntegration(ChatModelIntegrationTests):
    """The integration suite on a Parrot server (`_server["base_url"]`, set by a subclass's fixture)."""

    # The suite's async tests carry no asyncio mark (LangChain runs them in pytest-asyncio's auto mode);
    # marking the class marks its sync tests too, which pytest-asyncio warns about: silenced.
    pytestmark = [
        pytest.mark.asyncio,
        pytest.mark.filterwarnings("ignore:The test <Function .*> is marked with '@pytest.mark.asyncio' "
                                   "but it is not an async function"),
    ]
    served_model = "tiny"
    max_tokens = 128  # enough for a constrained JSON reply of the suite's schemas to close (greedy: ~70 tokens)

    @property
    def chat_model_class(self) -> type[ChatParrot]:
        return ChatParrot

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # Greedy, so that every run is the same.
        return {"base_url": _server["base_url"], "model": self.served_model, "max_tokens": self.max_tokens,
                "temperature": 0}

    @property
    def supports_model_override(self) -> bool:
        return False  # one model per Parrot server

    @property
    def supports_json_mode(self) -> bool:
        return True


class TestChatParrotIntegration(ParrotIntegration):
    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _tiny_server(cls, parrot_server: str) -> None:
        _server["base_url"] = parrot_server  # read by chat_model_params (also outside the `model` fixture)

    @pytest.mark.xfail(reason=CHOOSES)
    def test_tool_calling(self, model: BaseChatModel) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason=CHOOSES)
    async def test_tool_calling_async(self, model: BaseChatModel) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason=CHOOSES)
    def test_bind_runnables_as_tools(self, model: BaseChatModel) -> None:
        super().test_bind_runnables_as_tools(model)

    @pytest.mark.xfail(reason=CHOOSES)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(reason=CHOOSES)
    def test_json_mode(self, model: BaseChatModel) -> None:
        super().test_json_mode(model)

    @pytest.mark.xfail(reason=CHOOSES)
    def test_unicode_tool_call_integration(self, model: BaseChatModel) -> None:
        super().test_unicode_tool_call_integration(model)


@pytest.mark.skipif(not os.environ.get("PARROT_SMOLLM2_SUITE"),
                    reason="minutes on a CPU: run by hand with PARROT_SMOLLM2_SUITE=1")
class TestChatParrotOnSmolLM2(ParrotIntegration):
    served_model = "smollm2"
    max_tokens = 256  # ChatParrot's default: a trained model's strings (a customer's name) take their length

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _smollm2_server(cls, smollm2_cache_dir) -> None:
        settings = EngineSettings(model="smollm2", device="cpu", dtype="float32", cache_dir=smollm2_cache_dir)
        with LocalServer(settings) as server:
            _server["base_url"] = server.base_url
            yield
