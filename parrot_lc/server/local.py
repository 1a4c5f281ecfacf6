"""A Parrot server in this process: engines, manager and uvicorn on a loopback port, in a background
thread. For notebooks, tests and the in-process mode of the clients."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from dataclasses import asdict

import torch
import uvicorn

from parrot_lc.engine.async_engine import AsyncEngine, EngineDriver
from parrot_lc.engine.engine import LLMEngine
from parrot_lc.engine.errors import ModelLoadError
from parrot_lc.engine.process_engine import ProcessEngine
from parrot_lc.server.app import create_app
from parrot_lc.server.connections import bound_socket, uvicorn_options
from parrot_lc.engine.loader import load_model_info
from parrot_lc.server.manager import ModelInfo, ParrotManager
from parrot_lc.server.openai_engine import OpenAIEngine
from parrot_lc.settings import EngineSettings, ServerSettings, setting_error

log = logging.getLogger("parrot_lc.server")


def build_manager(engine_settings: EngineSettings, server_settings: ServerSettings) -> ParrotManager:
    """A manager with its local engines (none: it waits for remote engines to register, or has an OpenAI-compatible
    one). Without a local engine, an engine key or an OpenAI-compatible engine it could never answer: a
    SettingsError naming --engines, before any model loads."""
    if not server_settings.engines and server_settings.engine_key is None and server_settings.openai_engine is None:
        raise setting_error(ServerSettings, "engines", "0 local engines and no way to get one: give --engine-key "
                            "(remote engines register with it) or --openai-engine")
    processes = server_settings.engine_processes
    if processes is None:
        processes = engine_settings.device.startswith("cuda") or (engine_settings.device == "auto"
                                                                  and torch.cuda.is_available())

    def local_engine() -> AsyncEngine | ProcessEngine:
        return ProcessEngine(engine_settings) if processes else AsyncEngine(LLMEngine(engine_settings))

    engines = [local_engine() for _ in range(server_settings.engines)]
    if engines:
        info = ModelInfo(engine_settings.model, engines[0].tokenizer, engines[0].vocab_size, engines[0].max_context)
    else:
        config, tokenizer = load_model_info(engine_settings.model, engine_settings.cache_dir)
        info = ModelInfo(engine_settings.model, tokenizer, config.vocab_size, config.max_position_embeddings)
    if info.tokenizer is None:  # the routes read prompts and write replies with it
        for engine in engines:
            engine.close()
        raise ModelLoadError(f"model {engine_settings.model!r} has no tokenizer (tokenizer.json or "
                             "tokenizer_config.json beside its weights): the server needs one to read prompts and "
                             "write text")
    if server_settings.openai_engine is not None:
        engines.append(OpenAIEngine(server_settings.openai_engine, server_settings.openai_engine_model or info.name,
                                    info.tokenizer, server_settings.openai_engine_api_key))
    return ParrotManager(info, engines, server_settings)


def log_serving(manager: ParrotManager, url: str) -> None:
    """The server's start-up line, once it listens: the model, its engines (each local one's device, dtype,
    weight format, attention backend and KV cache capacity in tokens) and the address."""
    local = [slot.engine.info for slot in manager.engines if isinstance(slot.engine, EngineDriver)]
    parts = [f"{count} local engine{'s' * (count > 1)} ({info})" for info, count in Counter(map(str, local)).items()]
    if any(isinstance(slot.engine, OpenAIEngine) for slot in manager.engines):
        parts.append(f"an OpenAI-compatible engine ({manager.settings.openai_engine})")
    if manager.settings.engine_key:
        parts.append("remote engines when they register")
    # Said either way: an open API is what a key that went missing (an unset variable) looks like.
    keys = len(manager.settings.api_keys())
    access = f"requests need an API key ({keys} accepted)" if keys else "requests need no API key"
    log.info("serving %s at %s (pid %d): %s; %s", manager.model.name, url, os.getpid(),
             "; ".join(parts) or "no engine yet", access,
             extra={"model": manager.model.name, "url": url, "engines": [asdict(info) for info in local],
                    "api_key_required": keys > 0})
    context, bound = manager.prompts.context()
    if context < manager.max_context:  # vLLM refuses to start; here such requests get 400 context_length_exceeded
        log.warning("%s: a request whose prompt and max_tokens need more is refused; raise --kv-cache-bytes to serve "
                    "the whole context", bound)


class LocalServer:
    """Starts on `start()` (or entering a `with` block); `base_url` is where clients reach it."""

    def __init__(self, engine_settings: EngineSettings, server_settings: ServerSettings | None = None) -> None:
        self.server_settings = server_settings or ServerSettings(port=0)
        self.manager = build_manager(engine_settings, self.server_settings)
        app = create_app(self.manager, self.server_settings)
        self._socket = bound_socket(self.server_settings.host, self.server_settings.port)
        host, port = self._socket.getsockname()[:2]
        self.base_url = f"http://{host}:{port}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                                     **uvicorn_options(self.server_settings.header_timeout)))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def start(self) -> "LocalServer":
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the local Parrot server did not start")
            time.sleep(0.01)
        log_serving(self.manager, self.base_url)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self.manager.close()

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
