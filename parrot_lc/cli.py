"""The `parrot-lc` command."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from parrot_lc.engine.errors import ModelLoadError
from parrot_lc.logs import configure_logging
from parrot_lc.settings import (
    COMMAND_SETTINGS,
    ConfigFileSettings,
    EngineProcessSettings,
    EngineSettings,
    ProcessSettings,
    ServerSettings,
    SettingsError,
    load_settings,
    settings_table,
)
from parrot_lc.startup import freeze_startup_objects, kv_cache_fits

DEMO_SYSTEM = "You are a concise assistant. Answer in one or two sentences."
DEMO_QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "Name three uses of a paper clip.",
]


def load(args: argparse.Namespace, *classes) -> list:
    """The settings of a command: its flags, then PARROT_* environment variables, then the config file (`--config`
    or PARROT_CONFIG), then defaults."""
    flags = vars(args)
    [source] = load_settings([ConfigFileSettings], flags)
    return load_settings(classes, flags, source.config)


def _add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per setting of `cls`; an unset flag leaves the setting to its PARROT_* variable, the config file or
    its default. A flag's value stays text, which pydantic converts as it converts the variable's and the file's:
    the same values are taken (`--prefix-caching off`), and any other (`ture`) is the same one-line error naming
    the flag, never a guess of the command line's own (a typo taken for false opened /metrics without a key)."""
    for name, field in cls.model_fields.items():
        default = f" (default: {'unset' if field.default is None else field.default})"
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name,
                            help=f"{field.description}{default}".replace("%", "%%"))


def serve(args: argparse.Namespace) -> None:
    """Runs the Parrot server (manager + local engines) until interrupted."""
    import uvicorn

    from parrot_lc.server.app import create_app
    from parrot_lc.server.connections import listen, reserved_socket, uvicorn_options
    from parrot_lc.server.local import build_manager
    from parrot_lc.server.shutdown import DrainingServer

    engine_settings, server_settings, process = load(args, EngineSettings, ServerSettings, ProcessSettings)
    configure_logging(process.log_format)
    with reserved_socket(ServerSettings, server_settings.host, server_settings.port) as sock:
        with kv_cache_fits(engine_settings):
            manager = build_manager(engine_settings, server_settings)
        app = create_app(manager, server_settings)
        freeze_startup_objects()
        # uvicorn raises a signal it stopped on again for the previous handler: this one lets the process exit 0,
        # as a service manager expects of a clean stop. (Once serving, signals drain without reaching uvicorn.)
        signal.signal(signal.SIGTERM, lambda *_: None)
        # log_config=None: uvicorn's records go through the handler configured above; the app logs each request
        # itself, with its id, instead of uvicorn's access log, and its start (what it serves, where: the socket's
        # own port, which --port 0 leaves to the system) once it listens, instead of uvicorn's start-up lines.
        config = uvicorn.Config(app, log_level="warning", log_config=None, access_log=False,
                                timeout_graceful_shutdown=process.shutdown_timeout,
                                **uvicorn_options(server_settings.header_timeout))
        server = DrainingServer(config, manager, process.shutdown_timeout)
        try:
            listen(sock, ServerSettings)
            server.run(sockets=[sock])
        finally:
            manager.close()
    if server.stopped_now_by is not None:  # a second signal cut the drain short: the work was not finished
        sys.exit(128 + server.stopped_now_by)


