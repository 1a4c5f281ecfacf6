"""ParrotLLM: a LangChain text-completion LLM served by Parrot."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from pydantic import Field, field_validator, model_validator

from parrot_lc.frontend import Completion, InvalidRequestError, SemanticVariable
from parrot_lc.integrations.langchain._base import (
    CALL_OPTIONS, PARAMS_CONFIG, ParrotParams, StreamEnd, summed_usage,
)
from parrot_lc.integrations.langchain._errors import raises_langchain_errors
from parrot_lc.integrations.langchain._graph import add_calls, refused_as_requests
from parrot_lc.integrations.langchain._trace import current_trace

__all__ = ["ParrotLLM"]

_NOT_SERVED = {"suffix": "the served models have no fill-in-the-middle: a completion cannot end before a suffix"}
"""Request fields of LangChain's OpenAI that `model_kwargs` cannot hold, and why."""


class ParrotLLM(ParrotParams, BaseLLM):
    """A text-completion LLM on a Parrot server (`parrot-lc serve`), or on a server in this process.

    Requests go through the frontend's clients (`parrot_client()`). A single prompt is a completion of the server's
    OpenAI-compatible API (`complete`, `stream_complete`). A batch of several prompts (`batch`, `abatch`,
    `generate`) is one graph of semantic-function calls in a frontend session: the text the prompts begin with alike
    is a piece of its own in their templates, so the server fills it once and forks the calls from it; with `n`,
    each prompt has n calls (the i-th sampling with seed + i, as the server samples a request's choices). Greedy
    results (temperature 0) are the same as invoking each prompt alone, and so are their finish reasons and token
    usage (but for `cached_tokens`, which counts what the server had computed before); a prompt longer than the
    model's context raises InvalidRequestError naming `prompt`, as invoked. Batched results are not streamed
    (`streaming=True` applies to single prompts). A batch that asks for what a graph call's output (one text) does
    not hold, `logprobs` or a request field of `model_kwargs` / `extra_body` that a graph call does not carry
    (`echo`...), goes as completion requests of `batch_size` prompts each instead, as LangChain's `OpenAI` sends
    every batch. Inside `deferred(chain)`, every call (of any method) is recorded in the run's graph instead, but for
    a call with `logprobs` or `n` above 1, which runs at once, on real text (a request field that a graph call does
    not carry raises InvalidRequestError naming it there, never dropped); its generation's finish reason is a value
    not known yet, as its text is, and it has no token usage. `get_num_tokens` counts with the served model's
    tokenizer.

    Token usage of a completion request is in `LLMResult.llm_output["token_usage"]` (`prompt_tokens`,
    `completion_tokens`, `total_tokens`, `cached_tokens`; summed over a batch's requests); each generation's finish
    reason (`"stop"` or `"length"`) in `generation_info["finish_reason"]`, and with `logprobs` OpenAI's
    log-probabilities of a completion in `generation_info["logprobs"]` (`tokens`, `token_logprobs`, `top_logprobs`,
    `text_offset`), as LangChain's `OpenAI` gives them. A stream's chunks carry their tokens' log-probabilities the
    same way (LangChain joins them), and it ends with an empty chunk whose `generation_info` holds `finish_reason`,
    `model_name` and `token_usage`. Server errors raise `parrot_lc.frontend.ParrotError` subclasses with the
    server's message, each also langchain-core's error of its condition (`ContextOverflowError`...), as ChatParrot's.

    As a stand-in for LangChain's `OpenAI` it takes the arguments of its completions with their meaning: `model`
    (or `model_name`), `base_url`, `api_key`, `temperature`, `max_tokens`, `top_p`, `frequency_penalty`,
    `presence_penalty`, `seed`, `stop`, `n`, `best_of` (no more than `n`), `logprobs`, `batch_size`, `timeout`,
    `max_retries`, `streaming`, `model_kwargs`, `extra_body`, `default_headers`, `default_query` and
    `organization`; and a call's `n`, `best_of` and `logprobs`. `logit_bias`, `http_client` and `http_async_client`
    are taken as None only (see their fields); another argument of `OpenAI` (`openai_proxy`, `tiktoken_model_name`,
    `allowed_special`...) is refused, naming it.

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
    _call_options = CALL_OPTIONS | {"n", "best_of", "logprobs"}
    _request_fields = ("n", "best_of", "logprobs")

    best_of: int | None = Field(default=None, ge=1)
    """OpenAI's `best_of`: choices generated per prompt, of which the best `n` are returned. The server returns
    every choice it generates, so only what asks for nothing more is taken: None, 1 or `n` (another value is refused,
    naming it, rather than ignored)."""

    logprobs: int | None = Field(default=None, ge=0, le=20)
    """The log-probabilities of each generated token and of the `logprobs` most likely tokens at its position (at
    most 20; 0: the generated token's alone), in each generation's `generation_info["logprobs"]`."""

    batch_size: int = Field(default=20, ge=1)
    """LangChain's `OpenAI` sends a batch as completion requests of `batch_size` prompts each; ParrotLLM sends a
    batch as one graph, whatever its size (the server queues its calls and shares their prefixes), and uses
    `batch_size` only for a batch that goes as completion requests (one that asks for `logprobs`, or for a request
    field that a graph call does not carry): the prompts of one request."""

    logit_bias: dict[str, float] | None = None
    """OpenAI's per-token logit bias: the server does not bias tokens' logits (its `/v1/completions` refuses
    `logit_bias`), so only None or `{}` is taken (another value is refused, naming the field, rather than ignored)."""

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> None:
        if value:
            raise ValueError("logit_bias is not taken: the server does not bias tokens' logits (its /v1/completions "
                             "refuses logit_bias); leave it unset")
        return None

    @field_validator("model_kwargs")
    @classmethod
    def _fields_the_server_serves(cls, value: dict[str, Any]) -> dict[str, Any]:
        refused = sorted(set(value) & set(_NOT_SERVED))
        if refused:
            raise ValueError("; ".join(f"model_kwargs: {name} is not taken: {_NOT_SERVED[name]}" for name in refused))
        return value

    @model_validator(mode="after")
    def _best_of_no_more_than_n(self) -> ParrotLLM:
        refusal = _best_of_refusal(self.best_of, self.n)
        if refusal:
            raise ValueError(refusal)
        return self

    @property
    def _llm_type(self) -> str:
        return "parrot-llm"

    def _body_fields(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """`model_kwargs`' and `extra_body`'s fields (the arguments refuse a field given in both)."""
        return {**self.model_kwargs, **super()._body_fields(stop, kwargs)}

    def _choices(self, kwargs: dict[str, Any]) -> int:
        """The choices of each prompt (`n`); a call's `best_of` that asks for more is refused, naming it."""
        n = kwargs.get("n") or 1
        refusal = _best_of_refusal(kwargs.get("best_of"), n)
        if refusal:
            raise InvalidRequestError(f"ParrotLLM: {refusal}", field="best_of")
        return n

    def _completion_options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A completion request's options: the model, sampling, `n` and `logprobs`, and the body fields of
        `model_kwargs` and `extra_body` (`best_of` asks for nothing more than `n`: not sent)."""
        self._choices(kwargs)
        fields = {name: kwargs[name] for name in ("n", "logprobs") if kwargs.get(name) is not None}
        return self._request_options(stop, kwargs, **fields)

    def _as_graph(self, prompts: list[str], stop: list[str] | None, kwargs: dict[str, Any]) -> bool:
        """Whether prompts run as one graph: several, asking for nothing that a graph call's output does not hold
        (log-probabilities) or its sampling does not carry (a body field such as `echo`)."""
        return (len(prompts) > 1 and not self._asks_for_logprobs(kwargs)
                and not self._uncarried_fields(stop, kwargs))

    def _request_prompts(self, prompts: list[str]) -> list[str | list[str]]:
        """The `prompt` of each completion request of a batch: `batch_size` prompts (one alone, as itself)."""
        chunks = [prompts[i:i + self.batch_size] for i in range(0, len(prompts), self.batch_size)]
        return [chunk[0] if len(chunk) == 1 else chunk for chunk in chunks]

    # ---- inside `deferred(chain)`: record the calls in the run's graph ------------------------------------

    def _record(self, prompts: list[str], stop: list[str] | None, kwargs: dict[str, Any]) -> list[str] | None:
        """Inside a deferred run: records the prompts' calls in its graph and returns their outputs (values not known
        yet); None outside one, or where the calls must run now (see `_needs_a_request`, `Trace.can_record`)."""
        trace = current_trace()
        if trace is None or self._needs_a_request(trace, kwargs) or not trace.can_record(self, kwargs):
            return None
        _check_not_empty(prompts)
        self._check_served()
        return trace.record(prompts, self._graph_sampling(stop, kwargs))

    # ---- completion requests ---------------------------------------------------------------------------

    def _result(self, replies: list[Completion], kwargs: dict[str, Any]) -> LLMResult:
        """The replies of a batch's completion requests (in the order of its prompts) as LangChain's result: each
        prompt's `n` choices, and the requests' token usage summed."""
        n, model = self._choices(kwargs), replies[0].model
        choices = [choice for reply in replies for choice in (reply, *reply.others)]
        generations = [[_generation(choice, model) for choice in choices[i:i + n]] for i in range(0, len(choices), n)]
        usage = summed_usage(reply.usage for reply in replies)
        return LLMResult(generations=generations, llm_output={"token_usage": usage or None, "model_name": model})

    @staticmethod
    def _piece_chunk(piece: Completion) -> GenerationChunk:
        """A stream piece: its text and, asked for, its tokens' log-probabilities (LangChain joins the chunks')."""
        info = {"logprobs": piece.logprobs} if _holds_tokens(piece) else None
        return GenerationChunk(text=piece.text, generation_info=info)

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
        info.setdefault("logprobs", None)  # as a whole completion's generation has it
        generation = Generation(text=chunk.text, generation_info=info)
        return LLMResult(generations=[[generation]],
                         llm_output={"token_usage": usage, "model_name": info.get("model_name")})

    @raises_langchain_errors
    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        kwargs = self._streamed_call_kwargs(kwargs)
        recorded = self._record([prompt], stop, kwargs)
        if recorded is not None:
            chunk = GenerationChunk(text=recorded[0], generation_info=self._recorded_info(recorded[0], kwargs))
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk, verbose=self.verbose)
            yield chunk
            return
        prompt = self._known(prompt, "ParrotLLM.stream")
        end = StreamEnd()
        client = self.parrot_client(kwargs.get("model"))
        for piece in client.stream_complete(prompt, **self._completion_options(stop, kwargs)):
            end.note(piece)
            if piece.text or _holds_tokens(piece):
                chunk = self._piece_chunk(piece)
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk, verbose=self.verbose)
                yield chunk
        chunk = self._last_chunk(end)
        if run_manager:
            run_manager.on_llm_new_token(chunk.text, chunk=chunk, verbose=self.verbose)
        yield chunk

    @raises_langchain_errors
    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        kwargs = self._streamed_call_kwargs(kwargs)
        if current_trace() is not None:  # recording may start the in-process server: not on the event loop
            recorded = await asyncio.to_thread(self._record, [prompt], stop, kwargs)
            if recorded is not None:
                info = await asyncio.to_thread(self._recorded_info, recorded[0], kwargs)
                chunk = GenerationChunk(text=recorded[0], generation_info=info)
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk, verbose=self.verbose)
                yield chunk
                return
            prompt = await asyncio.to_thread(self._known, prompt, "ParrotLLM.astream")
        end = StreamEnd()
        client = await self._async_client(kwargs.get("model"))
        async for piece in client.stream_complete(prompt, **self._completion_options(stop, kwargs)):
            end.note(piece)
            if piece.text or _holds_tokens(piece):
                chunk = self._piece_chunk(piece)
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk, verbose=self.verbose)
                yield chunk
        chunk = self._last_chunk(end)
        if run_manager:
            await run_manager.on_llm_new_token(chunk.text, chunk=chunk, verbose=self.verbose)
        yield chunk

    @raises_langchain_errors
    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        kwargs = self._call_kwargs(kwargs)
        recorded = self._record(prompts, stop, kwargs)
        if recorded is not None:
            return self._recorded_result(recorded, kwargs)
        prompts = self._known(prompts, "ParrotLLM.generate")
        if self._as_graph(prompts, stop, kwargs):
            return self._generate_graph(prompts, stop, kwargs)
        if self.streaming and len(prompts) == 1:
            aggregate: GenerationChunk | None = None
            for chunk in self._stream(prompts[0], stop, run_manager, **kwargs):
                aggregate = chunk if aggregate is None else aggregate + chunk
            return self._streamed_result(aggregate)
        client, options = self.parrot_client(kwargs.get("model")), self._completion_options(stop, kwargs)
        return self._result([client.complete(prompt, **options) for prompt in self._request_prompts(prompts)], kwargs)

    @raises_langchain_errors
    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        kwargs = self._call_kwargs(kwargs)
        if current_trace() is not None:
            recorded = await asyncio.to_thread(self._record, prompts, stop, kwargs)
            if recorded is not None:  # its metadata may ask the server which model it serves
                return await asyncio.to_thread(self._recorded_result, recorded, kwargs)
            prompts = await asyncio.to_thread(self._known, prompts, "ParrotLLM.agenerate")
        if self._as_graph(prompts, stop, kwargs):
            return await self._agenerate_graph(prompts, stop, kwargs)
        if self.streaming and len(prompts) == 1:
            aggregate: GenerationChunk | None = None
            async for chunk in self._astream(prompts[0], stop, run_manager, **kwargs):
                aggregate = chunk if aggregate is None else aggregate + chunk
            return self._streamed_result(aggregate)
        client, options = await self._async_client(kwargs.get("model")), self._completion_options(stop, kwargs)
        requests = (client.complete(prompt, **options) for prompt in self._request_prompts(prompts))
        return self._result(list(await asyncio.gather(*requests)), kwargs)

    # ---- several prompts: one graph in a frontend session ---------------------------------------------

    def _graph_calls(self, prompts: list[str], stop: list[str] | None,
                     kwargs: dict[str, Any]) -> tuple[list[list[str]], list[dict[str, Any]]]:
        """A batch's graph calls, `n` per prompt, and each call's sampling: a prompt's i-th call samples with
        seed + i, as the server samples a request's i-th choice (checked before a session is opened)."""
        _check_not_empty(prompts)
        sampling, n = self._graph_sampling(stop, kwargs), self._choices(kwargs)
        seed = sampling.get("seed")
        samplings = [sampling if i == 0 or seed is None else {**sampling, "seed": (seed + i) % 2**63}
                     for _ in prompts for i in range(n)]
        return [[prompt] for prompt in prompts for _ in range(n)], samplings

    def _generate_graph(self, prompts: list[str], stop: list[str] | None, kwargs: dict[str, Any]) -> LLMResult:
        calls, samplings = self._graph_calls(prompts, stop, kwargs)
        self._check_served(kwargs.get("model"))
        with self.parrot_client(kwargs.get("model")).session(idle_timeout=self.timeout) as session:
            with session.graph():
                outputs = add_calls(session, calls, samplings)
            # Every call runs on the server from the submission on; the fetches only wait for the values.
            with refused_as_requests("prompt"):
                session.get_values(outputs, idle_timeout=self.timeout)
        return self._graph_result(outputs, kwargs)

    async def _agenerate_graph(self, prompts: list[str], stop: list[str] | None,
                               kwargs: dict[str, Any]) -> LLMResult:
        calls, samplings = self._graph_calls(prompts, stop, kwargs)
        await asyncio.to_thread(self._check_served, kwargs.get("model"))
        client = await self._async_client(kwargs.get("model"))
        async with client.session(idle_timeout=self.timeout) as session:
            async with session.graph():
                outputs = add_calls(session, calls, samplings)
            with refused_as_requests("prompt"):
                await session.get_values(outputs, idle_timeout=self.timeout)
        return await asyncio.to_thread(self._graph_result, outputs, kwargs)

    def _graph_result(self, outputs: list[SemanticVariable], kwargs: dict[str, Any]) -> LLMResult:
        """The result of a batch's calls run as a graph (`n` a prompt, in order), their outputs fetched: each
        generation's text and finish reason, and the calls' token usage, as completion requests' replies give them.
        No server reply names the model of graph calls: named as a completion's reply names it (may ask the server
        which model it serves, once)."""
        n, model = self._choices(kwargs), self._reply_model_name(kwargs.get("model"))
        generations = [Generation(text=output.value, generation_info={
            "finish_reason": output.finish_reason, "logprobs": None, "model_name": model}) for output in outputs]
        return LLMResult(generations=[generations[i:i + n] for i in range(0, len(generations), n)],
                         llm_output={"token_usage": _graph_usage(outputs, n), "model_name": model})

    def _recorded_result(self, recorded: list[str], kwargs: dict[str, Any]) -> LLMResult:
        """The result of calls recorded in a deferred run (see `_recorded_info`)."""
        generations = [[Generation(text=text, generation_info=self._recorded_info(text, kwargs))] for text in recorded]
        model = self._reply_model_name(kwargs.get("model"))
        return LLMResult(generations=generations, llm_output={"model_name": model})

    def _recorded_info(self, output: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The `generation_info` of a call recorded in a deferred run, whose output is `output`: its finish reason is
        a value not known yet, as its text is (marked text, see `Trace.finish_reason`). No token usage: counts, which
        LangChain adds up, cannot wait."""
        trace = current_trace()
        assert trace is not None, "recorded in it"
        return {"finish_reason": trace.finish_reason(output), "logprobs": None,
                "model_name": self._reply_model_name(kwargs.get("model"))}


def _generation(choice: Completion, model: str | None) -> Generation:
    """A completion's choice: its text, finish reason, log-probabilities (None unless asked for, as LangChain's
    `OpenAI` gives them) and the reply's model."""
    info = {"finish_reason": choice.finish_reason, "logprobs": choice.logprobs, "model_name": model}
    return Generation(text=choice.text, generation_info=info)


