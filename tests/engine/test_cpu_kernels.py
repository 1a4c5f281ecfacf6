"""The compiled CPU kernels (csrc/cpu_decode.cpp, engine/cpu_kernels.py) against float64 references, and the CPU
engine with them against the engine without them."""

import platform
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from parrot_lc.engine import cpu_kernels
from parrot_lc.engine.attention import select_backend
from parrot_lc.engine.cpu_attention import CpuDecodeBackend
from parrot_lc.engine.cpu_weights import Float16Linear, cpu_features
from parrot_lc.engine.models.llama import Rope
from parrot_lc.settings import SettingsError

HAS_WHAT_THEY_USE = platform.machine() == "x86_64" and {"avx2", "fma", "f16c"} <= cpu_features().flags
BUILDABLE = shutil.which("c++") is not None and (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file()
needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="parrot_lc._cpu is not built or not usable")


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return float((ours.double() - expected).abs().max() / expected.abs().max())


@pytest.mark.skipif(not (HAS_WHAT_THEY_USE and BUILDABLE), reason="no x86-64 AVX2 CPU, C++ compiler or Python headers")
def test_the_kernels_are_built_and_used_where_a_compiler_and_the_cpu_allow():
    # The install (setup.py, scripts/install.sh) builds them wherever it can; a build that silently failed would
    # leave every CPU engine on the slower torch ops, and these tests skipped.
    assert cpu_kernels.available()
    assert isinstance(select_backend("auto", torch.device("cpu")), CpuDecodeBackend)


def test_the_cpu_backend_is_refused_on_a_gpu_device():
    with pytest.raises(SettingsError, match="attention_backend 'cpu'"):
        select_backend("cpu", torch.device("cuda"))


@needs_kernels
@pytest.mark.parametrize("rows, n, k", [(1, 96, 64), (2, 100, 72), (1, 37, 203), (5, 64, 576)])
def test_a_float16_product_equals_the_float64_product(rows, n, k):
    gen = torch.Generator().manual_seed(n + k)
    weight, x = (torch.randn(n, k, generator=gen) * 0.05).half(), torch.randn(rows, k, generator=gen)
    expected = x.double() @ weight.double().t()
    assert relative_error(cpu_kernels.product_f16(x, weight), expected) <= 1e-6


@needs_kernels
def test_a_float16_product_computes_a_row_alone_exactly_as_among_others():
    gen = torch.Generator().manual_seed(1)
    weight, x = (torch.randn(300, 576, generator=gen) * 0.05).half(), torch.randn(7, 576, generator=gen)
    together = cpu_kernels.product_f16(x, weight)
    assert torch.equal(together, torch.cat([cpu_kernels.product_f16(row[None], weight) for row in x]))


@needs_kernels
def test_a_float16_layer_uses_the_kernel_for_a_row_and_keeps_its_answer_for_many():
    gen = torch.Generator().manual_seed(2)
    weight, bias, x = torch.randn(96, 64, generator=gen) * 0.05, torch.randn(96, generator=gen), torch.randn(9, 64)
    layer, expected = Float16Linear(weight, bias), x.double() @ weight.half().double().t() + bias.double()
    assert relative_error(layer(x[:1]), expected[:1]) <= 1e-6  # the kernel
    assert relative_error(layer(x), expected) <= 1e-5  # FBGEMM


@needs_kernels
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_equals_the_float64_norm(with_residual):
    gen = torch.Generator().manual_seed(3)
    x, residual = (torch.randn(20, 96, generator=gen) for _ in range(2))
    weight = torch.randn(96, generator=gen)
    normed, stream = cpu_kernels.add_rms_norm(x, weight, 1e-5, residual if with_residual else None)
    total = x.double() + (residual.double() if with_residual else 0)
    expected = F.rms_norm(total, (96,), weight.double(), 1e-5)
    assert relative_error(stream, total) <= 1e-7 and relative_error(normed, expected) <= 1e-6


@needs_kernels
def test_rotary_in_place_equals_ropes_torch_ops():
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(6, (4 + 2 * 2) * 16, generator=gen)  # (T, (Hq + 2 Hkv) D): q and k are strided views
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)
    rope = Rope(torch.tensor([0, 1, 2, 7, 100, 4000]), inv_freq, 1.0, torch.float32)
    q, k, _ = qkv.split([64, 32, 32], dim=-1)
    q, k = q.view(6, 4, 16), k.view(6, 2, 16)
    half = 8
    expected_q = q * rope.cos + q.roll(half, -1) * rope.sin
    expected_k = k * rope.cos + k.roll(half, -1) * rope.sin
    cpu_kernels.rotary_(q, k, rope.cos, rope.sin)
    assert relative_error(q, expected_q.double()) <= 1e-6 and relative_error(k, expected_k.double()) <= 1e-6


