"""Shared-prefix decode attention, one layer on the GPU: N sequences forked from one prefix of P tokens, 256
own tokens each, 32 query heads x 128, bf16, 32 or 8 KV heads.

For each case: our fused Triton decode kernel in each config of triton_decode.CONFIGS (`triton_<name>`: query
rows of a KV head's group per prefix tile, 64 or 128, each prefix tile read once per row tile, the prefix split
across SMs, each row's partials merged inside the launch or by a second one), `ours` (the config the kernel
picks by itself, triton_decode.pick_config), `engine` (what the engine's `auto` backend runs: the CUDA or the
Triton kernel, cuda_attention.CudaBackend), the Triton kernel with sharing switched off (each sequence reads the
prefix through its own block table), our CUDA kernel (csrc/, where built) in the plan it picks (`cuda`,
cuda_attention.plan) and in others (`cuda_previous`: its splits with the earlier sessions' shortest parts, 256 and
64 tokens, no wgmma, the merge launched after the partials; `cuda_mma`: no wgmma; `cuda_wgmma`: every shared item
of 64 rows on wgmma, two blocks a multiprocessor; `cuda_wgmma_3_blocks`: the same in the kernel of three, planned
for them; `cuda_warp_specialized`: every shared item of 128 rows on the warp-specialized kernel), FlashInfer's
cascade attention (where its package is on the machine), torch SDPA on the expanded KV (where it fits in
memory), and the floor: bytes that must move (the prefix KV once plus every own KV) over the copy bandwidth
measured in this run. `copy_floor` is a plain copy of those bytes (half read, half written) timed as the kernels
are: what the harness gives a kernel that moves exactly the floor's bytes (its launch, and the dirty lines that
the L2 flush leaves, which a kernel's reads make the L2 write back). Every kernel is replayed from a CUDA graph,
as in the engine's decode steps, where it can be captured (else timed eagerly); each case's `timed` says which.

    PYTHONPATH=. python3 benchmarks/kernel_shared_prefix.py --out benchmarks/results/kernel_shared_prefix.json
    python benchmarks/kernel_shared_prefix.py --plot benchmarks/results/kernel_shared_prefix.json   # the PNG
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch

HEADS, HEAD_DIM, OWN, PAGE = 32, 128, 256, 16
CASES = [(kv, n, p) for kv in (32, 8) for n in (16, 64, 256) for p in (1024, 4096, 16384)]


def copy_bandwidth() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 20 / (start.elapsed_time(end) / 1e3)


def build_case(n: int, prefix: int, kv_heads: int, sharing: bool):
    """A paged cache holding the prefix once and each sequence's own KV, and the decode step's layout."""
    from parrot_lc.engine.attention import AttentionMetadata, DecodeLayout, SharedPrefix

    prefix_blocks, own_blocks = prefix // PAGE, OWN // PAGE
    num_blocks = prefix_blocks + n * own_blocks + 1
    k_cache = torch.randn(num_blocks, PAGE, kv_heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    shared_ids = torch.arange(prefix_blocks, device="cuda")
    own_ids = prefix_blocks + torch.arange(n * own_blocks, device="cuda").view(n, own_blocks)  # (N, own blocks)
    tables = torch.cat([shared_ids.expand(n, -1), own_ids], dim=1)  # (N, blocks)
    meta = AttentionMetadata(
        block_size=PAGE,
        slot_mapping=tables[:, -1] * PAGE + PAGE - 1,  # the new token is each sequence's last own slot
        query_start=torch.arange(n + 1, device="cuda"),
        query_lens=[1] * n,
        context_lens=torch.full((n,), prefix + OWN, device="cuda"),
        block_tables=tables,
        shared_lens=torch.full((n,), prefix if sharing else 0, device="cuda"),
        shared=[SharedPrefix(torch.arange(n, device="cuda"), torch.arange(n, device="cuda"), shared_ids, prefix)]
        if sharing else [],
    )
    q = torch.randn(n, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    return q, k_cache, v_cache, DecodeLayout.of_step(meta), (shared_ids, own_ids)


def time_ms(fn) -> tuple[float, str]:
    """GPU time of one call, replayed from a CUDA graph as the engine's decode steps are (no Python launch
    overhead); eagerly where a peer cannot be captured. L2 is flushed before each call (triton's do_bench)."""
    import triton

    fn()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return triton.testing.do_bench(graph.replay, warmup=10, rep=50), "graph"
    except Exception:  # noqa: BLE001 - a peer that cannot be captured is timed eagerly (and said so)
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=10, rep=50), "eager"