def _graph_usage(outputs: list[SemanticVariable], n: int) -> dict[str, int]:
    """The token usage of a batch's graph calls (`n` a prompt), as a completion request's reply counts it: each
    prompt's tokens once, however many choices fork it (its first call's), and every choice's own."""
    def total(key: str, calls: list[SemanticVariable]) -> int:
        return sum((call.usage or {}).get(key, 0) for call in calls)

    prompt, completion = total("prompt_tokens", outputs[::n]), total("completion_tokens", outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "cached_tokens": total("cached_tokens", outputs[::n])}


def _check_not_empty(prompts: list[str]) -> None:
    """Refuses an empty prompt of a graph as its completion request is refused (naming `prompt`), before any call is
    made: a graph call of none would fail its whole graph, naming the graph's fields."""
    if "" in prompts:
        raise InvalidRequestError("ParrotLLM: the prompt is empty: it needs at least one token", field="prompt")


def _holds_tokens(piece: Completion) -> bool:
    """Whether a stream piece holds log-probabilities of tokens (its text may be empty: a token of part of a
    character; the last piece's lists may be)."""
    return bool((piece.logprobs or {}).get("tokens"))


def _best_of_refusal(best_of: int | None, n: int | None) -> str | None:
    """Why `best_of` is refused with `n` choices a prompt, or None: the server returns every choice it generates,
    so `best_of` may ask for no more than `n` (1 asks for nothing)."""
    if best_of in (None, 1, n or 1):
        return None
    return (f"best_of={best_of} is not taken with n={n or 1}: the server returns every choice it generates (it "
            f"picks no best ones), so best_of may be 1 or n")