@needs_kernels
def test_silu_mul_equals_the_float64_gated_activation():
    gate_up = torch.randn(3, 2 * 101, generator=torch.Generator().manual_seed(5)) * 6  # a tail past 8 lanes
    gate, up = gate_up.double().chunk(2, dim=-1)
    assert relative_error(cpu_kernels.silu_mul(gate_up), F.silu(gate) * up) <= 1e-6


def paged_decode_case(context_lens, num_heads, num_kv_heads, head_dim=16, block_size=4, seed=6):
    """q, new k and v of each sequence, caches whose blocks are scattered (unused ones hold NaN: a kernel that
    reads past a sequence's end fails), slots, block tables and the float64 dense K and V of each sequence."""
    gen = torch.Generator().manual_seed(seed)
    blocks_of = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_of) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    tables, dense = [], []
    for n, count in zip(context_lens, blocks_of):
        table, order = order[:count], order[count:]
        keys, values = (torch.randn(n, num_kv_heads, head_dim, generator=gen) for _ in range(2))
        for j in range(n - 1):  # the last token's K and V come in the step
            k_cache[table[j // block_size], j % block_size] = keys[j]
            v_cache[table[j // block_size], j % block_size] = values[j]
        tables.append(table + [table[0]] * (max(blocks_of) - count))
        dense.append((keys.double(), values.double()))
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=gen)
    k, v = torch.stack([d[0][-1] for d in dense]).float(), torch.stack([d[1][-1] for d in dense]).float()
    slots = torch.tensor([t[(n - 1) // block_size] * block_size + (n - 1) % block_size
                          for t, n in zip(tables, context_lens)])
    return q, k, v, k_cache, v_cache, slots, torch.tensor(tables), torch.tensor(context_lens), dense


@needs_kernels
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (6, 2), (8, 2), (9, 3)])
@pytest.mark.parametrize("context_lens", [[1], [5, 13, 4], [37, 2, 300]])
def test_decode_attention_equals_float64_attention_over_each_sequences_paged_kv(context_lens, num_heads, num_kv_heads):
    q, k, v, k_cache, v_cache, slots, tables, lens, dense = paged_decode_case(context_lens, num_heads, num_kv_heads)
    out = cpu_kernels.decode_attention(q, k, v, k_cache, v_cache, slots, tables, lens, 0.25)
    group = num_heads // num_kv_heads
    for b, (keys, values) in enumerate(dense):
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)  # (L, Hq, D)
        probs = torch.einsum("hd,lhd->hl", q[b].double() * 0.25, keys).softmax(-1)
        assert relative_error(out[b], torch.einsum("hl,lhd->hd", probs, values)) <= 1e-5
    written = k_cache.view(-1, num_kv_heads, 16)[slots]
    assert torch.equal(written, k)


@needs_kernels
def test_decode_attention_refuses_a_context_longer_than_its_table():
    q, k, v, k_cache, v_cache, slots, tables, lens, _ = paged_decode_case([5, 6], 4, 2)
    with pytest.raises(RuntimeError, match="outside its table"):
        cpu_kernels.decode_attention(q, k, v, k_cache, v_cache, slots, tables, lens * 10, 0.25)


@needs_kernels
def test_decode_attention_refuses_a_block_outside_the_cache():
    q, k, v, k_cache, v_cache, slots, tables, lens, _ = paged_decode_case([5, 6], 4, 2)
    tables[1, 0] = k_cache.shape[0]
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_kernels.decode_attention(q, k, v, k_cache, v_cache, slots, tables, lens, 0.25)


@needs_kernels
def test_the_engine_with_the_kernels_computes_the_logits_of_the_engine_without(make_engine, monkeypatch):
    with_kernels = make_engine(cpu_weight_format="float16")
    assert isinstance(with_kernels.backend, CpuDecodeBackend)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    without = make_engine(cpu_weight_format="float16", attention_backend="torch")
    prompt = torch.randint(0, 500, (30,), generator=torch.Generator().manual_seed(7)).tolist()
    for step in range(5):  # the prefill's logits, then decode steps (one row: the kernel's product)
        ids = prompt if step == 0 else [int(expected.argmax())]
        monkeypatch.setattr(cpu_kernels, "available", lambda: True)
        with_kernels.fill(ids, "c")
        ours = with_kernels.context_logits("c")
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
        without.fill(ids, "c")
        expected = without.context_logits("c")
        assert relative_error(ours, expected.double()) <= 1e-5, f"step {step}"
