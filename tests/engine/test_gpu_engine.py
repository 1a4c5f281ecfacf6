"""On a GPU: the Triton and CUDA backends and CUDA-graph decode compute what the eager torch reference computes."""

import time

import pytest
import torch

from conftest import GPU
from parrot_lc.engine import SamplingParams, cuda_attention

pytestmark = GPU


@pytest.fixture(params=["triton", "cuda"])
def gpu_backend(request) -> str:
    if request.param == "cuda" and not cuda_attention.available():
        pytest.skip("needs parrot_lc._cuda")
    return request.param


def decode_all(engine, prompts, max_tokens=12):
    engine.run_until_done([engine.submit_fill(p, i) for i, p in enumerate(prompts)])
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    gens = [engine.submit_generate(sampling, i) for i in range(len(prompts))]
    events = engine.run_until_done(gens)
    return [[t for e in events[g.request_id] for t in e.token_ids] for g in gens]


def test_cuda_graph_decode_equals_eager_decode_with_padded_buckets(make_engine, gpu_backend):
    prompts = [list(range(3 + i, 40 + 7 * i)) for i in range(5)]  # batch 5 replays the bucket of 8
    eager = decode_all(make_engine(device="cuda", attention_backend="torch"), prompts)
    graphed_engine = make_engine(device="cuda", attention_backend=gpu_backend, cuda_graphs=True)
    graphed = decode_all(graphed_engine, prompts)
    assert graphed_engine.runner.graphs._graphs, "no CUDA graph was replayed"
    assert graphed == eager


def test_cuda_graph_logits_equal_eager_logits(make_engine, gpu_backend):
    engines = [make_engine(device="cuda", attention_backend=gpu_backend, cuda_graphs=g) for g in (False, True)]
    for engine in engines:
        engine.fill(list(range(3, 50)), "a")
        engine.fill(list(range(9, 30)), "b")
        engine.run_until_done([engine.submit_fill([7], "a"), engine.submit_fill([8], "b")])
    for context in ("a", "b"):
        assert torch.allclose(engines[0].context_logits(context), engines[1].context_logits(context), atol=1e-4)


def forked_decode(engine, max_tokens=10):
    """Two prefixes with forks (3 and 2) and one unforked sequence, decoded together."""
    engine.fill(list(range(3, 70)), "p1")
    engine.fill(list(range(100, 140)), "p2")
    children = [(f"a{i}", "p1") for i in range(3)] + [(f"b{i}", "p2") for i in range(2)] + [("c", None)]
    engine.run_until_done([engine.submit_fill(list(range(200 + 5 * i, 209 + 5 * i)), child, parent)
                           for i, (child, parent) in enumerate(children)])
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    gens = [engine.submit_generate(sampling, child) for child, _ in children]
    events = engine.run_until_done(gens)
    return [[t for e in events[g.request_id] for t in e.token_ids] for g in gens]


def test_cuda_graph_decode_of_shared_prefix_groups_equals_eager_reference(make_engine, gpu_backend):
    eager = forked_decode(make_engine(device="cuda", attention_backend="torch"))
    graphed_engine = make_engine(device="cuda", attention_backend=gpu_backend, cuda_graphs=True)
    graphed_engine.runner.min_shared_elements_decode = 0  # every shared prefix read once for its group
    graphed = forked_decode(graphed_engine)
    assert any(groups for _, groups in graphed_engine.runner.graphs._graphs), "no graph with shared groups replayed"
    assert graphed == eager


def test_overlapped_steps_decode_forks_as_steps_one_at_a_time_do(make_engine, gpu_backend):
    """Each decode step is launched before the tokens of the step before are read back: its input tokens come
    from the device, into the CUDA graphs' buffers, and the outputs are those of steps taken one at a time."""
    outputs = []
    for overlap in (True, False):
        engine = make_engine(device="cuda", attention_backend=gpu_backend, overlap_steps=overlap)
        engine.runner.min_shared_elements_decode = 0  # shared-prefix groups in the graphs too
        outputs.append(forked_decode(engine))
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("overlap", [True, False])
def test_prompts_that_take_cached_blocks_decode_in_shared_groups_as_the_eager_reference_does(make_engine, gpu_backend,
                                                                                              overlap):
    """Prompts that arrive together with 96 tokens in common: one computes them (Triton prefill), the others take
    its blocks from the block cache, and all decode them as one shared prefix in CUDA graphs."""
    shared = list(range(3, 99))
    prompts = [shared + list(range(200 + 9 * i, 204 + 10 * i)) for i in range(6)]
    sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def decode(engine) -> list[list[int]]:
        requests = [engine.submit_generate(sampling, i, token_ids=p) for i, p in enumerate(prompts)]
        events = engine.run_until_done(requests)
        return [[t for e in events[r.request_id] for t in e.token_ids] for r in requests]

    eager = decode(make_engine(device="cuda", attention_backend="torch", prefix_caching=False))
    engine = make_engine(device="cuda", attention_backend=gpu_backend, overlap_steps=overlap)
    engine.runner.min_shared_elements_decode = 0  # every shared prefix read once for its group
    assert decode(engine) == eager
    assert engine.stats().cached_tokens == 5 * 96
    assert any(groups for _, groups in engine.runner.graphs._graphs), "no graph with shared groups replayed"


