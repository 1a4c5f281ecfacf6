"""Engine decode and prefill speed on the GPU, Llama-2-7B shapes with random bf16 weights.

For batch 1, 16 and 64 (512-token contexts): our decode step time, the floor of that step (weight bytes + KV
bytes read, over the copy bandwidth measured in this run) and Hugging Face `generate` in the same run.

    python benchmarks/engine_decode.py --out benchmarks/results/engine_decode.json
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from parrot_lc.engine import LLMEngine, SamplingParams
from parrot_lc.settings import EngineSettings

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 32000, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2,
}
CONTEXT = 512
DECODE_STEPS = 32


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 20 / (time.perf_counter() - start)


@contextmanager
def kernel_profile(label: str) -> Iterator[None]:
    """Prints where the GPU's time went while the block ran (kernels by total time), to explain a gap to a floor."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        yield
        torch.cuda.synchronize()
    print(f"--- profile of {label}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def profile_steps(engine: LLMEngine, label: str) -> None:
    """Prints where 3 decode steps' time goes."""
    with kernel_profile(f"3 decode steps, {label}"):
        for _ in range(3):
            engine.step()


def bench_ours(model_dir: Path, batches: list[int], profile: bool) -> tuple[dict, float, int]:
    settings = EngineSettings(model=str(model_dir), load_format="dummy", device="cuda", dtype="bfloat16",
                              kv_cache_bytes=24 * 2**30, max_num_batched_tokens=4096)
    engine = LLMEngine(settings)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    gen = torch.Generator().manual_seed(0)
    step_ms: dict[str, float] = {}
    prefill_tps = 0.0
    for batch in tqdm(batches, desc="parrot_lc"):
        prompts = [torch.randint(3, 32000, (CONTEXT,), generator=gen).tolist() for _ in range(batch)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.run_until_done([engine.submit_fill(p, (batch, i)) for i, p in enumerate(prompts)])
        torch.cuda.synchronize()
        if batch == max(batches):
            prefill_tps = batch * CONTEXT / (time.perf_counter() - start)
        sampling = SamplingParams(max_tokens=DECODE_STEPS + 8, temperature=0.0, ignore_eos=True)
        requests = [engine.submit_generate(sampling, (batch, i)) for i in range(batch)]
        for _ in range(4):  # warm-up: the first sample and a few decode steps
            engine.step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(DECODE_STEPS - 1):
            engine.step()
        torch.cuda.synchronize()
        step_ms[str(batch)] = (time.perf_counter() - start) * 1e3 / (DECODE_STEPS - 1)
        if profile:
            profile_steps(engine, f"batch {batch}")
        engine.run_until_done(requests)
        for i in range(batch):
            engine.free_context((batch, i))
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return step_ms, prefill_tps, weight_bytes


def bench_hf(batches: list[int]) -> dict[str, float]:
    import transformers

    config = transformers.LlamaConfig(**{k: v for k, v in LLAMA2_7B.items() if k not in ("architectures", "model_type")})
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    tokens_per_s: dict[str, float] = {}
    for batch in tqdm(batches, desc="transformers"):
        ids = torch.randint(3, 32000, (batch, CONTEXT), device="cuda")
        kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=DECODE_STEPS, min_new_tokens=DECODE_STEPS, **kwargs)
        torch.cuda.synchronize()
        tokens_per_s[str(batch)] = batch * DECODE_STEPS / (time.perf_counter() - start)
    return tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_decode.json"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print a kernel profile of decode steps")
    args = parser.parse_args()

    bandwidth = copy_bandwidth()
    with tempfile.TemporaryDirectory() as model_dir:
        (Path(model_dir) / "config.json").write_text(json.dumps(LLAMA2_7B))
        step_ms, prefill_tps, weight_bytes = bench_ours(Path(model_dir), args.batches, args.profile)
    kv_bytes_per_token = 2 * LLAMA2_7B["num_hidden_layers"] * LLAMA2_7B["hidden_size"] * 2
    floor_ms = {str(b): (weight_bytes + b * (CONTEXT + DECODE_STEPS // 2) * kv_bytes_per_token) / bandwidth * 1e3
                for b in args.batches}
    result = {
        "device": torch.cuda.get_device_name(),
        "model": "Llama-2-7B shapes, random bf16 weights",
        "context_tokens": CONTEXT,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "floor_ms": floor_ms,
        "step_ms": step_ms,
        "step_over_floor": {b: step_ms[b] / floor_ms[b] for b in step_ms},
        "tokens_per_s": {b: int(b) * 1e3 / step_ms[b] for b in step_ms},
        "prefill_tokens_per_s": prefill_tps,
        "hf_tokens_per_s": {} if args.skip_hf else bench_hf(args.batches),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
