"""Every setting of parrot_lc, read once (CLI flags, then PARROT_* environment variables, then a config file) and
passed down."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence
from urllib.parse import urlsplit

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

# Which sequences of a step read a shared prefix's KV once (`EngineSettings.shared_prefix_attention`).
SharedPrefixRule = Literal["groups", "whole_batch", "off"]
# How a float32 model on a CPU holds its linear layers' weights (`EngineSettings.cpu_weight_format`).
CpuWeightFormat = Literal["auto", "float32", "float16", "bfloat16", "int8"]


class EngineSettings(BaseSettings):
    """Settings of one engine: the model replica, its KV cache and its batching."""

    model_config = SettingsConfigDict(env_prefix="PARROT_", extra="ignore")

    model: str = Field(
        "smollm2",
        description="`smollm2` (embedded default), `tiny` (random weights, for tests), `llama3-8b-dummy` (Llama-3-8B's "
        "shapes, random weights, for benchmarks), a Hugging Face checkpoint directory or a .gguf file",
    )
    load_format: Literal["auto", "dummy"] = Field(
        "auto", description="`dummy`: random weights of the checkpoint's shapes, for benchmarks (`tiny` always is)"
    )
    device: str = Field("auto", description="`cpu`, `cuda`, `cuda:N`, or `auto` (cuda when available)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and KV cache dtype; `auto` is bfloat16 on cuda, float32 on cpu"
    )
    cpu_weight_format: CpuWeightFormat = Field(
        "auto", description="how a float32 model on a CPU holds its linear layers' weights (engine/cpu_weights.py); "
        "`auto`, by the CPU's features: float16 with F16C (every AVX2 CPU: float32's answers, whatever a request is "
        "batched with, half the bytes a decode step reads), else float32; bfloat16 only when named (faster products "
        "with AMX, but answers that depend on the batch)"
    )
    block_size: int = Field(16, ge=1, description="tokens per KV cache block")
    kv_cache_bytes: int | None = Field(
        None, ge=1, description="KV cache size in bytes; unset: kv_cache_memory_fraction of free GPU memory, "
        "or 512 MiB on cpu"
    )
    kv_cache_memory_fraction: float = Field(
        0.9, gt=0, le=1, description="fraction of free GPU memory (after weights) given to the KV cache"
    )
    prefix_caching: bool = Field(
        True, description="reuse the KV of any earlier prompt that begins with the same tokens, whoever sent it: full "
        "blocks are cached by their tokens and every token before them, kept while memory allows (least recently "
        "used go first), and prompts that arrive together compute their common blocks once; off: only forks share KV"
    )
    shared_prefix_attention: SharedPrefixRule = Field(
        "groups", description="which sequences of a step read a shared prefix's KV once, not each on its own: "
        "`groups`: every group whose block tables begin with the same blocks (forks of one context, prompts that "
        "took the same cached blocks), several prefixes in one step; `whole_batch`: only a prefix common to every "
        "sequence of the step (vLLM's cascade attention rule, for benchmarks); `off`: none"
    )
    max_num_batched_tokens: int = Field(2048, ge=1, description="token budget of one engine step")
    max_num_seqs: int = Field(256, ge=1, description="most sequences in one engine step")
    background_prefill_tokens: int = Field(
        2048, ge=1, description="in a step that decodes for a more important request, the most prompt tokens that "
        "less important requests prefill: a latency-critical stream keeps its pace while background work fills its "
        "prompts in smaller pieces (not too small: each step that prefills costs a fixed part too, ~30 ms on an H100 "
        "for a 7B model, which a stream pays once per piece)"
    )
    attention_backend: Literal["auto", "torch", "cpu", "triton", "cuda"] = Field(
        "auto", description="attention implementation; `auto`: cuda on a GPU where its kernel is built, else triton; "
        "on a CPU the compiled decode kernel (cpu) where it is built, else the torch reference. cuda: the CUDA "
        "kernel for decode steps that share prefixes, Triton for the rest; cpu: compiled decode steps, the torch "
        "reference for the rest"
    )
    overlap_steps: bool | None = Field(
        None, description="launch each step before reading back the tokens of the step before, so that the engine's "
        "Python work (scheduling, detokenizing) runs while the device computes; unset: on a GPU (on a CPU nothing "
        "overlaps, and a request that stops computes one token for nothing)"
    )
    cuda_graphs: bool = Field(True, description="replay decode steps from CUDA graphs (cuda, triton backend)")
    step_log: Path | None = Field(
        None, description="append one JSON line per engine step to this file (its start, host milliseconds, tokens "
        "prefilled and decoded, events, requests): a timeline of where the engine's time goes"
    )
    seed: int = Field(0, description="seed of random weights (tiny) and of unseeded sampling")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "parrot_lc", description="where converted GGUF checkpoints are cached"
    )

    @field_validator("device")
    @classmethod
    def usable_device(cls, device: str) -> str:
        """A device the engine can run on here: a typo (`gpu`), or cuda where torch sees no CUDA device, is a
        settings error naming where it came from, not a traceback from the engine's first tensor."""
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError(f"{device!r} is none of `cpu`, `cuda`, `cuda:N`, `auto`")
        if device.startswith("cuda"):
            import torch  # here only: the settings of a process that runs no engine need no torch

            count, index = torch.cuda.device_count(), int(device.partition(":")[2] or 0)
            if index >= count:
                raise ValueError(f"{device!r}, but torch {torch.__version__} sees {count} CUDA devices here")
        return device

    @field_validator("step_log")
    @classmethod
    def writable_step_log(cls, path: Path | None) -> Path | None:
        """A file the engine can append to: checked here, so that a typo in the folder is a settings error before
        the model loads, not a traceback once the engine opens the file."""
        if path is None:
            return path
        if path.is_dir():
            raise ValueError(f"{path} is a directory; name a file (in it, say {path / 'steps.jsonl'})")
        if not path.parent.is_dir():
            raise ValueError(f"{path}: folder {path.parent} does not exist")
        if not os.access(path if path.exists() else path.parent, os.W_OK):
            raise ValueError(f"{path} cannot be written here (permission denied)")
        return path

    @field_validator("cache_dir")
    @classmethod
    def creatable_cache_dir(cls, path: Path, info: ValidationInfo) -> Path:
        """A cache folder that exists or can be made, for the models that are written into it (a .gguf file's
        conversion, the dummy models' configs); a model that never uses it (`tiny`, a checkpoint directory) does
        not need one, so an unwritable home folder is no error there. Made here rather than merely checked: only
        mkdir tells (root may write anywhere, by permissions, yet nothing can be made under /proc)."""
        from parrot_lc.engine.loader import writes_into_cache_dir  # here only: it imports torch

        model = info.data.get("model")
        if model is None or not writes_into_cache_dir(model):
            return path
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} is a file, not a folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"{path} cannot be created ({exc.strerror or exc})") from None
        return path


