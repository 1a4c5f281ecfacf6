"""parrot_lc: serve LangChain applications as graphs of Semantic Variables (after Parrot, OSDI'24)."""

import os

from setuptools import find_packages, setup


def cuda_extension() -> dict:
    """The CUDA decode-attention kernels as parrot_lc._cuda, built only where torch has CUDA and nvcc is found.
    Elsewhere (a CPU torch, or pip's isolated build environment, which has no torch) the package installs
    without it and parrot_lc.engine.cuda_attention.available() is False."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return {}
    # Hopper (sm_90) always, plus whatever the builder asks for; the kernels need sm_80 or newer (mma.sync bf16).
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(",", ";").replace(" ", ";").split(";")
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(sorted({a for a in archs if a} | {"9.0"}))
    extension = CUDAExtension(
        name="parrot_lc._cuda",
        sources=["csrc/bindings.cpp", "csrc/shared_prefix_decode.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="parrot-lc",
    version="0.1.0",
    description="A LangChain-compatible serving backend for LLM applications, after Parrot (OSDI'24)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["parrot_lc", "parrot_lc.*"]),
    package_data={"parrot_lc.engine": ["tiny/*"]},
    install_requires=[
        # torch 2.13 (CPU) here, 2.11 (CUDA) on the GPU machine; install torch==2.13.0 first on a CPU box.
        "torch>=2.11,<2.14",
        "transformers>=5.17,<6",
        "tokenizers>=0.22",
        "safetensors>=0.4",
        "gguf>=0.17",
        "numpy>=1.26",
        "pydantic>=2.7,<3",
        "pydantic-settings>=2.3,<3",
        "pyyaml>=6",  # YAML config files (TOML and JSON need nothing beyond the standard library)
        "triton>=3.6; platform_system == 'Linux'",
        "tqdm>=4.60",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "httpx>=0.27",
        "prometheus-client>=0.20",
        "langchain-core>=1.0,<2",
    ],
    extras_require={
        # accelerate: transformers reads GGUF files only with it installed (the tests compare against that)
        "test": ["pytest>=8", "matplotlib>=3.8", "hypothesis>=6.100", "accelerate>=1.0", "openai>=1.40",
                 "langchain-tests>=1.1.9,<2", "pytest-asyncio>=0.23", "langchain-text-splitters>=1.0",
                 "schemathesis>=4.0,<5"],
        "examples": ["langchain-text-splitters>=1.0"],
    },
    entry_points={"console_scripts": ["parrot-lc=parrot_lc.cli:main"]},
    **cuda_extension(),
)
