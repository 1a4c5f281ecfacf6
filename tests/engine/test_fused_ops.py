"""The fused Triton elementwise kernels compute what the plain torch model code computes.

Without a GPU they run in Triton's interpreter in float32; on a GPU in bfloat16 as well."""

import pytest
import torch
import torch.nn.functional as F

from parrot_lc.engine import fused_ops
from parrot_lc.engine.models.llama import RMSNorm, Rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def close(a, b, dtype):
    return torch.allclose(a.float(), b.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_torch(dtype, with_residual):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 96, generator=gen).to(DEVICE, dtype)
    residual = torch.randn(7, 96, generator=gen).to(DEVICE, dtype) if with_residual else None
    norm = RMSNorm(96, 1e-5).to(DEVICE, dtype)
    norm.weight.data = torch.rand(96, generator=gen).to(DEVICE, dtype)
    expected_sum = x + residual if with_residual else x
    xf = expected_sum.float()
    expected = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    out, new_residual = fused_ops.add_rms_norm(x, norm.weight, 1e-5, residual.clone() if with_residual else None)
    assert close(out, expected, dtype) and close(new_residual, expected_sum, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(4, 2, 16), (9, 3, 64)])
def test_rotary_matches_torch(dtype, num_heads, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, num_heads, head_dim, generator=gen).to(DEVICE, dtype)
    k = torch.randn(5, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    positions = torch.tensor([0, 3, 17, 100, 2047])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    expected_q, expected_k = Rope(positions, inv_freq, 1.0, torch.float32).apply(q.float().cpu(), k.float().cpu())
    fused_ops.rotary_(q, k, positions.to(DEVICE), inv_freq.to(DEVICE), 1.0)
    assert close(q.cpu(), expected_q, dtype) and close(k.cpu(), expected_k, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(dtype):
    gen = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(3, 1500, generator=gen).to(DEVICE, dtype) for _ in range(2))
    assert close(fused_ops.silu_mul(gate, up), F.silu(gate) * up, dtype)
