"""Shared-prefix decode attention, one layer on the GPU: N sequences forked from one prefix of P tokens, 256
own tokens each, 32 query heads x 128, bf16, 32 or 8 KV heads.

For each case: our Triton backend (prefix read once per step by the shared pass, own KV per sequence, merged
by LSE), the same with sharing switched off (each sequence reads the prefix through its own block table),
torch SDPA on the expanded KV (where it fits in memory), and the floor: bytes that must move (the prefix KV
once plus every own KV) over the copy bandwidth measured in this run.

    PYTHONPATH=. python3 benchmarks/kernel_shared_prefix.py --out benchmarks/results/kernel_shared_prefix.json
    python benchmarks/kernel_shared_prefix.py --plot benchmarks/results/kernel_shared_prefix.json   # the PNG
"""

from __future__ import annotations

import argparse
import json
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
    """A paged cache holding the prefix once and each sequence's own KV, and the decode-step metadata."""
    from parrot_lc.engine.attention import AttentionMetadata, SharedPrefix

    prefix_blocks, own_blocks = prefix // PAGE, OWN // PAGE
    num_blocks = prefix_blocks + n * own_blocks + 1
    k_cache = torch.randn(num_blocks, PAGE, kv_heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    shared_ids = torch.arange(prefix_blocks, device="cuda")
    tables = torch.stack([torch.cat([shared_ids, prefix_blocks + i * own_blocks + torch.arange(own_blocks, device="cuda")])
                          for i in range(n)])  # (N, blocks)
    context = prefix + OWN
    last_block = tables[:, -1]
    meta = AttentionMetadata(
        block_size=PAGE,
        slot_mapping=last_block * PAGE + PAGE - 1,  # the new token is each sequence's last own slot
        query_start=torch.arange(n + 1, device="cuda"),
        query_lens=[1] * n,
        context_lens=torch.full((n,), context, device="cuda"),
        block_tables=tables,
        shared_lens=torch.full((n,), prefix if sharing else 0, device="cuda"),
        shared=[SharedPrefix(torch.arange(n, device="cuda"), torch.arange(n, device="cuda"), shared_ids, prefix)]
        if sharing else [],
    )
    q = torch.randn(n, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, kv_heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    return q, k, torch.randn_like(k), k_cache, v_cache, meta


def time_ms(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=50)


def sdpa_ms(n: int, prefix: int, kv_heads: int) -> float | None:
    context = prefix + OWN
    if 2 * n * HEADS * context * HEAD_DIM * 2 > 30e9:  # expanded K and V must fit beside the rest
        return None
    q = torch.randn(n, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    ms = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    del q, k, v
    torch.cuda.empty_cache()
    return ms


def measure(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from parrot_lc.engine.triton_attention import TritonBackend

    backend = TritonBackend()
    bandwidth = copy_bandwidth()
    cases = []
    for kv_heads, n, prefix in tqdm(CASES, desc="cases"):
        row = {"n": n, "prefix": prefix, "own": OWN, "kv_heads": kv_heads}
        for key, sharing in (("ours_ms", True), ("no_sharing_ms", False)):
            q, k, v, k_cache, v_cache, meta = build_case(n, prefix, kv_heads, sharing)
            row[key] = time_ms(lambda: backend.forward(q, k, v, k_cache, v_cache, meta, HEAD_DIM**-0.5))
            del q, k, v, k_cache, v_cache, meta
        torch.cuda.empty_cache()
        row["sdpa_ms"] = sdpa_ms(n, prefix, kv_heads)
        kv_bytes_per_token = 2 * kv_heads * HEAD_DIM * 2
        row["floor_ms"] = (prefix + n * OWN) * kv_bytes_per_token / bandwidth * 1e3
        row["ours_over_floor"] = row["ours_ms"] / row["floor_ms"]
        cases.append(row)
        print(json.dumps(row))
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
            for key, label in (("ours_ms", "parrot_lc (shared)"), ("no_sharing_ms", "parrot_lc, no sharing"),
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
