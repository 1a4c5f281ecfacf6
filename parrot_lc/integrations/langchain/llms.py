"""ParrotLLM: a LangChain text-completion LLM served by Parrot."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from parrot_lc.integrations.langchain._base import ParrotParams, new_variables_body, usage_of
from parrot_lc.integrations.langchain.deferred import current_trace

__all__ = ["ParrotLLM"]


class ParrotLLM(ParrotParams, BaseLLM):
    """A text-completion LLM on a Parrot server (`parrot-lc serve`), or on a server in this process.

    Single prompts go to the server's OpenAI-compatible `/v1/completions` (streamed by server-sent events for
    `stream` / `astream`). A batch of several prompts (`batch`, `abatch`, `generate`) goes to the Parrot API as
    one graph, in one session: the prompts' longest common prefix is the first piece of every call's template,
    so the server fills it once and forks every call from it. Greedy results (temperature 0) are the same as
    invoking each prompt alone. Batched results carry no token usage and no finish reason, and are not streamed
    (`streaming=True` applies to single prompts).

    Token usage of a single prompt is in `LLMResult.llm_output["token_usage"]` (`prompt_tokens`,
    `completion_tokens`, `total_tokens`); its finish reason (`"stop"` or `"length"`) in
    `generation_info["finish_reason"]`; a stream ends with an empty chunk whose `generation_info` holds both
    (`finish_reason`, `model_name`, `token_usage`). Server errors raise `parrot_lc.frontend.ParrotError` subclasses with
    the server's message.

    Example:
        ```python
        from parrot_lc import ParrotLLM

        llm = ParrotLLM(base_url="http://127.0.0.1:9000", max_tokens=64, temperature=0)
        llm.invoke("The capital of France is")
        for piece in llm.stream("Once upon a time"):
            print(piece, end="")
        # one graph: "Summarize: " is filled once on the server and shared by both calls
        llm.batch(["Summarize: report A ...", "Summarize: report B ..."])

        local = ParrotLLM(model="tiny")  # no server to run: one starts in this process on first use
        ```
    """

    @property
    def _llm_type(self) -> str:
        return "parrot-llm"

    # ---- inside `deferred(chain)`: record the call, return its placeholder ---------------------------

    def invoke(self, input: Any, config: Any = None, *, stop: list[str] | None = None, **kwargs: Any) -> str:
        trace = current_trace()
        if trace is None:
            return super().invoke(input, config, stop=stop, **kwargs)
        return trace.add(self, [self._convert_input(input).to_string()], self._sampling(stop, kwargs))[0]

    def batch(self, inputs: list[Any], config: Any = None, *, return_exceptions: bool = False,
              **kwargs: Any) -> list[str]:
        trace = current_trace()
        if trace is None:
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        prompts = [self._convert_input(i).to_string() for i in inputs]
        return trace.add(self, prompts, self._sampling(kwargs.pop("stop", None), kwargs))

    # ---- one prompt: /v1/completions -----------------------------------------------------------------

    def _completion_body(self, prompt: str, stop: list[str] | None, kwargs: dict[str, Any], *,
                         stream: bool) -> dict[str, Any]:
        return {"prompt": prompt, **self._openai_body(stop, kwargs, stream=stream)}

    @staticmethod
    def _result(body: dict[str, Any]) -> LLMResult:
        choice = body["choices"][0]
        info = {"finish_reason": choice.get("finish_reason"), "model_name": body.get("model")}
        generation = Generation(text=choice["text"], generation_info=info)
        return LLMResult(generations=[[generation]],
                         llm_output={"token_usage": usage_of(body), "model_name": body.get("model")})

    @staticmethod
    def _streamed_result(chunk: GenerationChunk | None) -> LLMResult:
        if chunk is None:
            raise ValueError("the server streamed no response")
        info = dict(chunk.generation_info or {})
        usage = info.pop("token_usage", None)
        generation = Generation(text=chunk.text, generation_info=info)
        return LLMResult(generations=[[generation]],
                         llm_output={"token_usage": usage, "model_name": info.get("model_name")})

    @staticmethod
    def _chunk(event: dict[str, Any], state: dict[str, Any]) -> GenerationChunk | None:
        """The text chunk of one streamed event (None if it has no text); notes the finish and usage."""
        if usage_of(event) is not None:
            state["token_usage"] = usage_of(event)
        state.setdefault("model_name", event.get("model"))
        for choice in event.get("choices") or []:
            if choice.get("finish_reason"):
                state["finish_reason"] = choice["finish_reason"]
            if choice.get("text"):
                return GenerationChunk(text=choice["text"])
        return None

    @staticmethod
    def _final_chunk(state: dict[str, Any]) -> GenerationChunk:
        """The last chunk: no text, the finish reason, model name and token usage in `generation_info`."""
        info = {k: state.get(k) for k in ("finish_reason", "model_name", "token_usage")}
        return GenerationChunk(text="", generation_info=info)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        state: dict[str, Any] = {}
        body = self._completion_body(prompt, stop, kwargs, stream=True)
        for event in self._post_events("/v1/completions", body, kwargs.get("model")):
            chunk = self._chunk(event, state)
            if chunk is not None:
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk, verbose=self.verbose)
                yield chunk
        chunk = self._final_chunk(state)
        if run_manager:
            run_manager.on_llm_new_token(chunk.text, chunk=chunk, verbose=self.verbose)
        yield chunk

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        state: dict[str, Any] = {}
        body = self._completion_body(prompt, stop, kwargs, stream=True)
        async for event in self._apost_events("/v1/completions", body, kwargs.get("model")):
            chunk = self._chunk(event, state)
            if chunk is not None:
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk, verbose=self.verbose)
                yield chunk
        chunk = self._final_chunk(state)
        if run_manager:
            await run_manager.on_llm_new_token(chunk.text, chunk=chunk, verbose=self.verbose)
        yield chunk

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        if len(prompts) > 1:
            return self._generate_graph(prompts, stop, kwargs)
        if self.streaming:
            aggregate: GenerationChunk | None = None
            for chunk in self._stream(prompts[0], stop, run_manager, **kwargs):
                aggregate = chunk if aggregate is None else aggregate + chunk
            return self._streamed_result(aggregate)
        body = self._completion_body(prompts[0], stop, kwargs, stream=False)
        return self._result(self._post("/v1/completions", body, kwargs.get("model")))

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        if len(prompts) > 1:
            return await self._agenerate_graph(prompts, stop, kwargs)
        if self.streaming:
            aggregate: GenerationChunk | None = None
            async for chunk in self._astream(prompts[0], stop, run_manager, **kwargs):
                aggregate = chunk if aggregate is None else aggregate + chunk
            return self._streamed_result(aggregate)
        body = self._completion_body(prompts[0], stop, kwargs, stream=False)
        return self._result(await self._apost("/v1/completions", body, kwargs.get("model")))

    # ---- several prompts: one graph on the Parrot API -------------------------------------------------

    def _graph_calls(self, prompts: list[str], var_ids: list[str], stop: list[str] | None,
                     kwargs: dict[str, Any]) -> dict[str, Any]:
        """One call per prompt; each template starts with the prompts' longest common prefix (the piece the
        server shares between calls), then the rest of its prompt, then its output variable."""
        sampling = self._sampling(stop, kwargs)
        prefix = os.path.commonprefix(prompts)
        calls = []
        for prompt, var_id in zip(prompts, var_ids):
            template: list[dict[str, Any]] = [{"text": prefix}] if prefix else []
            if len(prompt) > len(prefix):
                template.append({"text": prompt[len(prefix):]})
            template.append({"output": var_id, "sampling": sampling})
            calls.append({"template": template})
        return {"calls": calls}

    def _generate_graph(self, prompts: list[str], stop: list[str] | None, kwargs: dict[str, Any]) -> LLMResult:
        url = self._server_url(kwargs.get("model"))
        session = self._request(url, "POST", "/api/sessions")
        path = f"/api/sessions/{session['session_id']}"
        headers = {"X-Session-Token": session["session_token"]}
        try:
            made = self._request(url, "POST", f"{path}/variables:batchCreate", json=new_variables_body(len(prompts)),
                                 headers=headers)
            var_ids = [v["var_id"] for v in made["variables"]]
            self._request(url, "POST", f"{path}/calls", json=self._graph_calls(prompts, var_ids, stop, kwargs),
                          headers=headers)
            # Every call runs on the server from the submission on; the fetches only wait for the values.
            texts = [self._request(url, "GET", f"{path}/variables/{v}", headers=headers)["value"] for v in var_ids]
        finally:
            self._delete_session(url, path, headers)
        return LLMResult(generations=[[Generation(text=text)] for text in texts],
                         llm_output={"model_name": self._model_name(kwargs.get("model"))})

    def _delete_session(self, url: str, path: str, headers: dict[str, str]) -> None:
        try:
            self._request(url, "DELETE", path, headers=headers)
        except Exception:  # noqa: BLE001 - cleanup only: the request's own error (if any) is what matters
            pass

    async def _agenerate_graph(self, prompts: list[str], stop: list[str] | None,
                               kwargs: dict[str, Any]) -> LLMResult:
        url = await self._aserver_url(kwargs.get("model"))
        async with self._async_client(url) as client:
            session = await self._arequest(client, "POST", "/api/sessions")
            path = f"/api/sessions/{session['session_id']}"
            headers = {"X-Session-Token": session["session_token"]}
            try:
                made = await self._arequest(client, "POST", f"{path}/variables:batchCreate",
                                            json=new_variables_body(len(prompts)), headers=headers)
                var_ids = [v["var_id"] for v in made["variables"]]
                await self._arequest(client, "POST", f"{path}/calls",
                                     json=self._graph_calls(prompts, var_ids, stop, kwargs), headers=headers)
                values = await asyncio.gather(*(
                    self._arequest(client, "GET", f"{path}/variables/{v}", headers=headers) for v in var_ids))
            finally:
                try:
                    await self._arequest(client, "DELETE", path, headers=headers)
                except Exception:  # noqa: BLE001 - cleanup only
                    pass
        return LLMResult(generations=[[Generation(text=body["value"])] for body in values],
                         llm_output={"model_name": self._model_name(kwargs.get("model"))})
