"""Decode steps of N sequences forked from one long prefix, in the engine, with the prefix read once per step
(the shared pass) and read by every sequence (paged, under CUDA graphs), on the GPU.

Llama-2-7B shapes (or `--model llama3-8b-dummy`: Llama-3-8B's, 8 KV heads, a 128k vocabulary), random bf16
weights, a prefix of P tokens, each fork with 64 own prompt tokens (`--own`), greedy; also
the time from submitting the N forks' requests (prompt and generate in one) to the last one's first token.
Floor of a step = (weight bytes + KV bytes that must be read) / copy bandwidth measured in the same run, with
the prefix's KV counted once (what sharing can reach) and N times (what reading it per sequence must move
from memory when it does not stay in L2).

    python benchmarks/shared_prefix_decode.py --out benchmarks/results/shared_prefix_decode.json
    python benchmarks/shared_prefix_decode.py --model llama3-8b-dummy --forks 230 --out benchmarks/results/shared_prefix_decode_llama3.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine_decode import LLAMA2_7B, copy_bandwidth, kernel_profile, profile_steps
from parrot_lc.engine import LLMEngine, SamplingParams
from parrot_lc.engine.model_config import DUMMY_MODELS
from parrot_lc.settings import EngineSettings

STEPS = 16
MODES = {"auto": None, "shared": 0, "per_sequence": 2**62}  # the runner's min_shared_elements_decode


def fork_steps(engine: LLMEngine, forks: int, own: int, mode: str, profile: bool, profile_prefill: bool
               ) -> tuple[float, float]:
    """(Milliseconds from submitting `forks` generate requests, each with its own prompt of `own` tokens forked
    from the filled context "prefix", to the last one's first token; milliseconds a decode step of them takes
    afterwards.)"""
    default = engine.runner.min_shared_elements_decode
    if MODES[mode] is not None:
        engine.runner.min_shared_elements_decode = MODES[mode]
    gen = torch.Generator().manual_seed(forks)
    ids = [(mode, forks, i) for i in range(forks)]
    sampling = SamplingParams(max_tokens=STEPS + 8, temperature=0.0, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    requests = [engine.submit_generate(sampling, c, "prefix",
                                       token_ids=torch.randint(3, 1000, (own,), generator=gen).tolist())
                for c in ids]
    waiting = {r.request_id for r in requests}
    with kernel_profile(f"the prefill, {mode}, {forks} forks") if profile_prefill else contextlib.nullcontext():
        while waiting:
            waiting -= {o.request_id for o in engine.step() if o.token_ids}
    first_token = (time.perf_counter() - start) * 1e3
    for _ in range(3):  # graphs or kernels warmed
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(STEPS):
        engine.step()
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) * 1e3 / STEPS
    if profile:
        profile_steps(engine, f"{mode}, {forks} forks")
    engine.run_until_done(requests)
    for c in ids:
        engine.free_context(c)
    engine.runner.min_shared_elements_decode = default
    return first_token, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/shared_prefix_decode.json"))
    parser.add_argument("--model", choices=["llama2-7b-dummy", *DUMMY_MODELS], default="llama2-7b-dummy")
    parser.add_argument("--prefix", type=int, default=4096)
    parser.add_argument("--forks", type=int, nargs="+", default=[8, 23, 64, 128, 230])
    parser.add_argument("--own", type=int, default=64, help="each fork's own prompt tokens")
    parser.add_argument("--profile", type=int, nargs="*", default=[], help="N values whose decode steps to profile")
    parser.add_argument("--profile-prefill", type=int, nargs="*", default=[],
                        help="N values whose prefill to profile (the first token's time then includes the profiler's)")
    args = parser.parse_args()

    bandwidth = copy_bandwidth()
    with tempfile.TemporaryDirectory() as model_dir:
        if args.model == "llama2-7b-dummy":
            (Path(model_dir) / "config.json").write_text(json.dumps({**LLAMA2_7B, "max_position_embeddings": 8192}))
        engine = LLMEngine(EngineSettings(model=model_dir if args.model == "llama2-7b-dummy" else args.model,
                                          load_format="dummy", device="cuda", dtype="bfloat16",
                                          kv_cache_bytes=48 * 2**30, max_num_batched_tokens=4096))
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    config = engine.model.config
    kv_bytes_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2
    prefix = torch.randint(3, 1000, (args.prefix,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.fill(prefix, "prefix")
    results = {}
    for forks in tqdm(args.forks, desc="forks"):
        own = args.own + STEPS
        timings = {mode: fork_steps(engine, forks, args.own, mode, forks in args.profile, forks in args.profile_prefill)
                   for mode in MODES}
        results[str(forks)] = {
            **{f"{mode}_ms": step for mode, (_, step) in timings.items()},
            **{f"{mode}_first_token_ms": first for mode, (first, _) in timings.items()},
            "floor_shared_ms": (weight_bytes + (args.prefix + forks * own) * kv_bytes_per_token) / bandwidth * 1e3,
            "floor_per_sequence_ms": (weight_bytes + forks * (args.prefix + own) * kv_bytes_per_token)
            / bandwidth * 1e3,
        }
    result = {
        "device": torch.cuda.get_device_name(),
        "model": "Llama-2-7B shapes, random bf16 weights" if args.model == "llama2-7b-dummy" else args.model,
        "prefix_tokens": args.prefix,
        "own_tokens": args.own,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "min_shared_elements_decode": engine.runner.min_shared_elements_decode,
        "overlap_steps": engine.overlap_steps,
        "by_forks": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