def test_seeded_sampling_on_the_gpu_is_the_same_overlapped_or_not_alone_or_in_a_batch(make_engine):
    sampling = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    runs = []
    for overlap in (True, False):
        engine = make_engine(device="cuda", overlap_steps=overlap)
        engine.fill(list(range(3, 40)), "p")
        alone = engine.submit_generate(sampling, "alone", "p")
        events = engine.run_until_done([alone])[alone.request_id]
        runs.append([t for e in events for t in e.token_ids])
        batch = [engine.submit_generate(SamplingParams(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True),
                                        f"b{s}", "p") for s in (1, 2)] + [engine.submit_generate(sampling, "b", "p")]
        events = engine.run_until_done(batch)[batch[-1].request_id]
        runs.append([t for e in events for t in e.token_ids])
    assert len(set(map(tuple, runs))) == 1, runs


def test_penalized_greedy_generation_on_the_gpu_is_the_cpus_overlapped_or_not(hf_checkpoint, make_engine):
    path, _ = hf_checkpoint("llama")
    # After this prompt the random model repeats itself, so that the penalties change what it generates.
    prompt = [5, 9, 9, 14, 3, 9, 22, 14, 356, 212, 10, 260, 238, 99, 96, 480, 415, 47, 312, 331]
    sampling = SamplingParams(max_tokens=12, temperature=0.0, presence_penalty=0.6, frequency_penalty=1.1,
                              repetition_penalty=1.3, ignore_eos=True)
    runs = []
    for device, overlap in (("cpu", False), ("cuda", False), ("cuda", True)):
        engine = make_engine(model=str(path), block_size=8, device=device, dtype="float32", overlap_steps=overlap)
        engine.fill(prompt, "p")
        request = engine.submit_generate(sampling, "g", "p")
        runs.append([t for e in engine.run_until_done([request])[request.request_id] for t in e.token_ids])
    assert runs[0] == runs[1] == runs[2], runs


def test_a_decode_step_returns_without_waiting_for_the_device(make_engine, gpu_backend):
    """With the device busy for a second, an overlapped decode step launches and returns at once: nothing in
    scheduling, the graph's inputs or sampling waits for the device; without overlap the step waits."""
    returned_in = {}
    for overlap in (True, False):
        engine = make_engine(device="cuda", attention_backend=gpu_backend, overlap_steps=overlap)
        engine.fill(list(range(3, 40)), "c")
        request = engine.submit_generate(SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), "c")
        for _ in range(4):
            engine.step()
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU clock cycles, queued before the next step
        start = time.perf_counter()
        engine.step()
        returned_in[overlap] = time.perf_counter() - start
        torch.cuda.synchronize()
        engine.run_until_done([request])
    assert returned_in[True] < 0.1 < returned_in[False], returned_in


def test_cuda_backend_decodes_forks_as_the_triton_backend_does(hf_checkpoint, make_engine):
    """bf16, head dim 64: forks of one prefix decoded (one token each per step, from CUDA graphs) by the CUDA
    kernel and by the Triton kernel give the same logits, to bf16 precision."""
    if not cuda_attention.available():
        pytest.skip("needs parrot_lc._cuda")
    path, _ = hf_checkpoint("llama-head-dim-64")
    logits = {}
    for backend in ("triton", "cuda"):
        engine = make_engine(model=str(path), device="cuda", dtype="bfloat16", attention_backend=backend)
        assert engine.backend.name == backend
        engine.fill(list(range(3, 60)), "prefix")
        children = [f"fork{i}" for i in range(4)]
        engine.run_until_done([engine.submit_fill(list(range(100 + i, 105 + 2 * i)), c, "prefix")
                               for i, c in enumerate(children)])
        for token in (7, 8, 9):  # decode-shaped steps: one token per fork
            engine.run_until_done([engine.submit_fill([token], c) for c in children])
        logits[backend] = torch.stack([engine.context_logits(c) for c in children])  # (4, V)
    error = (logits["cuda"] - logits["triton"]).abs().max() / logits["triton"].abs().max()
    assert error < 2e-2, f"relative error {error:.2e}"


STEPS_AFTER_START = """
import json, sys
import triton
from parrot_lc.engine import LLMEngine, SamplingParams
from parrot_lc.settings import EngineSettings

compiled = {"start": [], "steps": []}
phase = "start"
triton.knobs.runtime.jit_cache_hook = lambda **kw: compiled[phase].append(kw["repr"])
engine = LLMEngine(EngineSettings(model="tiny", device="cuda", dtype="bfloat16", attention_backend="triton",
                                  kv_cache_bytes=64 * 2**20, cache_dir=sys.argv[1]))
engine.runner.min_shared_elements = 0  # steps with prefill chunks read shared prefixes in their own pass too
phase = "steps"
engine.fill(list(range(3, 300)), "prefix")
children = [f"c{i}" for i in range(7)]
engine.run_until_done([engine.submit_fill(list(range(10, 11 + 3 * (i % 3))), c, "prefix")  # 1, 4 and 7 tokens
                       for i, c in enumerate(children)])
sampling = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
engine.run_until_done([engine.submit_generate(sampling, c) for c in children]
                      + [engine.submit_fill(list(range(20, 90)), "late", "prefix")])  # a fill among decodes
print(json.dumps(compiled))
"""


def test_no_request_waits_for_a_kernel_compile(tmp_path):
    """Kernels compile while the engine starts (warm-up, graph capture), not in the first steps that need them:
    a compile takes about a second on the H100, which a user's first token would wait for. In a process of its
    own, so that no other test has compiled them first."""
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", STEPS_AFTER_START, str(tmp_path)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = json.loads(run.stdout.strip().splitlines()[-1])
    assert compiled["steps"] == [], f"compiled in steps: {compiled['steps']}\nat start: {compiled['start']}"
