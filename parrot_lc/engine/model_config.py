"""The shape of a Llama-family decoder, read from a Hugging Face config (config.json)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from parrot_lc.engine.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}
# Named models of a real checkpoint's shapes with random weights, for benchmarks: their config.json, used with
# the tiny model's byte-level tokenizer (ids past its 1,024 decode to no text). Llama-3-8B: grouped-query
# attention (8 KV heads of 32), a 128,256-token vocabulary; room for 16,384-token contexts.
DUMMY_MODELS = {
    "llama3-8b-dummy": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 16384, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": 128256,
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 2,
    },
}
# RoPE types whose frequencies do not depend on the sequence length, so they can be computed once.
STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn", "proportional"}


@dataclass(frozen=True)
class ModelConfig:
    """What the model code needs to know about a checkpoint."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    inv_freq: torch.Tensor  # (head_dim // 2,) rotary inverse frequencies
    rope_scaling: float  # multiplies cos/sin (yarn's attention factor; 1.0 otherwise)
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Reads config.json of a local checkpoint directory (no hub access)."""
        try:
            hf = AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read the model config in {path}: {exc}") from exc
        return cls.from_hf(hf)

    @classmethod
    def from_hf(cls, hf: PretrainedConfig) -> "ModelConfig":
        if hf.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"unsupported architecture {hf.model_type!r}: supported are {sorted(SUPPORTED_MODEL_TYPES)}"
            )
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        inv_freq, rope_scaling = _rope_frequencies(hf, head_dim)
        eos = hf.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        use_sliding = getattr(hf, "use_sliding_window", hf.model_type == "mistral")
        return cls(
            model_type=hf.model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            # Qwen2 always has a bias on q/k/v; Llama-family configs say so with attention_bias.
            qkv_bias=hf.model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            inv_freq=inv_freq,
            rope_scaling=rope_scaling,
            sliding_window=getattr(hf, "sliding_window", None) if use_sliding else None,
            eos_token_ids=eos_ids,
        )


def _rope_frequencies(hf: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    params = getattr(hf, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0}
    rope_type = params.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise ModelLoadError(f"unsupported RoPE type {rope_type!r}: supported are {sorted(STATIC_ROPE_TYPES)}")
    if rope_type == "default":
        base = params["rope_theta"]
        # float32 arithmetic, exactly as transformers computes it, so logits match bit for bit.
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
    return inv_freq.float(), float(factor)
