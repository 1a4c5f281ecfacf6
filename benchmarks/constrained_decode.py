"""Constrained decoding: what a grammar's token mask costs (engine/constraints.py).

`libraries` (any host, CPU only): the two grammar libraries vLLM uses, xgrammar (the engine's) and llguidance (its
peer; `pip install llguidance` to measure it), with the SmolLM2 tokenizer (49,152 tokens) and the JSON schema of a
tool call: the compile time of the schema (a matcher's first mask included: llguidance compiles lazily), and the
time to fill the next-token masks of 1 and 64 requests a token, along a tool call's tokens.

`engine` (GPU): the engine's decode step at batch 64, Llama-2-7B shapes with random bf16 weights and SmolLM2's
vocabulary (its tokenizer's 49,152 tokens for Llama's 32,000), 512-token contexts, every request sampling
(temperature 1) unconstrained, then every one constrained to the tool call's schema, in the same run; the same
again with overlapped steps off (what a constrained step would cost if it did not overlap at all).

    python benchmarks/constrained_decode.py libraries --out benchmarks/results/constrained_libraries.json
    python benchmarks/constrained_decode.py engine --out benchmarks/results/constrained_decode.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Protocol

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine_decode import CONTEXT, DECODE_STEPS, LLAMA2_7B
from parrot_lc.engine import Constraint, LLMEngine, SamplingParams
from parrot_lc.engine.loader import resolve_checkpoint
from parrot_lc.settings import EngineSettings

# A tool call as a constrained tool choice asks for it: the function's name, then its arguments' object.
TOOL_CALL = {
    "type": "object",
    "properties": {
        "name": {"enum": ["get_weather", "search_flights", "book_hotel"]},
        "arguments": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                "include_hourly": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
            },
            "required": ["location", "unit", "days"],
        },
    },
    "required": ["name", "arguments"],
}
# The tokens the mask fills are timed along: a call as a model writes one.
TOOL_CALL_TEXT = json.dumps({"name": "get_weather", "arguments": {"location": "San Francisco, CA", "unit": "celsius",
                                                                  "days": 3, "include_hourly": False,
                                                                  "tags": ["travel", "weekend"]}})
BATCH = 64
REPEATS = 5


def smollm2_tokenizer_dir(cache_dir: Path) -> Path:
    """The embedded default model's checkpoint directory (its tokenizer files are what is read)."""
    return resolve_checkpoint("smollm2", cache_dir)[0]


# ---- the libraries on the CPU ---------------------------------------------------------------------------------

