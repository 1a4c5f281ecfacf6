"""The weights of a CPU engine's linear layers, held in the format that uses the CPU best: chosen once at start-up
from the CPU's features (`--cpu-weight-format auto`) or named.

A decode step of one sequence reads every weight once for one row of arithmetic, so its cost is the weights'
bytes; prefill and batched decode are arithmetic, which only matrix units (AMX, AVX512-BF16) do faster in fewer
bits. Measured on the AMD EPYC of these machines (AVX2, no AVX-512; benchmarks/RESULTS.md): SmolLM2-135M's
products of one decode step, 2 threads, float32 31 + 8 ms (layers + head), float16 12 + 2, bfloat16 14 + 4, int8
20 + 8 at one row; at 8 rows float32 49 + 18 (oneDNN's packed layout: 33 + 7), float16 20 + 5, bfloat16 165 + 77,
int8 164 + 26 (torch's bfloat16 products of several rows have no fast kernel without AVX512-BF16). float16's
products are FBGEMM's (in torch's x86 builds: float16 weights in a blocked layout, converted to float32 as they are
read): at one row they read the weights at 19 GB/s (the layers' matrices) to 30 (the head's), where torch's own
float16 product reads 13 to 15, and at 180 to 1,440 rows (prefill) they keep pace with oneDNN's float32. On the
Intel Xeon with AMX (../shared/REFERENCE.md): bfloat16 28 / 21 ms at 1 / 8 rows against float32's 28 / 57.

| format | how products run | weight memory (float32 = 1) |
|---|---|---|
| `float32` | as loaded (MKL) | 1 |
| `float16` | float16 weights, float32 inputs and sums (a row or two: the compiled kernel of cpu_kernels; more rows: FBGEMM; without either, torch's float16 product of inputs rounded to float16) | 1 with both the kernel's plain layout and FBGEMM's packed one, else 0.5 |
| `bfloat16` | bfloat16 weights and inputs (oneDNN: AMX / AVX512-BF16) | 0.5 |
| `int8` | int8 weights per output channel, weight only (`torch._weight_int8pack_mm`), bfloat16 inputs | 0.25 |

`float16` computes the same values at one row and at several (up to float32's order of sums: the kernel's at one
or two rows, FBGEMM's past them), so a request's answer does not depend on what it is batched with, and float16's 11-bit mantissa keeps float32's answers: SmolLM2's
greedy answers to the README's questions and the benchmark's prompts came out identical, where bfloat16 changed 3
of 11 within 48 tokens and int8 8 of 11. `auto` is `float16` on x86 CPUs with F16C (every AVX2 one), `float32`
elsewhere, and never `bfloat16`, even where AMX or AVX512-BF16 would multiply it faster: oneDNN's bfloat16 products
round differently by the number of rows, so a request's greedy answer changes with what it is batched with, and a
deferred run's answers with them (the README's main job on an AMD EPYC with AVX512-BF16: bfloat16 gave a summary other
than the eager run's, in 7.8 s; float16 the same summary, in 5.1 s). Only float32 models on a CPU use these
formats.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from parrot_lc.engine import cpu_kernels
from parrot_lc.settings import CpuWeightFormat


@dataclass(frozen=True)
class CpuFeatures:
    """What the engine's choices depend on, read once: the CPU's name and flags (/proc/cpuinfo) and torch's
    vector capability."""

    name: str
    capability: str  # torch's: "AVX2", "AVX512", "DEFAULT", ...
    flags: frozenset[str]

    @property
    def f16c(self) -> bool:
        """Whether float16 converts in hardware (every AVX2 CPU; /proc/cpuinfo's flag, else torch's capability)."""
        return "f16c" in self.flags or self.capability.startswith("AVX")


@functools.cache
def cpu_features() -> CpuFeatures:
    """This machine's CPU features, read once per process."""
    name, flags = "unknown CPU", frozenset()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = frozenset(value.split())
    return CpuFeatures(name, torch.backends.cpu.get_cpu_capability(), flags)


def choose_weight_format(setting: CpuWeightFormat, features: CpuFeatures) -> str:
    """The format a setting means on a CPU of these features (`auto`: see the module's docstring)."""
    if setting != "auto":
        return setting
    return "float16" if features.f16c else "float32"


def resolve_weight_format(setting: CpuWeightFormat, device: torch.device, dtype: torch.dtype) -> str:
    """The format a model's linear layers are held in: the setting's for a float32 model on a CPU (`auto` by this
    CPU's features), else the model's dtype (the setting is for CPUs only)."""
    if device.type == "cpu" and dtype == torch.float32:
        return choose_weight_format(setting, cpu_features())
    return str(dtype).removeprefix("torch.")


@functools.cache
def _fbgemm() -> bool:
    """Whether torch has FBGEMM's float16-weight product (its x86 builds do)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


class FormatLinear(nn.Module):
    """A linear layer whose weights a format holds: float32 in and out, the bias (if any) added in float32."""

    def __init__(self, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, K) -> (T, N)
        out = self.product(x)
        return out if self.bias is None else out + self.bias

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, K) float32 times the weights: (T, N) float32."""
        raise NotImplementedError


class Float16Linear(FormatLinear):
    """float16 weights. Products of a row or two by the compiled kernel where it is built (cpu_kernels: each weight
    read once, converted in registers); products of more rows by FBGEMM where torch has it (the weights packed in
    its blocked layout, each converted to float32 as it is read); inputs and sums in float32 in both. Elsewhere
    torch's float16 product."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(bias)
        weight = weight.detach().to(torch.float16).contiguous()  # (N, K)
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.float(), None) if _fbgemm() else None
        keep = self.packed is None or cpu_kernels.available()  # the kernel reads the plain layout
        self.register_buffer("weight", weight if keep else None)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= cpu_kernels.MAX_PRODUCT_ROWS and cpu_kernels.available():
            return cpu_kernels.product_f16(x, self.weight)
        if self.packed is not None:
            return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)
        return F.linear(x.to(torch.float16), self.weight).float()


class BFloat16Linear(FormatLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(bias)
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())  # (N, K)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight).float()


class Int8Linear(FormatLinear):
    """Symmetric int8 weights, one scale per output channel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(bias)
        weight = weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127  # (N,)
        self.register_buffer("weight", torch.round(weight / scales[:, None]).to(torch.int8).contiguous())  # (N, K)
        self.register_buffer("scales", scales.to(torch.bfloat16))

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scales).float()


LINEARS: dict[str, type[FormatLinear]] = {"float16": Float16Linear, "bfloat16": BFloat16Linear, "int8": Int8Linear}


def use_weight_format(model: nn.Module, weight_format: str) -> None:
    """Holds every linear layer of the model in the format (`float32`: leaves them as they are). Tied weights
    (the LM head and the embeddings) part: the embeddings keep the float32 table for their lookups."""
    if weight_format == "float32":
        return
    linear_class = LINEARS[weight_format]
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, linear_class(child.weight, child.bias))
