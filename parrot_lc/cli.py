"""The `parrot-lc` command."""

from __future__ import annotations

import argparse
import signal
import time

from parrot_lc.engine import LLMEngine, SamplingParams
from parrot_lc.settings import EngineProcessSettings, EngineSettings, ServerSettings, settings_table

DEMO_SYSTEM = "You are a concise assistant. Answer in one or two sentences."
DEMO_QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "Name three uses of a paper clip.",
]


def _settings(cls, args: argparse.Namespace):
    # Flags given on the command line win over PARROT_* environment variables.
    overrides = {k: v for k, v in vars(args).items() if k in cls.model_fields and v is not None}
    return cls(**overrides)


def _flag_type(annotation):
    if annotation is bool:
        return lambda text: text.lower() in ("1", "true", "yes", "on")
    return annotation if annotation in (int, float) else str  # pydantic converts the rest (paths, choices)


def _add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per setting of `cls`; unset flags leave the setting to PARROT_* variables or its default."""
    for name, field in cls.model_fields.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_flag_type(field.annotation),
                            help=field.description)


def serve(args: argparse.Namespace) -> None:
    """Runs the Parrot server (manager + local engines) until interrupted."""
    import uvicorn

    from parrot_lc.server.app import create_app
    from parrot_lc.server.local import build_manager

    engine_settings, server_settings = _settings(EngineSettings, args), _settings(ServerSettings, args)
    manager = build_manager(engine_settings, server_settings)
    app = create_app(manager, server_settings)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for the previous handler:
    # this one lets the process exit 0, as a service manager expects of a clean stop.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(app, host=server_settings.host, port=server_settings.port, log_level="info")
    finally:
        manager.close()


def demo(args: argparse.Namespace) -> None:
    """Fills a shared system prompt once, forks it for several questions and generates the answers."""
    engine = LLMEngine(_settings(EngineSettings, args))
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

    from parrot_lc.engine.async_engine import AsyncEngine
    from parrot_lc.server.engine_service import ManagerLink, create_engine_app

    engine_settings, process = _settings(EngineSettings, args), _settings(EngineProcessSettings, args)
    engine = AsyncEngine(LLMEngine(engine_settings))
    link = ManagerLink(engine, process, process.advertise_url or f"http://{process.host}:{process.port}")
    link.start()
    signal.signal(signal.SIGTERM, lambda *_: None)  # exit 0 after uvicorn's graceful stop (see serve)
    try:
        uvicorn.run(create_engine_app(engine), host=process.host, port=process.port, log_level="warning")
    finally:
        link.stopped.set()
        engine.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="parrot-lc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo_parser = sub.add_parser("demo", help="the embedded default model end to end")
    _add_flags(demo_parser, EngineSettings)
    demo_parser.add_argument("--max-tokens", type=int, default=48)
    demo_parser.set_defaults(func=demo)
    serve_parser = sub.add_parser("serve", help="the Parrot server: HTTP API, OpenAI-compatible API, local engines")
    _add_flags(serve_parser, EngineSettings)
    _add_flags(serve_parser, ServerSettings)
    serve_parser.set_defaults(func=serve)
    engine_parser = sub.add_parser("engine", help="a remote engine that registers with a manager")
    _add_flags(engine_parser, EngineSettings)
    _add_flags(engine_parser, EngineProcessSettings)
    engine_parser.set_defaults(func=engine_process)
    table_parser = sub.add_parser("settings", help="print the table of settings (as in the README)")
    table_parser.set_defaults(func=lambda args: print(settings_table()))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
