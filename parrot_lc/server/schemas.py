"""Request and response bodies of the HTTP API (pydantic models: FastAPI validates and documents them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, NonNegativeInt, model_validator

from parrot_lc.engine.sampling import SamplingParams


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sampling(StrictModel):
    """Sampling settings of one output (defaults as the engine's SamplingParams)."""

    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False

    def to_params(self) -> SamplingParams:
        return SamplingParams(**{**self.model_dump(), "stop": tuple(self.stop), "stop_token_ids": tuple(self.stop_token_ids)})


class TemplatePiece(StrictModel):
    """Exactly one of: constant `text`, an `input` variable id, an `output` variable id (with `sampling`)."""

    text: str | None = None
    input: str | None = None
    output: str | None = None
    sampling: Sampling | None = None

    @model_validator(mode="after")
    def one_kind(self) -> "TemplatePiece":
        kinds = [k for k in ("text", "input", "output") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("a template piece has exactly one of `text`, `input`, `output`")
        if self.sampling is not None and self.output is None:
            raise ValueError("`sampling` belongs to `output` pieces only")
        return self


class CallSpec(StrictModel):
    template: list[TemplatePiece] = Field(min_length=1)


class SubmitCalls(StrictModel):
    calls: list[CallSpec] = Field(min_length=1)


class SubmittedCalls(BaseModel):
    call_ids: list[str]


class NewSession(BaseModel):
    session_id: str
    session_token: str


# Variables one batchCreate request may make: a body of empty ones is small, their objects are not.
MAX_NEW_VARIABLES = 4096


class NewVariable(StrictModel):
    name: str = ""
    value: str | None = None


class VariableRef(BaseModel):
    var_id: str
    name: str


class NewVariables(StrictModel):
    """Several variables made in one request (a graph's inputs: one round trip, not one each)."""

    variables: list[NewVariable] = Field(min_length=1, max_length=MAX_NEW_VARIABLES)


class VariableRefs(BaseModel):
    variables: list[VariableRef]


class SetValue(StrictModel):
    value: str


class VariableValue(BaseModel):
    var_id: str
    value: str


class CallNode(BaseModel):
    """A call of the session's graph, with the objective the server deduced for it."""

    call_id: str
    inputs: list[str]
    outputs: list[str]
    state: str
    latency_critical: bool
    task_group: str | None


class SessionStatus(BaseModel):
    session_id: str
    variables: int
    calls: dict[str, int]
    graph: list[CallNode]


class ErrorDetail(BaseModel):
    message: str
    type: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class EngineStatsBody(BaseModel):
    """An engine's counters, as its heartbeat sends them (the fields of parrot_lc.engine.EngineStats)."""

    prefill_tokens: NonNegativeInt = 0
    decode_tokens: NonNegativeInt = 0
    reused_tokens: NonNegativeInt = 0
    kv_blocks_used: NonNegativeInt = 0
    kv_blocks_free: NonNegativeInt = 0
    num_running: NonNegativeInt = 0
    num_waiting: NonNegativeInt = 0
    num_contexts: NonNegativeInt = 0
    num_preemptions: NonNegativeInt = 0
    num_steps: NonNegativeInt = 0
    kv_capacity_tokens: NonNegativeInt = 0


class RegisterEngine(BaseModel):
    url: HttpUrl  # where the manager reaches the engine: http(s), with a host
    stats: EngineStatsBody = Field(default_factory=EngineStatsBody)


class EngineRef(BaseModel):
    name: str


# ---- OpenAI-compatible ---------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAISampling(BaseModel):
    """The sampling fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="keep generating past EOS up to max_tokens (as vLLM's extension)")

    def to_params(self, max_tokens: int) -> SamplingParams:
        """The engine's sampling settings; `max_tokens` as the server settled it (see ParrotManager.check_prompt)."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature,
                              top_p=self.top_p, seed=self.seed, stop=tuple(stop), ignore_eos=self.ignore_eos)


class CompletionRequest(OpenAISampling):
    prompt: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: only text parts are understood here
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
