"""Our model over the paged cache computes the logits of Hugging Face transformers' own model."""

import pytest
import torch

from conftest import assert_logits_follow_reference

FAMILIES = ["llama", "llama3-rope-tied", "qwen2", "mistral-sliding-window"]


@pytest.mark.parametrize(
    "family, backend", [(f, "torch") for f in FAMILIES] + [("llama", "triton"), ("mistral-sliding-window", "triton")]
)
def test_prefill_and_20_decode_steps_match_transformers(family, backend, hf_checkpoint, make_engine):
    path, hf_model = hf_checkpoint(family)
    # Triton runs on the GPU when there is one, else in its CPU interpreter.
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    engine = make_engine(model=str(path), block_size=8, attention_backend=backend, device=device)
    prompt = torch.randint(0, 512, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    assert_logits_follow_reference(engine, hf_model, prompt)


def test_chunked_prefill_matches_one_shot_prefill(hf_checkpoint, make_engine):
    path, hf_model = hf_checkpoint("llama")
    engine = make_engine(model=str(path), block_size=8, max_num_batched_tokens=7)
    prompt = torch.randint(0, 512, (50,), generator=torch.Generator().manual_seed(2)).tolist()
    engine.fill(prompt, "c")
    with torch.no_grad():
        expected = hf_model(torch.tensor([prompt])).logits[0, -1]
    assert (engine.context_logits("c") - expected).abs().max().item() <= 1e-4