class Library(Protocol):
    """What the benchmark does with a grammar library: compile a schema into matchers, fill masks, accept tokens."""

    name: str

    def matchers(self, schema: str, count: int) -> list: ...
    def fill(self, matchers: list, bitmask: torch.Tensor) -> None: ...
    def accept(self, matcher, token: int) -> None: ...


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[eos])
        self.batch = xgrammar.BatchGrammarMatcher()
        self.version = _version("xgrammar")

    def matchers(self, schema: str, count: int) -> list:
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)  # cold: every compile is timed
        compiled = compiler.compile_json_schema(schema, any_whitespace=True, strict_mode=True)
        return [self.xgr.GrammarMatcher(compiled) for _ in range(count)]

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matcher, token: int) -> None:
        assert matcher.accept_token(token)


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg, self.fill_one, self.fill_many = llguidance, llguidance.torch.fill_next_token_bitmask, \
            llguidance.torch.fill_next_token_bitmask_par
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.executor = llguidance.LLExecutor()
        self.version = _version("llguidance")

    def matchers(self, schema: str, count: int) -> list:
        grammar = self.llg.grammar_from("json_schema", schema)
        return [self.llg.LLMatcher(self.tokenizer, grammar) for _ in range(count)]

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        if len(matchers) == 1:
            self.fill_one(matchers[0], bitmask, 0)
        else:
            self.fill_many(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept(self, matcher, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def bench_library(make: Callable[[], Library], tokens: list[int], vocab_size: int) -> dict:
    start = time.perf_counter()
    library = make()
    setup_ms = (time.perf_counter() - start) * 1e3
    schema = json.dumps(TOOL_CALL)
    bitmask = torch.zeros(BATCH, (vocab_size + 31) // 32, dtype=torch.int32)  # (B, ceil(V / 32))
    compile_ms = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        library.fill(library.matchers(schema, 1), bitmask[:1])
        compile_ms.append((time.perf_counter() - start) * 1e3)
    fill_us: dict[str, float] = {}
    for batch in (1, BATCH):
        runs = []
        for _ in range(REPEATS):
            matchers = library.matchers(schema, batch)
            library.fill(matchers, bitmask[:batch])  # the first mask is the compile's, timed above
            for m in matchers:
                library.accept(m, tokens[0])
            spent = 0.0
            for token in tokens[1:]:
                start = time.perf_counter()
                library.fill(matchers, bitmask[:batch])
                spent += time.perf_counter() - start
                for m in matchers:
                    library.accept(m, token)
            runs.append(spent / (len(tokens) - 1) * 1e6)
        fill_us[str(batch)] = statistics.median(runs)
    return {"version": library.version, "tokenizer_setup_ms": setup_ms, "compile_ms": statistics.median(compile_ms),
            "mask_fill_us_per_token": fill_us}


def bench_libraries(tokenizer_dir: Path) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab_size, eos = len(tokenizer), tokenizer.eos_token_id
    tokens = tokenizer(TOOL_CALL_TEXT, add_special_tokens=False).input_ids
    results = {"tokenizer_vocab": vocab_size, "tool_call_tokens": len(tokens), "threads": torch.get_num_threads()}
    for make in (XGrammar, LLGuidance):
        try:
            results[make.name] = bench_library(lambda: make(tokenizer, vocab_size, eos), tokens, vocab_size)
        except ImportError as exc:
            results[make.name] = {"skipped": str(exc)}
    return results


# ---- the engine on the GPU ------------------------------------------------------------------------------------

def bench_engine(tokenizer_dir: Path) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = {**LLAMA2_7B, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id or 0,
              "eos_token_id": tokenizer.eos_token_id}
    with tempfile.TemporaryDirectory() as model_dir:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, Path(model_dir) / name)
        (Path(model_dir) / "config.json").write_text(json.dumps(config))
        engine = LLMEngine(EngineSettings(model=model_dir, load_format="dummy", device="cuda", dtype="bfloat16",
                                          kv_cache_bytes=24 * 2**30, max_num_batched_tokens=4096))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(tokenizer), (CONTEXT,), generator=gen).tolist() for _ in range(BATCH)]
    engine.run_until_done([engine.submit_fill(p, ("prompt", i)) for i, p in enumerate(prompts)])
    tool_call = Constraint("json_schema", json.dumps(TOOL_CALL))
    runs = {}
    for label, constraint, overlap in (("unconstrained", None, True), ("constrained", tool_call, True),
                                       ("unconstrained, steps not overlapped", None, False),
                                       ("constrained, steps not overlapped", tool_call, False)):
        runs[label] = decode_steps(engine, label, constraint, overlap)
        print(label, runs[label])
    base, constrained = runs["unconstrained"]["step_ms"], runs["constrained"]["step_ms"]
    return {"device": torch.cuda.get_device_name(), "batch": BATCH, "context_tokens": CONTEXT,
            "vocab": len(tokenizer), "runs": runs, "constrained_overhead": constrained / base - 1}


def decode_steps(engine: LLMEngine, label: str, constraint: Constraint | None, overlap: bool) -> dict:
    """Forks every prompt's context and times decode steps of all of them, after a warm-up (a tool call's tokens
    from its start: the shortest of these calls, with random weights, is longer than the steps timed)."""
    engine.overlap_steps = overlap
    warm_up = 4
    samplings = [SamplingParams(max_tokens=warm_up + DECODE_STEPS + 1, temperature=1.0, seed=i, ignore_eos=True,
                                constraint=constraint) for i in range(BATCH)]
    requests = [engine.submit_generate(s, (label, i), ("prompt", i)) for i, s in enumerate(samplings)]
    for _ in range(warm_up):
        engine.step()
    torch.cuda.synchronize()
    start, running = time.perf_counter(), []
    for _ in range(DECODE_STEPS):
        engine.step()
        running.append(sum(not r.finished for r in requests))
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - start) * 1e3 / DECODE_STEPS
    engine.run_until_done(requests)
    for i in range(BATCH):
        engine.free_context((label, i))
    return {"step_ms": step_ms, "fewest_running": min(running), "overlap_steps": overlap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["libraries", "engine"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a folder with tokenizer.json and tokenizer_config.json (default: SmolLM2's, converted "
                        "from the embedded GGUF file into the cache folder)")
    args = parser.parse_args()
    tokenizer_dir = args.tokenizer or smollm2_tokenizer_dir(EngineSettings().cache_dir)
    result = bench_libraries(tokenizer_dir) if args.part == "libraries" else bench_engine(tokenizer_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
