"""A CPU engine's per-token work in compiled loops (csrc/cpu_decode.cpp, built as parrot_lc._cpu by setup.py).

Run as torch ops, a decode step of SmolLM2-135M on 2 cores is ~1,500 small ops: ~13 ms of dispatch beside ~15 ms of
products (benchmarks/RESULTS.md). The model calls these instead, one call per sublayer's elementwise work, for
float32 activations on a CPU that has AVX2, FMA and F16C (every x86-64 CPU since 2013-2015); elsewhere, or where
the library was not built (no C++ compiler at install), the model runs its torch ops, which compute the same values
within float32's rounding.
"""

from __future__ import annotations

import functools

import torch

try:
    from parrot_lc import _cpu
except ImportError:  # not built: setup.py found no compiler, or the package runs from a source tree unbuilt
    _cpu = None

# Rows up to which a float16-weight product reads each weight once for all rows here (a decode step of a sequence
# or two). Past them FBGEMM's blocked product is faster. Measured on the AMD EPYC of these machines, 2 threads, 212 MB
# of a layer shape's weights cycling through memory: at 1 / 2 / 3 rows ours 8.3 / 8.5 / 9.3 ms, FBGEMM 8.9 / 8.6 /
# 9.6 (and ours saves FBGEMM's ~25 us a call); from 4 rows FBGEMM's is faster (the head's shape at 4 rows: 5.8 ms
# against our 8.5).
MAX_PRODUCT_ROWS = 2


@functools.cache
def available() -> bool:
    """Whether the kernels are built and this CPU has what they use."""
    return _cpu is not None and _cpu.supported()


def serves(x: torch.Tensor) -> bool:
    """Whether the kernels compute for this activation tensor: float32, on a CPU that has them."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and available()


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, C) plus the residual (if any), RMS-normalised times weight: (normed, new residual)."""
    normed, stream = _cpu.add_rms_norm(x, weight, eps, residual)
    return normed, stream


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotary embedding in place on q (T, Hq, D) and k (T, Hkv, D): x * cos + (x's halves swapped) * sin, with
    cos and sin (T, 1, D) as llama.Rope holds them (sin signed (-sin, sin))."""
    _cpu.rotary_(q, k, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up (T, 2I), gate and up side by side: (T, I)."""
    return _cpu.silu_mul(gate_up)


def product_f16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (T, K) float32 times weight (N, K) float16, transposed: (T, N) float32, each sum in one fixed order."""
    return _cpu.product_f16(x, weight)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slots: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """A decode step (row b is sequence b's one query): writes k, v (B, Hkv, D) at slots (B,), then attends q
    (B, Hq, D) over each sequence's KV [0, context_lens[b]) through its block table (B, max_blocks): (B, Hq, D)."""
    return _cpu.decode_attention(q, k, v, k_cache, v_cache, slots, block_tables, context_lens, scale)