def nonempty_key(key: str | None) -> str | None:
    """A key given empty is refused rather than taken for none: `PARROT_API_KEY=${KEY}` in a compose file, with KEY
    unset, would otherwise open the API (or an engine) without a word."""
    if key is not None and not key.strip():
        raise ValueError("empty; leave it unset to run without a key")
    return key


def read_api_keys(path: Path) -> list[str]:
    """The keys of an API keys file: one a line, blank lines and `#` comments left out. A file that is missing,
    unreadable or holds no key is a ValueError naming it: an empty file must not open the API by mistake."""
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a file of keys")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{path} cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ValueError(f"{path} holds no key (one a line; `#` comments)")
    return keys


class ServerSettings(BaseSettings):
    """Settings of the Parrot server (the manager and its HTTP API)."""

    model_config = SettingsConfigDict(env_prefix="PARROT_", extra="ignore")

    host: str = Field("127.0.0.1", description="address to bind (loopback by default)")
    port: int = Field(9000, ge=0, le=65535, description="TCP port (0: any free port)")
    engines: int = Field(1, ge=0, description="local engines (model replicas) the manager drives; 0: remote only")
    engine_processes: bool | None = Field(
        None, description="run each local engine in a process of its own: its Python work (scheduling, sampling, "
        "detokenizing) then takes no turns on the HTTP server's interpreter lock, which hundreds of streams need; "
        "unset: when the engine runs on a GPU"
    )
    engine_timeout: float = Field(5.0, gt=0, description="seconds without a heartbeat before a remote engine is dropped")
    engine_key: str | None = Field(
        None, description="the key engine processes register with (not a client key), which the manager sends back "
        "to them; unset: the server takes no remote engines (an engine receives prompts and writes answers)"
    )
    max_remote_engines: int = Field(
        64, ge=1, description="remote engines the server holds at most; more registrations get 409 (an engine that "
        "registers again at the same URL replaces its old registration)"
    )
    api_key: str | None = Field(
        None, description="if set, the API (sessions, calls, /v1, /metrics) needs `Authorization: Bearer KEY`; "
        "/health and the OpenAPI docs (/docs, /openapi.json) stay open; an empty value is refused (leave it unset "
        "for an open API)"
    )
    api_keys_file: Path | None = Field(
        None, description="a file of API keys, one a line (`#` comments), each accepted like --api-key"
    )
    metrics_need_api_key: bool = Field(
        True, description="whether /metrics needs the API key too (false: open to a scraper without one)"
    )
    max_request_bytes: int = Field(2 * 2**20, ge=1024, description="larger request bodies get 413")
    header_timeout: float = Field(
        10.0, gt=0, allow_inf_nan=False, description="seconds a client has to send a request's headers, from "
        "connecting (or from the request's first byte, on a kept-alive connection); slower connections are closed"
    )
    max_queued_calls: int = Field(
        4096, ge=1, description="unfinished calls (graph calls and OpenAI-compatible requests) the server holds; "
        "more get 429 with Retry-After"
    )
    max_queued_calls_per_session: int = Field(
        2048, ge=1, description="unfinished calls one session (or one OpenAI-compatible request's) may hold; more get "
        "429 with Retry-After"
    )
    max_queued_calls_per_key: int | None = Field(
        None, ge=1, description="unfinished calls the sessions and requests of one API key may hold together, so that "
        "one client cannot take the whole queue; unset: no limit of its own (max_queued_calls holds)"
    )
    max_variables_per_session: int = Field(
        16384, ge=1, description="Semantic Variables one session may hold; more are refused (400)"
    )
    session_idle_timeout: float = Field(
        3600.0, gt=0, allow_inf_nan=False, description="seconds after which a session that no request named and "
        "that has no unfinished call is deleted (its client went away without deleting it)"
    )
    max_prefixes_per_engine: int = Field(64, ge=1, description="warm prefix contexts kept per engine (LRU)")
    prefix_cache_fraction: float = Field(
        0.25, ge=0, le=1, description="the share of an engine's KV cache that warm prefix contexts may hold; past "
        "it the least recently used idle ones are freed (running requests get the rest, never preempted for them)"
    )
    app_centric: bool = Field(
        True, description="Parrot's scheduling: shared prompt prefixes filled once and forked, priorities from the "
        "deduced objectives; off: request-level serving (each call on its own, first come first served), the "
        "baseline that benchmarks compare against"
    )
    max_background_calls_per_engine: int = Field(
        64, ge=1, description="calls that are not latency-critical running at once on one engine; the rest queue, "
        "so latency-critical calls always find room"
    )
    openai_engine: str | None = Field(
        None, description="base URL of an OpenAI-compatible server (vLLM, SGLang) to use as one more engine"
    )
    openai_engine_model: str | None = Field(None, description="the model name at that server (default: --model)")
    openai_engine_api_key: str | None = Field(None, description="API key of that server")

    @field_validator("api_key", "engine_key")
    @classmethod
    def nonempty_key(cls, key: str | None) -> str | None:
        return nonempty_key(key)

    @field_validator("api_keys_file")
    @classmethod
    def readable_api_keys_file(cls, path: Path | None) -> Path | None:
        """A keys file that exists and holds a key, checked here: a settings error before the model loads, not a
        traceback once the app is built (api_keys() reads it again then)."""
        if path is not None:
            read_api_keys(path)
        return path

    def api_keys(self) -> list[str]:
        """Every accepted API key: --api-key and the lines of --api-keys-file (none: the API is open)."""
        keys = [self.api_key] if self.api_key else []
        if self.api_keys_file is not None:
            keys += read_api_keys(self.api_keys_file)
        return keys


