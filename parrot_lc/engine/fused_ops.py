"""Triton kernels that fuse the elementwise work of a decoder layer on the GPU (residual add + RMSNorm,
rotary embedding, SiLU-and-multiply). At small batches a decode step is dozens of tiny kernels per layer;
fusing them cuts launches and round trips to memory. The plain torch code in models/ is the reference."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(X, R, W, Out, stride_x, stride_r, stride_o, N, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(R + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(R + row * stride_r + cols, x, mask=ok)  # the new residual stream, in place
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)
    w = tl.load(W + cols, mask=ok, other=0.0)
    tl.store(Out + row * stride_o + cols, w * (xf * rstd).to(x.dtype), mask=ok)


def add_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual); x, residual: (T, C). The residual is updated in place."""
    out = torch.empty_like(x)
    num_rows, n = x.shape
    _add_rms_norm_kernel[(num_rows,)](
        x, residual if residual is not None else x, weight, out, x.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0), n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n), num_warps=8 if n >= 4096 else 4,
    )
    return out, (residual if residual is not None else x)


@triton.jit
def _rotate_heads(X, t, stride_t, stride_h, H, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    i = tl.arange(0, HALF)
    h = tl.arange(0, BLOCK_H)
    ptr = X + t * stride_t + h[:, None] * stride_h + i[None, :]
    ok = (h < H)[:, None]
    x1 = tl.load(ptr, mask=ok, other=0.0)
    x2 = tl.load(ptr + HALF, mask=ok, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(ptr, (x1f * cos - x2f * sin).to(x1.dtype), mask=ok)
    tl.store(ptr + HALF, (x2f * cos + x1f * sin).to(x1.dtype), mask=ok)


@triton.jit
def _rotary_kernel(Q, K, positions, inv_freq, stride_qt, stride_qh, stride_kt, stride_kh, scaling,
                   HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    angle = tl.load(positions + t).to(tl.float32) * tl.load(inv_freq + tl.arange(0, HALF))  # (HALF,)
    cos = (tl.cos(angle) * scaling)[None, :]
    sin = (tl.sin(angle) * scaling)[None, :]
    _rotate_heads(Q, t, stride_qt, stride_qh, HQ, cos, sin, HALF, BLOCK_H)
    _rotate_heads(K, t, stride_kt, stride_kh, HKV, cos, sin, HALF, BLOCK_H)


def rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> None:
    """Rotates q (T, Hq, D) and k (T, Hkv, D) in place by their positions (T,) (NeoX half-split layout)."""
    num_tokens, num_heads, head_dim = q.shape
    _rotary_kernel[(num_tokens,)](
        q, k, positions, inv_freq, q.stride(0), q.stride(1), k.stride(0), k.stride(1), scaling,
        HQ=num_heads, HKV=k.shape[1], HALF=head_dim // 2, BLOCK_H=triton.next_power_of_2(max(num_heads, k.shape[1])),
    )


@triton.jit
def _silu_mul_kernel(G, U, Out, stride_g, stride_u, stride_o, N, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(G + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=ok, other=0.0)
    silu = (g / (1.0 + tl.exp(-g))).to(u.dtype)
    tl.store(Out + row * stride_o + cols, silu * u, mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, both (T, I)."""
    out = torch.empty_like(up)
    num_rows, n = up.shape
    block = 1024
    _silu_mul_kernel[(num_rows, triton.cdiv(n, block))](
        gate, up, out, gate.stride(0), up.stride(0), out.stride(0), n, BLOCK=block
    )
    return out
