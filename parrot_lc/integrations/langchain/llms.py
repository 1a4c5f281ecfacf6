"""ParrotLLM: a LangChain text-completion LLM served by Parrot."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from parrot_lc.frontend import Completion
from parrot_lc.integrations.langchain._base import PARAMS_CONFIG, ParrotParams, StreamEnd
from parrot_lc.integrations.langchain._graph import add_calls
from parrot_lc.integrations.langchain._trace import current_trace

__all__ = ["ParrotLLM"]


class ParrotLLM(ParrotParams, BaseLLM):
    """A text-completion LLM on a Parrot server (`parrot-lc serve`), or on a server in this process.

    Requests go through the frontend's clients (`parrot_client()`). A single prompt is a completion of the server's
    OpenAI-compatible API (`complete`, `stream_complete`). A batch of several prompts (`batch`, `abatch`,
    `generate`) is one graph of semantic-function calls in a frontend session: the text the prompts begin with alike
    is a piece of its own in their templates, so the server fills it once and forks the calls from it. Greedy
    results (temperature 0) are the same as invoking each prompt alone. Batched results carry no token usage and
    no finish reason, and are not streamed (`streaming=True` applies to single prompts). Inside
    `deferred(chain)`, every call (of any method) is recorded in the run's graph instead. `get_num_tokens` counts
    with the served model's tokenizer.

    Token usage of a single prompt is in `LLMResult.llm_output["token_usage"]` (`prompt_tokens`,
    `completion_tokens`, `total_tokens`, `cached_tokens`); its finish reason (`"stop"` or `"length"`) in
    `generation_info["finish_reason"]`; a stream ends with an empty chunk whose `generation_info` holds both
    (`finish_reason`, `model_name`, `token_usage`). Server errors raise `parrot_lc.frontend.ParrotError` subclasses with
    the server's message. As a stand-in for LangChain's `OpenAI` it also takes `extra_body`, `default_headers`,
    `default_query` and `organization` with their meaning (see the fields).

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

    model_config = PARAMS_CONFIG

    @property
    def _llm_type(self) -> str:
        return "parrot-llm"

    # ---- inside `deferred(chain)`: record the calls in the run's graph ------------------------------------

    def _record(self, prompts: list[str], stop: list[str] | None, kwargs: dict[str, Any]) -> list[str] | None:
        """Inside a deferred run: records the prompts' calls in its graph and returns their outputs (values not known
        yet); None outside one, or where the calls must run now (see `Trace.can_record`)."""
        trace = current_trace()
        if trace is None or not trace.can_record(self, kwargs):
            return None
        self._check_served()
        return trace.record(prompts, self._graph_sampling(stop, kwargs))

    # ---- one prompt: a completion ----------------------------------------------------------------------

    @staticmethod
    def _result(completion: Completion) -> LLMResult:
        info = {"finish_reason": completion.finish_reason, "model_name": completion.model}
        return LLMResult(generations=[[Generation(text=completion.text, generation_info=info)]],
                         llm_output={"token_usage": completion.usage, "model_name": completion.model})

    @staticmethod
    def _last_chunk(end: StreamEnd) -> GenerationChunk:
        """The last chunk: no text, the finish reason, model name and token usage in `generation_info`."""
        info = {"finish_reason": end.finish_reason, "model_name": end.model, "token_usage": end.usage}
        return GenerationChunk(text="", generation_info=info)

    @staticmethod
    def _streamed_result(chunk: GenerationChunk | None) -> LLMResult:
        if chunk is None:
            raise ValueError("the server streamed no response")
        info = dict(chunk.generation_info or {})
        usage = info.pop("token_usage", None)
        generation = Generation(text=chunk.text, generation_info=info)
        return LLMResult(generations=[[generation]],
                         llm_output={"token_usage": usage, "model_name": info.get("model_name")})

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        recorded = self._record([prompt], stop, kwargs)
        if recorded is not None:
            chunk = GenerationChunk(text=recorded[0])
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk, verbose=self.verbose)
            yield chunk
            return
        prompt = self._known(prompt, "ParrotLLM.stream")
        end = StreamEnd()
        client = self.parrot_client(kwargs.get("model"))
        for piece in client.stream_complete(prompt, **self._request_options(stop, kwargs)):
            end.note(piece)
            if piece.text:
                chunk = GenerationChunk(text=piece.text)
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk, verbose=self.verbose)
                yield chunk
        chunk = self._last_chunk(end)
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
        if current_trace() is not None:  # recording may start the in-process server: not on the event loop
            recorded = await asyncio.to_thread(self._record, [prompt], stop, kwargs)
            if recorded is not None:
                chunk = GenerationChunk(text=recorded[0])
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk, verbose=self.verbose)
                yield chunk
                return
            prompt = await asyncio.to_thread(self._known, prompt, "ParrotLLM.astream")
        end = StreamEnd()
        client = await self._async_client(kwargs.get("model"))
        async for piece in client.stream_complete(prompt, **self._request_options(stop, kwargs)):
            end.note(piece)
            if piece.text:
                chunk = GenerationChunk(text=piece.text)
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk, verbose=self.verbose)
                yield chunk
        chunk = self._last_chunk(end)
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
        recorded = self._record(prompts, stop, kwargs)
        if recorded is not None:
            return self._graph_result(recorded, kwargs)
        prompts = self._known(prompts, "ParrotLLM.generate")
        if len(prompts) > 1:
            return self._generate_graph(prompts, stop, kwargs)
        if self.streaming:
            aggregate: GenerationChunk | None = None
            for chunk in self._stream(prompts[0], stop, run_manager, **kwargs):
                aggregate = chunk if aggregate is None else aggregate + chunk
            return self._streamed_result(aggregate)
        client = self.parrot_client(kwargs.get("model"))
        return self._result(client.complete(prompts[0], **self._request_options(stop, kwargs)))

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        if current_trace() is not None:
            recorded = await asyncio.to_thread(self._record, prompts, stop, kwargs)
            if recorded is not None:  # its metadata may ask the server which model it serves
                return await asyncio.to_thread(self._graph_result, recorded, kwargs)
            prompts = await asyncio.to_thread(self._known, prompts, "ParrotLLM.agenerate")
        if len(prompts) > 1:
            return await self._agenerate_graph(prompts, stop, kwargs)
        if self.streaming:
            aggregate: GenerationChunk | None = None
            async for chunk in self._astream(prompts[0], stop, run_manager, **kwargs):
                aggregate = chunk if aggregate is None else aggregate + chunk
            return self._streamed_result(aggregate)
        client = await self._async_client(kwargs.get("model"))
        return self._result(await client.complete(prompts[0], **self._request_options(stop, kwargs)))

    # ---- several prompts: one graph in a frontend session ---------------------------------------------

    def _generate_graph(self, prompts: list[str], stop: list[str] | None, kwargs: dict[str, Any]) -> LLMResult:
        sampling = self._graph_sampling(stop, kwargs)  # checked before a session is opened
        self._check_served(kwargs.get("model"))
        with self.parrot_client(kwargs.get("model")).session() as session:
            with session.graph():
                outputs = add_calls(session, [[prompt] for prompt in prompts], sampling)
            # Every call runs on the server from the submission on; the fetches only wait for the values.
            texts = [output.get() for output in outputs]
        return self._graph_result(texts, kwargs)

    async def _agenerate_graph(self, prompts: list[str], stop: list[str] | None,
                               kwargs: dict[str, Any]) -> LLMResult:
        sampling = self._graph_sampling(stop, kwargs)
        await asyncio.to_thread(self._check_served, kwargs.get("model"))
        client = await self._async_client(kwargs.get("model"))
        async with client.session() as session:
            async with session.graph():
                outputs = add_calls(session, [[prompt] for prompt in prompts], sampling)
            texts = await asyncio.gather(*(output.aget() for output in outputs))
        return await asyncio.to_thread(self._graph_result, texts, kwargs)

    def _graph_result(self, texts: list[str], kwargs: dict[str, Any]) -> LLMResult:
        """The result of calls run as a graph, whose values no server reply names the model of: named as a
        completion's reply names it (may ask the server which model it serves, once)."""
        model = self._reply_model_name(kwargs.get("model"))
        return LLMResult(generations=[[Generation(text=text, generation_info={"model_name": model})] for text in texts],
                         llm_output={"model_name": model})
