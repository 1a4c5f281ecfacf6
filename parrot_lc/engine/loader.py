"""Finds a model by name or path and builds it with its weights and tokenizer. No hub access."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from parrot_lc.engine.attention import AttentionBackend
from parrot_lc.engine.cpu_weights import resolve_weight_format, use_weight_format
from parrot_lc.engine.errors import ModelLoadError
from parrot_lc.engine.model_config import DUMMY_MODELS, ModelConfig
from parrot_lc.engine.models.llama import LlamaForCausalLM
from parrot_lc.settings import CpuWeightFormat

TINY_DIR = Path(__file__).parent / "tiny"


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: PreTrainedTokenizerBase | None
    weight_format: str  # how its linear layers hold their weights (engine/cpu_weights.py), or their dtype


def writes_into_cache_dir(name: str) -> bool:
    """Whether resolve_checkpoint writes `name`'s checkpoint under cache_dir: a named dummy model's (its config
    and the tiny tokenizer) or a GGUF file's conversion (smollm2's too)."""
    return name in DUMMY_MODELS or name == "smollm2" or name.endswith(".gguf")


def resolve_checkpoint(name: str, cache_dir: Path) -> tuple[Path, bool]:
    """Maps a model name to a checkpoint directory; the flag says whether its weights are random (tiny and the
    named dummy models, whose directory is written under cache_dir: their config and the tiny tokenizer)."""
    if name == "tiny":
        return TINY_DIR, True
    if name in DUMMY_MODELS:
        return _dummy_checkpoint(name, Path(cache_dir)), True
    if name == "smollm2" or name.endswith(".gguf"):
        from parrot_lc.engine.gguf_checkpoint import gguf_to_checkpoint, smollm2_gguf_path

        gguf_path = smollm2_gguf_path() if name == "smollm2" else Path(name)
        return gguf_to_checkpoint(gguf_path, cache_dir), False
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"model {name!r} is neither `smollm2`, `tiny`, {', '.join(f'`{m}`' for m in DUMMY_MODELS)}, a .gguf "
            "file nor a checkpoint directory with config.json"
        )
    return path, False


def _dummy_checkpoint(name: str, cache_dir: Path) -> Path:
    path = cache_dir / name
    path.mkdir(parents=True, exist_ok=True)
    for file in TINY_DIR.iterdir():
        if file.name != "config.json":
            shutil.copyfile(file, path / file.name)
    (path / "config.json").write_text(json.dumps(DUMMY_MODELS[name], indent=2))
    return path


def load_model(
    name: str,
    backend: AttentionBackend,
    dtype: torch.dtype,
    device: torch.device,
    cache_dir: Path,
    seed: int = 0,
    random_weights: bool = False,
    cpu_weight_format: CpuWeightFormat = "float32",
) -> LoadedModel:
    """Builds the model on `device`; with `random_weights` only config.json (and a tokenizer, if any) is read. A
    float32 model on a CPU then holds its linear layers' weights in `cpu_weight_format` (`auto`: by the CPU's
    features)."""
    path, always_random = resolve_checkpoint(name, cache_dir)
    random_weights = random_weights or always_random
    config = ModelConfig.from_pretrained(path)
    tokenizer = _tokenizer(path)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are made in the weights' dtype, never in float32 first
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config, backend)
    finally:
        torch.set_default_dtype(default_dtype)
    model.to_empty(device=device)
    model.inv_freq = config.inv_freq.to(device)  # float32 whatever the weights' dtype
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if random_weights:
        init_random_weights(model, seed)
    else:
        _load_safetensors(model, path)
    weight_format = resolve_weight_format(cpu_weight_format, device, dtype)
    if device.type == "cpu" and dtype == torch.float32:
        use_weight_format(model, weight_format)
    model.eval().requires_grad_(False)
    return LoadedModel(model, config, tokenizer, weight_format)


def load_model_info(name: str, cache_dir: Path) -> tuple[ModelConfig, PreTrainedTokenizerBase | None]:
    """The config and tokenizer of a model without its weights (a manager whose engines run elsewhere)."""
    path, _ = resolve_checkpoint(name, cache_dir)
    return ModelConfig.from_pretrained(path), _tokenizer(path)


def _tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    if (path / "tokenizer.json").exists() or (path / "tokenizer.model").exists():
        return AutoTokenizer.from_pretrained(str(path))
    return None


def init_random_weights(model: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights (norms at one, biases at zero), generated on the model's device."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name.endswith(".bias"):
            param.data.zero_()
        else:
            param.data.normal_(0.0, 0.02, generator=generator)


@torch.no_grad()
def _load_safetensors(model: LlamaForCausalLM, path: Path) -> None:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(path.glob("*.safetensors"))]
    if not files:
        raise ModelLoadError(f"no .safetensors weights in {path}")
    targets = model.checkpoint_tensors()
    loaded: set[str] = set()
    for file in files:
        try:
            with safe_open(str(path / file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name not in targets:
                        continue
                    tensor = f.get_tensor(name)
                    if tensor.shape != targets[name].shape:
                        raise ModelLoadError(f"{file}: {name} has shape {tuple(tensor.shape)}, "
                                             f"the config says {tuple(targets[name].shape)}")
                    targets[name].copy_(tensor)
                    loaded.add(name)
        except (SafetensorError, OSError) as exc:  # missing, truncated, a header that is no safetensors header
            raise ModelLoadError(f"{path / file} is not a readable safetensors file (missing, corrupt or truncated): "
                                 f"{exc}") from None
    missing = set(targets) - loaded
    if model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ModelLoadError(f"checkpoint {path} lacks {sorted(missing)[:5]}")
