"""Request and response bodies of the HTTP API (pydantic models: FastAPI validates and documents them)."""

from __future__ import annotations

import functools
import itertools
import json
from abc import abstractmethod
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    NonNegativeInt,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from parrot_lc.engine.constraints import Constraint
from parrot_lc.engine.logprobs import MAX_LOGPROBS
from parrot_lc.engine.sampling import SamplingParams
from parrot_lc.server.graph import Variable
from parrot_lc.server.structured_output import GUIDED_KINDS, FieldError, openai_constraint, sampling_constraint
from parrot_lc.server.tool_calls import ToolRequest

# Error types of the validators here that the HTTP layer answers (with 400, as every refused request) under a `type`
# of their own, not ValidationError (parrot_lc/server/responses.py): text that is no Unicode, a field or a value that
# the server does not implement, and a constraint of an output (a response format, a schema, a regex) that is no
# grammar.
INVALID_TEXT, NOT_SUPPORTED, INVALID_CONSTRAINT = "invalid_text", "not_supported", "invalid_constraint"


def check_text(value: Any) -> None:
    """Raises if a string in `value` (a string, or lists and dicts of them) does not encode as UTF-8: JSON escapes
    can spell lone surrogates, which no tokenizer takes and no answer that quotes them can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            surrogate = f"\\u{ord(value[exc.start]):04x}"
            raise PydanticCustomError(INVALID_TEXT, "not Unicode text: a lone surrogate ({surrogate}) at index {index}",
                                      {"surrogate": surrogate, "index": exc.start}) from None
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_text(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key)
            check_text(item)


class RequestModel(BaseModel):
    """A body the server reads, checked in one place for what the types alone let through: numbers are finite (a
    JSON `NaN` or `Infinity`, which Python's parser takes, would upset timers and sampling) and text is Unicode.
    Values are taken as their JSON types only (strict), as OpenAI takes them: `max_tokens: true` is no 1, nor
    `stream: "yes"` a true (pydantic's lax mode would run both); an integer is a number still (`temperature: 0`)."""

    model_config = ConfigDict(allow_inf_nan=False, strict=True)

    @field_validator("*")
    @classmethod
    def unicode_text(cls, value: Any) -> Any:
        check_text(value)
        return value


class OpenAIBody(RequestModel):
    """A body of the OpenAI routes, whose optional fields are nullable: a JSON null stands for the field's
    default (the `openai` package sends null for an argument given as None), as OpenAI and vLLM take it."""

    @model_validator(mode="before")
    @classmethod
    def null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        defaulted = defaulted_fields(cls)
        return {key: value for key, value in data.items() if value is not None or key not in defaulted}


@functools.cache
def defaulted_fields(cls: type[BaseModel]) -> frozenset[str]:
    """The fields of `cls` with a default other than None (looked up once a class, not once a request)."""
    return frozenset(name for name, field in cls.model_fields.items()
                     if not field.is_required() and field.default is not None)


class StrictModel(RequestModel):
    model_config = ConfigDict(extra="forbid")


def constraint_error(error: FieldError | ValidationError) -> PydanticCustomError:
    """The 400 of a bad constraint, naming its part (`field`, after the field that holds it)."""
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        error = FieldError(".".join(str(part) for part in first["loc"]), first["msg"])
    return PydanticCustomError(INVALID_CONSTRAINT, "{message}", {"message": error.message, "field": error.field})


class SamplingConstraint(StrictModel):
    """What an output must match: exactly one of these (server/structured_output.py). The engine masks the tokens
    that would break it, and the output ends when it is complete."""

    regex: str | None = Field(None, description="a regular expression that the whole output matches")
    choice: list[str] | None = Field(None, description="the output is one of these strings")
    json_schema: dict[str, Any] | None = Field(None, description="the output is JSON valid against this schema "
                                               "(strict: no properties it does not name)")
    json_object: bool = Field(False, description="the output is a JSON object")


class Sampling(StrictModel):
    """Sampling settings of one output (defaults as the engine's SamplingParams)."""

    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, description="tokens generated before EOS, a stop token or a stop string may "
                            "end the output (no more than max_tokens; not with a constraint)")
    constraint: SamplingConstraint | None = None

    @field_validator("constraint")
    @classmethod
    def grammar(cls, constraint: SamplingConstraint | None) -> SamplingConstraint | None:
        try:
            sampling_constraint(constraint)
        except FieldError as exc:
            raise constraint_error(exc) from None
        return constraint

    def to_params(self) -> SamplingParams:
        fields = {name: tuple(value) if isinstance(value, list) else value
                  for name, value in self.model_dump(exclude={"constraint"}).items()}
        return SamplingParams(**fields, constraint=sampling_constraint(self.constraint))


class EngineSampling(Sampling):
    """Sampling settings as the manager sends them to an engine process: with log-probabilities, which only the
    OpenAI-compatible routes ask for (SamplingParams.logprobs, prompt_logprobs)."""

    max_tokens: int = Field(128, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    constraint_prefix: list[int] = Field(default_factory=list)


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

    @field_validator("template")
    @classmethod
    def has_a_prompt(cls, template: list[TemplatePiece]) -> list[TemplatePiece]:
        """The first output is generated from the prompt before it, which must hold something: text, or an input
        (whose value brings the text)."""
        head = itertools.takewhile(lambda piece: piece.output is None, template)
        if not any(piece.text or piece.input is not None for piece in head):
            raise ValueError("the prompt before the first output is empty: begin the template with text or an input")
        return template


class SubmitCalls(StrictModel):
    calls: list[CallSpec] = Field(min_length=1)


class SubmittedCalls(BaseModel):
    call_ids: list[str]


class NewSession(BaseModel):
    session_id: str
    session_token: str
    call_limit: int = Field(description="unfinished calls the session may hold at once (the least limit of the queues "
                            "its calls join): a client submits a larger graph in parts, each when room frees")


class CallRoom(BaseModel):
    """How many more calls a session may submit now (`room`), and may hold unfinished at most (`limit`)."""

    room: int
    limit: int


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


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose KV the call did not compute (a shared prefix, cached "
                               "blocks)")


class OutputUsage(BaseModel):
    """The tokens of a call's output, in OpenAI's `usage` shape: `prompt_tokens`, those of the call's context before
    it (its prompt, for its first output); `completion_tokens`, its own."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class VariableValue(BaseModel):
    """A variable's value; for a call's output, how the call generated it, as an OpenAI choice tells it (null for a
    value the client set)."""

    var_id: str
    value: str
    finish_reason: str | None = Field(None, description="`stop` (EOS, a stop string or stop token) or `length` "
                                      "(max_tokens, or the end of the model's context)")
    stop_reason: str | int | None = Field(None, description="vLLM's: the stop string or stop token id that ended it")
    usage: OutputUsage | None = None

    @classmethod
    def of(cls, variable: Variable) -> VariableValue:
        """The answer of a fetch of `variable`, which has its value."""
        generated = variable.generated
        if generated is None:
            return cls(var_id=variable.var_id, value=variable.value)
        prompt, completion = generated.prompt_tokens, generated.completion_tokens
        usage = OutputUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                            prompt_tokens_details=PromptTokensDetails(cached_tokens=generated.cached_tokens))
        return cls(var_id=variable.var_id, value=variable.value, finish_reason=generated.finish_reason,
                   stop_reason=generated.stop_reason, usage=usage)


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


class PrefixCacheReset(BaseModel):
    """What POST /reset_prefix_cache freed (on a server, summed over its engines)."""

    freed_blocks: int = Field(description="cached KV blocks that no context held, now empty")


class ErrorDetail(BaseModel):
    message: str
    type: str
    field: str | None = Field(default=None, description="the offending part of the request, e.g. `max_tokens`")
    param: str | None = Field(default=None, description="the same as `field`, under OpenAI's name")
    code: str | None = Field(default=None, description="which error it is, in a short string (OpenAI's code where "
                             "one applies: `invalid_api_key`, `model_not_found`, `context_length_exceeded`, "
                             "`rate_limit_exceeded`; pydantic's error type for a value that fails validation), "
                             "or null")


class ErrorBody(BaseModel):
    error: ErrorDetail


class EngineStatsBody(RequestModel):
    """An engine's counters, as its heartbeat sends them (the fields of parrot_lc.engine.EngineStats)."""

    prefill_tokens: NonNegativeInt = 0
    decode_tokens: NonNegativeInt = 0
    reused_tokens: NonNegativeInt = 0
    cached_tokens: NonNegativeInt = 0
    kv_blocks_used: NonNegativeInt = 0
    kv_blocks_free: NonNegativeInt = 0
    num_running: NonNegativeInt = 0
    num_waiting: NonNegativeInt = 0
    num_contexts: NonNegativeInt = 0
    num_preemptions: NonNegativeInt = 0
    num_steps: NonNegativeInt = 0
    kv_capacity_tokens: NonNegativeInt = 0


class RegisterEngine(RequestModel):
    url: HttpUrl  # where the manager reaches the engine: http(s), with a host
    stats: EngineStatsBody = Field(default_factory=EngineStatsBody)

    @field_validator("url")
    @classmethod
    def plain_engine_url(cls, url: HttpUrl) -> HttpUrl:
        """An engine's address is a base URL the manager appends its paths to: user info would travel to the
        engine with every call, and a query or fragment would be dropped or mangled by them."""
        if url.username is not None or url.password is not None:
            raise ValueError("an engine URL carries no user info (the manager sends the engine key instead)")
        if url.query is not None or url.fragment is not None:
            raise ValueError("an engine URL has no query or fragment: the manager adds its own paths to it")
        if url.port == 0:
            raise ValueError("an engine URL needs the port the engine listens on")
        return url


class EngineRef(BaseModel):
    """A registered engine: its heartbeats go to /api/engines/{name}/heartbeat with `X-Engine-Token: token`, so
    that a heartbeat of another engine process (one dropped, or registered with an earlier run of the server)
    cannot keep this registration alive."""

    name: str
    token: str


# ---- OpenAI-compatible ---------------------------------------------------------------------------------

# Fields of OpenAI's API that this server does not implement, with the values that ask for nothing (which clients
# send anyway: LangChain's ChatOpenAI, for one, may send `n: 1` or `logit_bias: {}`). Any other value is
# refused (400) rather than silently ignored; so are vLLM's extension fields (its "extra parameters", which clients
# send through the openai package's `extra_body`) that would change the answer, with their neutral values (vLLM's
# defaults; `skip_special_tokens` and `include_stop_str_in_output` as this server decodes). Other fields that the
# server does not know (`user`, `metadata`, `store`, `service_tier`, vLLM's `priority` or `request_id`...) change
# nothing of the answer: ignored, as vLLM does.
UNIMPLEMENTED: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,),
    # vLLM's
    "guided_grammar": (None,), "guided_decoding_backend": (None, "xgrammar"), "guided_whitespace_pattern": (None,),
    "structured_outputs": (None,), "structural_tag": (None,), "use_beam_search": (None, False),
    "length_penalty": (None, 1.0, 1), "prompt_logprobs": (None,), "truncate_prompt_tokens": (None,),
    "allowed_token_ids": (None,), "bad_words": (None, []), "logits_processors": (None, []),
    "skip_special_tokens": (None, True), "spaces_between_special_tokens": (None, True),
    "include_stop_str_in_output": (None, False), "add_special_tokens": (None, True),
    "return_tokens_as_token_ids": (None, False),
}
# A chat has no `echo` (a completion's field; vLLM's chat echo of the last message is not implemented); its tools
# are implemented (a completion's are not). vLLM's fields of a chat's template are not implemented either.
CHAT_UNIMPLEMENTED = {**{k: v for k, v in UNIMPLEMENTED.items() if k not in ("tools", "tool_choice")},
                      "echo": (None, False), "add_generation_prompt": (None, True),
                      "continue_final_message": (None, False), "chat_template": (None,),
                      "chat_template_kwargs": (None, {}), "documents": (None, [])}
