"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over the paged KV cache.

Module names follow Hugging Face's LlamaForCausalLM, except that q/k/v and gate/up are stacked into one
matrix each; `checkpoint_tensors` maps a checkpoint's names onto them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parrot_lc.engine import cpu_kernels
from parrot_lc.engine.attention import AttentionBackend, AttentionMetadata
from parrot_lc.engine.model_config import ModelConfig


def _fused_ops():
    """Triton kernels for the elementwise work on the GPU (imported only there)."""
    from parrot_lc.engine import fused_ops

    return fused_ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds the residual stream (if any) to x, then normalises: returns (normed, new residual)."""
        if x.is_cuda:
            return _fused_ops().add_rms_norm(x, self.weight, self.eps, residual)
        if cpu_kernels.serves(x):
            return cpu_kernels.add_rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
        if x.dtype == torch.float32:  # the weight multiplied in the same op
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps), x
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)  # (T, C) float32, one fused op
        return self.weight * normed.to(x.dtype), x


class Rope:
    """Rotary position embedding of one forward pass (cos/sin computed once, shared by all layers)."""

    def __init__(self, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype) -> None:
        self.positions, self.inv_freq, self.scaling = positions, inv_freq, scaling
        if not positions.is_cuda:  # on the GPU a fused kernel computes them in place
            freqs = positions[:, None].float() * inv_freq[None, :]  # (T, D/2)
            cos, sin = freqs.cos() * scaling, freqs.sin() * scaling
            self.cos = torch.cat((cos, cos), dim=-1)[:, None, :].to(dtype)  # (T, 1, D)
            # rotate_half(x) * sin, with rotate_half(x) = (-x2, x1), is x's halves swapped (a roll) times (-sin, sin)
            self.sin = torch.cat((-sin, sin), dim=-1)[:, None, :].to(dtype)

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if q.is_cuda:  # in place, through the strides of the fused q/k/v output
            _fused_ops().rotary_(q, k, self.positions, self.inv_freq, self.scaling)
            return q, k
        if cpu_kernels.serves(q):  # in place too
            cpu_kernels.rotary_(q, k, self.cos, self.sin)
            return q, k
        half = q.shape[-1] // 2
        return (torch.addcmul(q * self.cos, q.roll(half, -1), self.sin),
                torch.addcmul(k * self.cos, k.roll(half, -1), self.sin))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # q, k and v in one matrix product (one weight read, one launch); checkpoints load into its slices.
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.backend = backend
        self.scale = self.head_dim**-0.5

    def checkpoint_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        slices = {"q_proj": (0, self.q_size), "k_proj": (self.q_size, self.kv_size),
                  "v_proj": (self.q_size + self.kv_size, self.kv_size)}
        tensors = {f"{prefix}.o_proj.weight": self.o_proj.weight}
        for name, (start, size) in slices.items():
            tensors[f"{prefix}.{name}.weight"] = self.qkv_proj.weight[start : start + size]
            if self.qkv_proj.bias is not None:
                tensors[f"{prefix}.{name}.bias"] = self.qkv_proj.bias[start : start + size]
        return tensors

    def forward(
        self,
        x: torch.Tensor,  # (T, C)
        rope: "Rope",
        k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.view(T, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        q, k = rope.apply(q, k)
        out = self.backend.forward(q, k, v, k_cache, v_cache, meta, self.scale)  # (T, Hq, D)
        return self.o_proj(out.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def checkpoint_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        size = self.intermediate_size
        return {
            f"{prefix}.gate_proj.weight": self.gate_up_proj.weight[:size],
            f"{prefix}.up_proj.weight": self.gate_up_proj.weight[size:],
            f"{prefix}.down_proj.weight": self.down_proj.weight,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (T, 2I)
        if cpu_kernels.serves(gate_up):
            return self.down_proj(cpu_kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)  # (T, I) each
        hidden = _fused_ops().silu_mul(gate, up) if x.is_cuda else F.silu(gate) * up
        return self.down_proj(hidden)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, rope, k_cache, v_cache, meta):
        """x: the previous sublayer's output; residual: the running sum before it (None at the first layer)."""
        h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, rope, k_cache, v_cache, meta), residual)
        return self.mlp(h), residual


class LlamaBody(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, backend) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaBody(config, backend)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", config.inv_freq.clone(), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,)
        positions: torch.Tensor,  # (T,)
        kv_cache: torch.Tensor,  # (L, 2, num_blocks, block_size, Hkv, D)
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # (T, C) final hidden states
        x = self.model.embed_tokens(input_ids)
        rope = Rope(positions, self.inv_freq, self.config.rope_scaling, x.dtype)
        residual = None
        for layer, layer_cache in zip(self.model.layers, kv_cache):
            x, residual = layer(x, residual, rope, layer_cache[0], layer_cache[1], meta)
        return self.model.norm(x, residual)[0]

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Our parameters (or slices of them) under the names of a Hugging Face checkpoint; loading copies
        each checkpoint tensor into its view here."""
        tensors = {
            "model.embed_tokens.weight": self.model.embed_tokens.weight,
            "model.norm.weight": self.model.norm.weight,
            "lm_head.weight": self.lm_head.weight,
        }
        for i, layer in enumerate(self.model.layers):
            prefix = f"model.layers.{i}"
            tensors[f"{prefix}.input_layernorm.weight"] = layer.input_layernorm.weight
            tensors[f"{prefix}.post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
            tensors.update(layer.self_attn.checkpoint_tensors(f"{prefix}.self_attn"))
            tensors.update(layer.mlp.checkpoint_tensors(f"{prefix}.mlp"))
        return tensors

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (N, C) -> (N, V) float32."""
        return self.lm_head(hidden).float()