class EngineProcessSettings(BaseSettings):
    """Settings of a remote engine process (`parrot-lc engine`) that serves a manager."""

    model_config = SettingsConfigDict(env_prefix="PARROT_ENGINE_", extra="ignore")

    manager: str = Field("http://127.0.0.1:9000", description="URL of the manager to register with")
    host: str = Field("127.0.0.1", description="address this engine binds")
    port: int = Field(9100, ge=1, le=65535, description="port this engine listens on")
    advertise_url: str | None = Field(None, description="URL the manager reaches this engine at (default from host/port)")
    engine_key: str | None = Field(
        None, description="the manager's --engine-key: sent to register, and required of every caller of this "
        "engine but /health"
    )
    heartbeat_interval: float = Field(1.0, gt=0, description="seconds between heartbeats")
    header_timeout: float = Field(
        10.0, gt=0, allow_inf_nan=False, description="seconds a caller has to send a request's headers, from "
        "connecting (or from the request's first byte, on a kept-alive connection); slower connections are closed"
    )

    @field_validator("engine_key")
    @classmethod
    def nonempty_engine_key(cls, key: str | None) -> str | None:
        return nonempty_key(key)

    @field_validator("manager", "advertise_url")
    @classmethod
    def http_url(cls, url: str | None) -> str | None:
        """An http(s) URL with a host: one that can never be reached (`notaurl`) is a settings error at once, not
        a registration retried for ever."""
        if url is not None and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname):
            raise ValueError(f"{url!r} is no http(s) URL with a host (e.g. http://127.0.0.1:9000)")
        return url