def demo(args: argparse.Namespace) -> None:
    """Fills a shared system prompt once, forks it for several questions and generates the answers."""
    from parrot_lc.engine import LLMEngine, SamplingParams

    [settings] = load(args, EngineSettings)
    with kv_cache_fits(settings):
        engine = LLMEngine(settings)
    tokenizer = engine.tokenizer
    started = time.perf_counter()
    system = [{"role": "system", "content": DEMO_SYSTEM}]
    prefix = tokenizer.apply_chat_template(system, tokenize=False)
    prefix_ids = tokenizer(prefix, add_special_tokens=False).input_ids
    engine.fill(prefix_ids, "system")
    requests = []
    for i, question in enumerate(DEMO_QUESTIONS):
        full = tokenizer.apply_chat_template(
            system + [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        suffix_ids = tokenizer(full[len(prefix) :], add_special_tokens=False).input_ids
        requests.append(engine.submit_fill(suffix_ids, f"q{i}", parent_context_id="system"))
    engine.run_until_done(requests)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    answers = [engine.submit_generate(sampling, f"q{i}") for i in range(len(DEMO_QUESTIONS))]
    events = engine.run_until_done(answers)
    for question, request in zip(DEMO_QUESTIONS, answers):
        text = "".join(e.text for e in events[request.request_id])
        print(f"Q: {question}\nA: {text.strip()}\n")
    stats = engine.stats()
    print(
        f"model={engine.settings.model} device={engine.device} time={time.perf_counter() - started:.1f}s "
        f"prefilled={stats.prefill_tokens} reused_by_forking={stats.reused_tokens} decoded={stats.decode_tokens}"
    )


def engine_process(args: argparse.Namespace) -> None:
    """Runs one engine that registers with a manager and serves its fill / generate / free_context calls."""
    import uvicorn

    from parrot_lc.engine import LLMEngine
    from parrot_lc.engine.async_engine import AsyncEngine
    from parrot_lc.server.connections import listen, reserved_socket, uvicorn_options
    from parrot_lc.server.engine_service import LinkedServer, ManagerLink, create_engine_app

    engine_settings, link_settings, process = load(args, EngineSettings, EngineProcessSettings, ProcessSettings)
    configure_logging(process.log_format)
    with reserved_socket(EngineProcessSettings, link_settings.host, link_settings.port) as sock:
        with kv_cache_fits(engine_settings):
            engine = AsyncEngine(LLMEngine(engine_settings))
        freeze_startup_objects()
        url = link_settings.advertise_url or f"http://{link_settings.host}:{link_settings.port}"
        link = ManagerLink(engine, link_settings, url)
        signal.signal(signal.SIGTERM, lambda *_: None)  # exit 0 after uvicorn's graceful stop (see serve)
        # On SIGTERM uvicorn stops accepting connections (the manager moves new calls to other engines) and lets
        # the fills and generations in flight finish, up to the deadline.
        config = uvicorn.Config(create_engine_app(engine, link_settings.engine_key), log_level="warning",
                                log_config=None, timeout_graceful_shutdown=process.shutdown_timeout,
                                **uvicorn_options(link_settings.header_timeout))
        try:
            listen(sock, EngineProcessSettings)
            LinkedServer(config, link).run(sockets=[sock])  # registers with the manager once it serves on its port
        finally:
            link.stopped.set()
            engine.close()
    if link.refusal is not None:  # the manager refused this engine: asking again would get the same answer
        raise link.refusal


def build_parser() -> argparse.ArgumentParser:
    """The `parrot-lc` command line: one subcommand per process kind, one flag per setting."""
    parser = argparse.ArgumentParser(prog="parrot-lc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = [  # name, help, what it runs; its flags are those of its settings (COMMAND_SETTINGS)
        ("demo", "the embedded default model end to end", demo),
        ("serve", "the Parrot server: HTTP API, OpenAI-compatible API, local engines", serve),
        ("engine", "a remote engine that registers with a manager", engine_process),
    ]
    parsers = {}
    for name, help_text, func in commands:
        parsers[name] = sub.add_parser(name, help=help_text)
        for settings_class in COMMAND_SETTINGS[name]:
            _add_flags(parsers[name], settings_class)
        parsers[name].set_defaults(func=func)
    parsers["demo"].add_argument("--max-tokens", type=int, default=48, help="tokens each answer may have (default: 48)")
    table_parser = sub.add_parser("settings", help="print the table of settings (as in the README)")
    table_parser.set_defaults(func=lambda args: print(settings_table()))
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (SettingsError, ModelLoadError) as exc:  # a setting to fix, which the message names: no traceback
        parser.exit(2, f"parrot-lc: error: {exc}\n")


if __name__ == "__main__":
    main()