MAX_CHOICES = 128  # choices one request may ask for (`n`; OpenAI's limit)


def asks_for_nothing(value: Any, neutral: tuple[Any, ...]) -> bool:
    """Whether `value` is one of `neutral`, type and all (`0` is no `false`: `logprobs: 0` asks for log-probs)."""
    return any(type(value) is type(n) and value == n for n in neutral)


def not_supported(field: str, message: str) -> PydanticCustomError:
    """The error of a request for what the server does not implement; `field` goes after the error's location."""
    return PydanticCustomError(NOT_SUPPORTED, message, {"field": field})


class StreamOptions(RequestModel):
    include_usage: bool = Field(False, description="a last chunk with the request's usage")
    continuous_usage_stats: bool = Field(False, description="with include_usage, every chunk carries the usage so "
                                         "far (vLLM's extension)")


class JSONSchemaFormat(RequestModel):
    """The `json_schema` of a response format."""

    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema that the output is valid against")
    strict: bool | None = Field(None, description="accepted: the output always follows the schema, strictly "
                                "(no properties it does not name)")


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class OpenAISampling(OpenAIBody):
    """The sampling fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = Field(None, description="the served model, as GET /v1/models names it; unset: that one")
    max_tokens: int | None = Field(None, ge=1, description="unset: a chat's reply may take what the context leaves")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="sample from the k most likely tokens (vLLM's extension); 0 or -1: all")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="drop tokens less likely than min_p times the "
                                "most likely one (vLLM's extension)")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="subtracted from the logit of every "
                                           "token the output holds already")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="times a token's count in the "
                                            "output so far, subtracted from its logit")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="a positive logit of a token of "
                                             "the prompt or output is divided by it, a negative one multiplied "
                                             "(vLLM's extension)")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="keep generating past EOS up to max_tokens (as vLLM's extension)")
    n: int = Field(1, ge=1, description=f"choices of each prompt, at most {MAX_CHOICES}: the prompt is filled once "
                   "and forked; with a seed, choice i samples with seed + i")
    best_of: int | None = Field(None, ge=1, description="only as many as `n` (no choice is generated to be dropped)")
    response_format: ResponseFormat | None = Field(None, description="text (the default), json_object or json_schema: "
                                                   "the output is constrained to match")
    stop_token_ids: list[int] | None = Field(None, description="token ids that end the output, their text left out "
                                             "(vLLM's extension)")
    min_tokens: int = Field(0, ge=0, description="tokens generated before EOS, a stop token or a stop string may end "
                            "the output (vLLM's extension; not with a constraint)")
    guided_json: dict[str, Any] | str | None = Field(None, description="the output is JSON valid against this schema, "
                                                     "an object or its JSON text (vLLM's extension)")
    guided_regex: str | None = Field(None, description="the output matches this regular expression (vLLM's extension)")
    guided_choice: list[str] | None = Field(None, description="the output is one of these strings (vLLM's extension)")

    unimplemented: ClassVar[dict[str, tuple[Any, ...]]] = UNIMPLEMENTED
    _constraint: Constraint | None = PrivateAttr(None)  # of response_format or a guided field, once checked

    @field_validator("response_format", mode="plain", json_schema_input_type=ResponseFormat | None)
    @classmethod
    def response_format_parts(cls, value: Any) -> ResponseFormat | None:
        """A response format; a bad one is a 400 naming its part (its grammar is checked in `one_constraint`)."""
        try:
            return None if value is None else ResponseFormat.model_validate(value)
        except ValidationError as exc:
            raise constraint_error(exc) from None

    @model_validator(mode="after")
    def one_constraint(self) -> "OpenAISampling":
        """What the output must match: response_format's or a guided field's grammar, at most one; a bad one, or a
        second one, is a 400 naming it."""
        try:
            self._constraint = openai_constraint(self.response_format,
                                                 {field: getattr(self, field) for field in GUIDED_KINDS})
        except FieldError as exc:
            raise constraint_error(exc) from None
        return self

    @model_validator(mode="before")
    @classmethod
    def refuse_unimplemented(cls, data: Any) -> Any:
        """Refuses a field of the class's `unimplemented` that asks for something, naming it."""
        for name, neutral in cls.unimplemented.items():
            if isinstance(data, dict) and name in data and not asks_for_nothing(data[name], neutral):
                values = " or ".join(json.dumps(n) for n in neutral if n is not None)
                raise not_supported(name, "not supported by this server yet: leave it out"
                                    + (f", or send {values}" if values else ""))
        return data

    @model_validator(mode="after")
    def stream_options_with_stream(self) -> "OpenAISampling":
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("needs_stream", "stream_options needs stream: true (as OpenAI and vLLM answer)",
                                      {"field": "stream_options"})
        return self

    @model_validator(mode="after")
    def choices_within_limits(self) -> "OpenAISampling":
        if self.n > MAX_CHOICES:
            raise not_supported("n", f"at most {MAX_CHOICES} choices a request (OpenAI's limit)")
        if self.best_of not in (None, self.n):
            raise not_supported("best_of", "only best_of equal to n is supported: every choice generated is returned")
        return self

    def to_params(self, max_tokens: int) -> SamplingParams:
        """The engine's sampling settings; `max_tokens` as the server settled it (see Prompts.check)."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=max(self.top_k, 0), min_p=self.min_p or 0.0,
                              presence_penalty=self.presence_penalty or 0.0,
                              frequency_penalty=self.frequency_penalty or 0.0,
                              repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                              seed=self.seed, stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()),
                              ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, constraint=self._constraint,
                              **self.logprob_params())

    @abstractmethod
    def logprob_params(self) -> dict[str, int | None]:
        """SamplingParams' `logprobs` and `prompt_logprobs`, as the endpoint's own fields ask for them."""


def check_top_logprobs(field: str, value: int | None) -> None:
    """Refuses more most likely tokens than OpenAI gives (400, as OpenAI answers)."""
    if value is not None and value > MAX_LOGPROBS:
        raise not_supported(field, f"at most {MAX_LOGPROBS} most likely tokens a position (OpenAI's limit)")


class CompletionRequest(OpenAISampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text or token ids, or a list of either: one choice per prompt (n each), in order")
    max_tokens: int | None = Field(None, ge=0, description="unset: 16 (OpenAI's default); 0 only with `echo`: the "
                                   "prompt (and its logprobs) alone")
    echo: bool = Field(False, description="the prompt before each choice's text (and its tokens' logprobs)")
    logprobs: int | None = Field(None, ge=0, description=f"each token's log-probability and the k most likely "
                                 f"tokens' (at most {MAX_LOGPROBS}); with `echo`, the prompt's tokens' too")

    @field_validator("logprobs", mode="before")
    @classmethod
    def false_asks_for_none(cls, value: Any) -> Any:
        """`logprobs: false`, which clients send for none (it was the neutral value before logprobs were
        implemented), is no request for 0 most likely tokens."""
        return None if value is False else value

    @model_validator(mode="after")
    def logprobs_within_limits(self) -> "CompletionRequest":
        check_top_logprobs("logprobs", self.logprobs)
        if self.max_tokens == 0 and not self.echo:
            raise PydanticCustomError("echo_only", "max_tokens may be 0 only with echo: a completion of nothing",
                                      {"field": "max_tokens"})
        return self

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: the one it sends, or each of its list's."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    def logprob_params(self) -> dict[str, int | None]:
        # The engine computes the prompt for its log-probabilities to echo, or for an echo alone (max_tokens 0): a
        # request that generates nothing ends once its prompt is computed.
        prompt = self.logprobs if self.echo and self.logprobs is not None else 0 if self.max_tokens == 0 else None
        return {"logprobs": self.logprobs, "prompt_logprobs": prompt}


class TextPart(RequestModel):
    """A text part of a chat message's content: the only kind of part this server reads."""

    type: Literal["text"]
    text: str