class ProcessSettings(BaseSettings):
    """Settings of a long-running process (`parrot-lc serve`, `parrot-lc engine`): its logs and how it stops."""

    model_config = SettingsConfigDict(env_prefix="PARROT_", extra="ignore")

    log_format: Literal["text", "json"] = Field(
        "text", description="`json`: one JSON object per log line, with the request id of the HTTP request it is about"
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, description="seconds that running calls get to finish after SIGTERM (new work gets 503 meanwhile); "
        "then they are cancelled"
    )


class ConfigFileSettings(BaseSettings):
    """Where the other settings may also come from: a file, below flags and environment variables."""

    model_config = SettingsConfigDict(env_prefix="PARROT_", extra="ignore")

    config: Path | None = Field(
        None, description="a TOML, YAML or JSON file of settings by name (`max_num_seqs = 64`); flags and PARROT_* "
        "variables win over it"
    )


ALL_SETTINGS: tuple[type[BaseSettings], ...] = (
    EngineSettings, ServerSettings, EngineProcessSettings, ProcessSettings, ConfigFileSettings
)
# The settings of each `parrot-lc` command, so its flags: `serve` and `engine` each have a --host, a --port...,
# read into different classes (PARROT_HOST, PARROT_ENGINE_HOST).
COMMAND_SETTINGS: dict[str, tuple[type[BaseSettings], ...]] = {
    "serve": (EngineSettings, ServerSettings, ProcessSettings, ConfigFileSettings),
    "engine": (EngineSettings, EngineProcessSettings, ProcessSettings, ConfigFileSettings),
    "demo": (EngineSettings, ConfigFileSettings),
}
CONFIG_FORMATS = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML", ".json": "JSON"}