def sdpa_ms(n: int, prefix: int) -> tuple[float, str] | None:
    context = prefix + OWN
    if 2 * n * HEADS * context * HEAD_DIM * 2 > 30e9:  # expanded K and V must fit beside the rest
        return None
    q = torch.randn(n, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    timing = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    del q, k, v
    torch.cuda.empty_cache()
    return timing


def flashinfer_ms(q, k_cache, v_cache, blocks, kv_heads: int) -> tuple[float, str] | None:
    """FlashInfer's two-level cascade (the prefix for all N queries, then each sequence's own pages)."""
    try:
        import flashinfer
    except ImportError:
        return None
    shared_ids, own_ids = blocks
    n = q.shape[0]
    i32 = dict(dtype=torch.int32, device="cuda")
    workspace = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.MultiLevelCascadeAttentionWrapper(2, workspace, "NHD")
    wrapper.plan(
        [torch.tensor([0, n], **i32), torch.arange(n + 1, **i32)],
        [torch.tensor([0, shared_ids.numel()], **i32), torch.arange(n + 1, **i32) * own_ids.shape[1]],
        [shared_ids.to(torch.int32), own_ids.flatten().to(torch.int32)],
        [torch.tensor([PAGE], **i32), torch.full((n,), PAGE, **i32)],
        HEADS, kv_heads, HEAD_DIM, PAGE, q_data_type=torch.bfloat16,
    )
    return time_ms(lambda: wrapper.run(q, (k_cache, v_cache)))


def cuda_plans(q, k_cache, layout) -> dict:
    """The CUDA kernel's plans besides the one it picks (see the module's docstring)."""
    from parrot_lc.engine import cuda_attention

    def of(blocks_per_sm: int) -> cuda_attention.Plan:
        """The plan of 64-row (or smaller) shared items for that many resident blocks."""
        return cuda_attention.plan(q, k_cache, layout, blocks_per_sm=blocks_per_sm, warp_specialized=False)

    group = q.shape[1] // k_cache.shape[2]
    wgmma = dict(wgmma=True, row_warps=4, shared_tiles=math.ceil(layout.max_group / (64 // group)))
    return {
        "previous": dataclasses.replace(of(2), wgmma=False, programmatic_merge=False, min_shared_chunk=256,
                                        min_own_chunk=64),
        "mma": dataclasses.replace(of(2), wgmma=False),
        "wgmma": dataclasses.replace(of(2), **wgmma),
        "wgmma_3_blocks": dataclasses.replace(of(3), **wgmma),
    } | ({} if cuda_attention.warp_specialized_unsupported(q, k_cache) else
         {"warp_specialized": cuda_attention.plan(q, k_cache, layout, warp_specialized=True)})


def copy_ms(num_bytes: int) -> tuple[float, str]:
    """A copy that reads and writes num_bytes in all, timed as the kernels are."""
    src = torch.ones(num_bytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src))


def measure(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from parrot_lc.engine import cuda_attention
    from parrot_lc.engine.triton_decode import CONFIGS, decode_attention

    bandwidth = copy_bandwidth()
    cases = []
    for kv_heads, n, prefix in tqdm(CASES, desc="cases"):
        row = {"n": n, "prefix": prefix, "own": OWN, "kv_heads": kv_heads, "timed": {}}

        def record(name: str, timing: tuple[float, str] | None) -> None:
            """`name`_ms, and in `timed` how it was timed: replayed from a CUDA graph, or eagerly."""
            row[f"{name}_ms"] = timing and timing[0]
            if timing:
                row["timed"][name] = timing[1]

        q, k_cache, v_cache, layout, blocks = build_case(n, prefix, kv_heads, sharing=True)
        _, _, _, unshared, _ = build_case(n, prefix, kv_heads, sharing=False)
        scale = HEAD_DIM**-0.5
        for name, config in CONFIGS.items():
            record(f"triton_{name}", time_ms(lambda: decode_attention(q, k_cache, v_cache, layout, scale, config)))
        record("ours", time_ms(lambda: decode_attention(q, k_cache, v_cache, layout, scale)))
        record("no_sharing", time_ms(lambda: decode_attention(q, k_cache, v_cache, unshared, scale)))
        if cuda_attention.available():
            record("cuda", time_ms(lambda: cuda_attention.cuda_decode_attention(q, k_cache, v_cache, layout, scale)))
            for name, launch in cuda_plans(q, k_cache, layout).items():
                record(f"cuda_{name}", time_ms(
                    lambda: cuda_attention.cuda_decode_attention(q, k_cache, v_cache, layout, scale, launch=launch)))
            backend = cuda_attention.CudaBackend()
            record("engine", time_ms(lambda: backend.decode(q, k_cache, v_cache, layout, scale)))
        try:
            record("flashinfer", flashinfer_ms(q, k_cache, v_cache, blocks, kv_heads))
        except Exception as error:  # noqa: BLE001 - the peer's failure is reported, ours still measured
            row["flashinfer_error"] = repr(error)[:300]
        del q, k_cache, v_cache, layout, unshared, blocks
        torch.cuda.empty_cache()
        record("sdpa", sdpa_ms(n, prefix))
        kv_bytes_per_token = 2 * kv_heads * HEAD_DIM * 2
        row["floor_ms"] = (prefix + n * OWN) * kv_bytes_per_token / bandwidth * 1e3
        record("copy_floor", copy_ms((prefix + n * OWN) * kv_bytes_per_token))
        row["ours_over_floor"] = row["ours_ms"] / row["floor_ms"]
        ours = [row[k] for k in row if k.endswith("_ms") and (k.startswith(("triton_", "cuda")) or k == "ours")
                and row[k] is not None]
        row["best_over_floor"] = min(ours) / row["floor_ms"]
        if row.get("flashinfer_ms"):
            row["flashinfer_over_ours"] = row["flashinfer_ms"] / row["ours_ms"]
        cases.append(row)
        print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name(), "copy_bandwidth_gb_s": bandwidth / 1e9, "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(path.read_text())
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True)
    for row_axes, kv_heads in zip(axes, (32, 8)):
        for ax, prefix in zip(row_axes, (1024, 4096, 16384)):
            cases = sorted((c for c in result["cases"] if c["kv_heads"] == kv_heads and c["prefix"] == prefix),
                           key=lambda c: c["n"])
            ns = [c["n"] for c in cases]
            for key, label in (("engine_ms", "parrot_lc, the engine's kernel"),
                               ("ours_ms", "parrot_lc Triton (shared)"), ("cuda_ms", "parrot_lc CUDA (shared)"),
                               ("no_sharing_ms", "parrot_lc Triton, no sharing"), ("flashinfer_ms", "FlashInfer cascade"),
                               ("sdpa_ms", "SDPA, expanded KV"), ("floor_ms", "memory floor")):
                points = [(x, c[key]) for x, c in zip(ns, cases) if c.get(key) is not None]
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            ax.set(xscale="log", yscale="log", title=f"{kv_heads} KV heads, prefix {prefix}", xlabel="N", ylabel="ms")
            ax.set_xticks(ns, [str(x) for x in ns])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Shared-prefix decode attention, one layer ({result['device']})")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernel_shared_prefix.json"))
    parser.add_argument("--plot", type=Path, help="draw the PNG of an earlier run's JSON (no GPU needed)")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot)
    else:
        measure(args)


if __name__ == "__main__":
    main()
