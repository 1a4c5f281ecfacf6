"""The engine's decode attention and the CUDA kernel's plans on benchmarks/kernel_shared_prefix.py's 18 cases, no
peers: a quick A/B of two builds of the kernel (each timed from its own tree's root, one after the other, on one
machine). Per case: `engine` (cuda_attention.CudaBackend's pick), each plan of kernel_shared_prefix.cuda_plans
named in --plans and, where `cuda` is named, the CUDA kernel in the plan it picks (where the engine may take the
Triton kernel instead), in us, and the byte floor; one JSON line a case, and all of them in --out.

    python3 setup.py build_ext --inplace
    PYTHONPATH=. python3 benchmarks/kernel_plans.py --plans warp_specialized --out $OUT/plans.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kernel_shared_prefix import CASES, HEAD_DIM, OWN, build_case, copy_bandwidth, cuda_plans, time_ms
from parrot_lc.engine import cuda_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", nargs="*", default=["warp_specialized"],
                        help="plans of kernel_shared_prefix.cuda_plans (or `cuda`, the kernel's own pick) to time "
                             "besides the engine's pick")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    backend = cuda_attention.CudaBackend()
    rows = []
    for kv_heads, n, prefix in CASES:
        q, k_cache, v_cache, layout, _ = build_case(n, prefix, kv_heads, sharing=True)
        scale = HEAD_DIM**-0.5
        row = {"kv_heads": kv_heads, "n": n, "prefix": prefix,
               "engine": time_ms(lambda: backend.decode(q, k_cache, v_cache, layout, scale))[0] * 1e3}
        if "cuda" in args.plans:
            row["cuda"] = time_ms(lambda: cuda_attention.cuda_decode_attention(q, k_cache, v_cache, layout,
                                                                               scale))[0] * 1e3
        for name, launch in cuda_plans(q, k_cache, layout).items():
            if name in args.plans:
                row[name] = time_ms(lambda: cuda_attention.cuda_decode_attention(
                    q, k_cache, v_cache, layout, scale, launch=launch))[0] * 1e3
        row["floor"] = (prefix + n * OWN) * 2 * kv_heads * HEAD_DIM * 2 / bandwidth * 1e6
        del q, k_cache, v_cache, layout
        torch.cuda.empty_cache()
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_bandwidth_gb_s": bandwidth / 1e9,
                                    "cases": rows}, indent=1))


if __name__ == "__main__":
    main()