class SettingsError(ValueError):
    """A setting that cannot be used; the message names where it came from (flag, variable or file) and the field."""


def setting_error(cls: type[BaseSettings], name: str, problem: str) -> SettingsError:
    """A SettingsError about a value that proved unusable only once used (a KV cache too large to allocate), after
    load_settings: named by its flag and its variable, since where it came from is no longer known."""
    variable = f"{cls.model_config['env_prefix']}{name.upper()}"
    return SettingsError(f"--{name.replace('_', '-')} (or {variable}): {name}: {problem}")


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings in a TOML, YAML or JSON file (told by its suffix): one table of setting names (`max_num_seqs`,
    or `max-num-seqs` as the flag spells it) to values. Any name that no settings class knows is an error, so that
    a typo is not silently ignored; a name of another process kind's settings is left to that kind."""
    fmt = CONFIG_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SettingsError(f"config file {path}: unknown format {path.suffix!r}; use one of {', '.join(CONFIG_FORMATS)}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"config file {path}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = {"TOML": tomllib.loads, "YAML": yaml.safe_load, "JSON": json.loads}[fmt](text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise SettingsError(f"config file {path}: not valid {fmt}: {exc}") from None
    if data is None:  # an empty YAML file
        data = {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path}: expected a table of settings by name, got {type(data).__name__}")
    values = {str(key).replace("-", "_"): value for key, value in data.items()}
    known = {name for cls in ALL_SETTINGS for name in cls.model_fields} - {"config"}
    for name in values:
        if name not in known:
            raise SettingsError(f"config file {path}: {name}: unknown setting")
    return values


def load_settings(
    classes: Sequence[type[BaseSettings]], flags: Mapping[str, Any], config: Path | None = None
) -> list[BaseSettings]:
    """One instance of each class, each setting from its flag (`flags`, by field name; None: not given), else its
    PARROT_* environment variable, else the config file, else its default. Raises SettingsError naming the source
    and the field of the first bad value."""
    file_values = read_config_file(config) if config is not None else {}
    return [_load(cls, flags, file_values, config) for cls in classes]


def _load(cls: type[BaseSettings], flags: Mapping[str, Any], file_values: Mapping[str, Any], config: Path | None):
    fields, prefix = cls.model_fields, cls.model_config["env_prefix"]
    given = {name: value for name, value in flags.items() if name in fields and value is not None}
    from_file = {name: value for name, value in file_values.items() if name in fields}
    from_env = EnvSettingsSource(cls)()
    sources = {name: f"config file {config}" for name in from_file}
    sources |= {name: f"environment variable {prefix}{name.upper()}" for name in from_env}
    sources |= {name: f"--{name.replace('_', '-')}" for name in given}
    try:
        # pydantic-settings puts keyword arguments above the environment; the environment's values go in too, so
        # that they also win over the file's.
        return cls(**{**from_file, **from_env, **given})
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else cls.__name__
        raise SettingsError(f"{sources.get(name, 'default')}: {name}: {error['msg']}") from None


def settings_table() -> str:
    """The README's table of settings, generated from the settings classes (`parrot-lc settings`): each row with
    the commands that take it, since `serve` and `engine` have flags of the same name that are different settings."""
    rows = ["| setting | commands | environment variable | default | what it is |", "|---|---|---|---|---|"]
    for cls in ALL_SETTINGS:
        prefix = cls.model_config["env_prefix"]
        commands = ", ".join(f"`{command}`" for command, classes in COMMAND_SETTINGS.items() if cls in classes)
        for name, field in cls.model_fields.items():
            default = "" if field.default is None else f"`{field.default}`"
            if name == "cache_dir":
                default = "`~/.cache/parrot_lc`"
            rows.append(f"| `--{name.replace('_', '-')}` | {commands} | `{prefix}{name.upper()}` | {default} | "
                        f"{field.description} |")
    return "\n".join(rows)
