"""The embedded default, SmolLM2-135M-Instruct from its GGUF file, through our engine."""

import pytest
import torch

from conftest import assert_logits_follow_reference
from parrot_lc.cli import main as cli_main

pytest.importorskip("accelerate", reason="transformers reads GGUF files only with accelerate installed")


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_cache_dir):
    from parrot_lc.engine import LLMEngine
    from parrot_lc.settings import EngineSettings

    # float32 weights too: the comparison with transformers is exact (test_cpu_weights.py tests the other formats)
    return LLMEngine(EngineSettings(model="smollm2", device="cpu", dtype="float32", cpu_weight_format="float32",
                                    cache_dir=smollm2_cache_dir))


def test_smollm2_logits_equal_transformers_loaded_from_the_same_gguf(smollm2_engine):
    from transformers import AutoModelForCausalLM

    from parrot_lc.engine.gguf_checkpoint import smollm2_gguf_path

    path = smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = smollm2_engine.tokenizer
    tokens = tokenizer.apply_chat_template([{"role": "user", "content": "What is a parrot?"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    assert_logits_follow_reference(smollm2_engine, reference, list(tokens))


def test_demo_answers_from_a_forked_system_prompt(capsys, smollm2_cache_dir, monkeypatch):
    monkeypatch.setenv("PARROT_CACHE_DIR", str(smollm2_cache_dir))
    cli_main(["demo", "--max-tokens", "12"])
    out = capsys.readouterr().out
    assert "Paris" in out  # the capital of France: the real model, not noise
    assert "reused_by_forking=" in out and "reused_by_forking=0 " not in out
