"""Where a shared-prefix decode step's attention time goes, kernel by kernel: a target for Nsight Compute.

Runs the engine's decode attention (cuda_attention.CudaBackend: the CUDA kernel's plan, or the Triton kernel's
pick for the steps it routes there) once on each case of benchmarks/kernel_shared_prefix.py's layout, inside the
CUDA profiler's range, after a warm-up call outside it; prints each case's plan. Profile it with

    PYTHONPATH=. ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
        -o $OUT/cases python3 benchmarks/kernel_profile.py
    ncu -i $OUT/cases.ncu-rep --page details > $OUT/cases.txt

A case is KV heads, forks, prefix tokens and each fork's own tokens (kernel_shared_prefix's 256, or 96: the
Llama-3-8B engine benchmark's forks after 32 decode steps).
"""

from __future__ import annotations

import argparse

import torch

import kernel_shared_prefix as cases
from parrot_lc.engine import cuda_attention

DEFAULT_CASES = ["8,256,16384,256", "8,256,4096,256", "8,64,4096,256", "8,16,16384,256", "32,16,1024,256",
                 "8,230,4096,96"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=DEFAULT_CASES, help="KV_HEADS,FORKS,PREFIX,OWN")
    args = parser.parse_args()
    backend = cuda_attention.CudaBackend()
    for case in args.cases:
        kv_heads, forks, prefix, own = (int(x) for x in case.split(","))
        cases.OWN = own  # build_case reads the module's own length
        q, k_cache, v_cache, layout, _ = cases.build_case(forks, prefix, kv_heads, sharing=True)
        scale = cases.HEAD_DIM**-0.5
        kernel = "triton" if cuda_attention.small_gqa_groups(q, k_cache, layout) else "cuda"
        print(case, kernel, cuda_attention.plan(q, k_cache, layout), flush=True)
        backend.decode(q, k_cache, v_cache, layout, scale)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        backend.decode(q, k_cache, v_cache, layout, scale)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        del q, k_cache, v_cache, layout
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