TEXT_PARTS = TypeAdapter(list[TextPart])


class FunctionCall(RequestModel):
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class MessageToolCall(RequestModel):
    """A call an assistant's message made (sent back with the chat's next turn)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[MessageToolCall] | None = Field(None, description="an assistant's calls")
    tool_call_id: str | None = Field(None, description="a tool message's: the call it answers")
    name: str | None = None

    @field_validator("content", mode="plain", json_schema_input_type=str | list[TextPart] | None)
    @classmethod
    def text_parts(cls, content: Any) -> str | list[TextPart] | None:
        """A string, or content parts of text. A part of another kind (an image, audio, a file) is refused by name
        rather than dropped from the prompt; a bad text part is named by its place (a plain union would report it
        as a mismatch of each type that `content` may have). Being the whole validation of `content`, it checks
        the text itself (see RequestModel)."""
        if content is None or isinstance(content, str):
            check_text(content)
            return content
        for index, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise not_supported(f"{index}.type", f"content parts of type {kind!r} are not supported by this "
                                    "server yet: send text parts")
        return TEXT_PARTS.validate_python(content)

    @model_validator(mode="after")
    def content_given(self) -> "ChatMessage":
        """OpenAI's rules: every message has content, but an assistant's that makes tool calls, and a user's has a
        part at least (a 400 naming it, as OpenAI answers, rather than a turn of nothing in the prompt)."""
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError("missing_content", f"a {self.role} message needs content (a string or text "
                                      "parts; null only in an assistant's message with tool_calls)",
                                      {"field": "content"})
        if self.role == "user" and self.content == []:
            raise PydanticCustomError("too_short", "a user message needs a content part at least (a string, or "
                                      "text parts)", {"field": "content"})
        return self

    @model_validator(mode="after")
    def tool_message_answers_a_call(self) -> "ChatMessage":
        """A tool message names the call it answers (OpenAI's rule): a chat template pairs them by it."""
        if self.role == "tool" and self.tool_call_id is None:
            raise PydanticCustomError("missing", "a tool message needs tool_call_id: the id of the call it answers",
                                      {"field": "tool_call_id"})
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)  # as vLLM joins them
        return self.content or ""

    def template_message(self) -> dict[str, Any]:
        """The message as chat templates take it (OpenAI's shape; a developer message is a system one)."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.role == "tool":
            message.update({key: value for key, value in (("tool_call_id", self.tool_call_id), ("name", self.name))
                            if value is not None})
        return message


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="the arguments' JSON schema (an object's)")
    strict: bool | None = Field(None, description="accepted; a forced call always follows the schema")


class ToolDefinition(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: FunctionName


TOOL_CHOICES = ("none", "auto", "required")


class ChatWithTools(OpenAIBody):
    """Chat messages and the tools they may call, as the chat template renders them (server/tool_calls.py)."""

    messages: list[ChatMessage] | None = None
    tools: list[ToolDefinition] | None = Field(None, min_length=1, description="functions the model may call "
                                               "(none: leave it out, as OpenAI refuses an empty list)")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="auto (the default with tools), none, required or a named function: the last two are "
        "constrained to a valid call")
    parallel_tool_calls: bool = Field(True, description="false: at most one call a reply")

    @field_validator("tool_choice", mode="plain",
                     json_schema_input_type=Literal["none", "auto", "required"] | NamedToolChoice | None)
    @classmethod
    def one_choice(cls, choice: Any) -> str | NamedToolChoice | None:
        """A mode or a named function; anything else is named as `tool_choice` itself (a plain union would name it
        by the type it failed to be)."""
        if choice is None or choice in TOOL_CHOICES:
            return choice
        if isinstance(choice, dict):
            return NamedToolChoice.model_validate(choice)
        raise PydanticCustomError("tool_choice", 'one of {choices}, or {"type": "function", "function": {"name": ...}}',
                                  {"choices": ", ".join(TOOL_CHOICES)})

    def template_messages(self) -> list[dict[str, Any]]:
        return [message.template_message() for message in self.messages or []]

    def tool_request(self) -> ToolRequest | None:
        """The tools and how they may be called, checked; None without tools."""
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, BaseModel) else self.tool_choice
        return ToolRequest.of([tool.model_dump(exclude_none=True) for tool in self.tools or []], choice,
                              self.parallel_tool_calls)


class ChatCompletionRequest(OpenAISampling, ChatWithTools):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="each generated token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, description=f"and the k most likely tokens' (at most {MAX_LOGPROBS}; "
                                     "needs `logprobs`)")

    unimplemented: ClassVar[dict[str, tuple[Any, ...]]] = CHAT_UNIMPLEMENTED

    @model_validator(mode="after")
    def logprobs_within_limits(self) -> "ChatCompletionRequest":
        check_top_logprobs("top_logprobs", self.top_logprobs)
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError("needs_logprobs", "top_logprobs needs logprobs: true", {"field": "top_logprobs"})
        return self

    def logprob_params(self) -> dict[str, int | None]:
        return {"logprobs": (self.top_logprobs or 0) if self.logprobs else None, "prompt_logprobs": None}


class TokenizeRequest(ChatWithTools):
    """A prompt, or chat messages, to tokenize as the completion routes do (vLLM's /tokenize)."""

    model: str | None = Field(None, description="the served model, as GET /v1/models names it; unset: that one")
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = Field(True, description="messages: end with the start of the assistant's turn")
    add_special_tokens: bool = Field(True, description="the tokenizer's own special tokens (a BOS), which the "
                                     "completion routes add to prompts and rendered messages alike")

    @model_validator(mode="after")
    def prompt_or_messages(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("prompt_or_messages", "send either `prompt` or `messages`", {"field": "prompt"})
        return self


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int  # the longest context a request may have, in tokens (Prompts.context)


class TokenizerInfo(BaseModel):
    """The tokenizer as clients that tokenize through /tokenize need to know it (vLLM's /tokenizer_info)."""

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    model_max_length: int  # the longest context a request may have, in tokens (Prompts.context)


class DetokenizeRequest(RequestModel):
    model: str | None = Field(None, description="the served model, as GET /v1/models names it; unset: that one")
    tokens: list[int] = Field(description="token ids of the model's vocabulary")


class DetokenizeResponse(BaseModel):
    prompt: str
