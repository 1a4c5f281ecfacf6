"""Bad requests get a typed error for themselves; the engine keeps serving everyone else."""

import asyncio
import shutil

import pytest

from conftest import generate_from_all
from parrot_lc.engine import (
    Constraint,
    ContextBusyError,
    ContextNotFoundError,
    EngineStepError,
    InvalidRequestError,
    OutOfMemoryError,
    SamplingParams,
)
from parrot_lc.engine import attention
from parrot_lc.engine.errors import ModelLoadError
from parrot_lc.settings import SettingsError

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def test_generate_into_an_unknown_context_is_context_not_found(tiny):
    with pytest.raises(ContextNotFoundError, match="nope"):
        tiny.submit_generate(GREEDY, "nope")


def test_fork_from_an_unknown_parent_is_context_not_found(tiny):
    with pytest.raises(ContextNotFoundError, match="ghost"):
        tiny.submit_fill([5], "child", parent_context_id="ghost")
    assert "child" not in tiny.tree


def test_free_of_an_unknown_context_is_context_not_found(tiny):
    with pytest.raises(ContextNotFoundError):
        tiny.free_context("nope")


def test_fill_into_a_generating_context_is_busy(tiny):
    tiny.fill([5, 6], "c")
    tiny.submit_generate(GREEDY, "c")
    with pytest.raises(ContextBusyError, match="busy"):
        tiny.submit_fill([7], "c")


def test_token_ids_outside_the_vocabulary_are_rejected(tiny):
    with pytest.raises(InvalidRequestError, match="1024"):
        tiny.submit_fill([5, 1024], "c")
    with pytest.raises(InvalidRequestError, match="-1"):
        tiny.submit_fill([-1], "c")


def test_an_empty_fill_is_rejected(tiny):
    with pytest.raises(InvalidRequestError, match="empty"):
        tiny.submit_fill([], "c")


def test_generate_from_an_empty_context_is_rejected(tiny):
    tiny.fill([5], "p")
    tiny.free_context("p")
    with pytest.raises(ContextNotFoundError):
        tiny.submit_generate(GREEDY, "x", parent_context_id="p")


@pytest.mark.parametrize(
    "field, value",
    [("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("seed", -1),
     ("stop", ("",)), ("stop_token_ids", (99999,)), ("min_tokens", 129)],
)
def test_invalid_sampling_values_name_the_field(tiny, field, value):
    tiny.fill([5], "c")
    with pytest.raises(InvalidRequestError, match=f"sampling.{field}"):
        tiny.submit_generate(SamplingParams(**{field: value}), "c")


def test_min_tokens_with_a_constraint_is_refused(tiny):
    """A complete grammar allows only its end, which min_tokens would forbid."""
    tiny.fill([5], "c")
    with pytest.raises(InvalidRequestError, match="sampling.min_tokens"):
        tiny.submit_generate(SamplingParams(min_tokens=2, constraint=Constraint("regex", "a+")), "c")


def test_the_engine_keeps_serving_after_bad_requests(tiny):
    tiny.fill([5, 6, 7], "good")
    for bad in (lambda: tiny.submit_fill([], "x"), lambda: tiny.submit_generate(GREEDY, "missing")):
        with pytest.raises(Exception):
            bad()
    assert len([t for e in tiny.generate(GREEDY, "good") for t in e.token_ids]) == 4


def test_a_request_larger_than_the_whole_cache_is_out_of_memory(make_engine):
    engine = make_engine(kv_cache_bytes=4 * 2 * 2 * 16 * 2 * 16 * 4)  # 4 blocks of 16 tokens
    with pytest.raises(OutOfMemoryError, match="64"):
        engine.submit_fill(list(range(3, 3 + 65)), "c")
    engine.fill(list(range(3, 3 + 40)), "fits")


def test_a_fork_counts_the_tokens_its_parent_is_still_waiting_to_fill(make_engine):
    engine = make_engine(kv_cache_bytes=4 * 2 * 2 * 16 * 2 * 16 * 4)  # 4 blocks of 16 tokens
    engine.submit_fill(list(range(3, 3 + 40)), "parent")  # queued: its tokens are not in the context yet
    with pytest.raises(OutOfMemoryError, match="65"):
        engine.submit_fill(list(range(3, 3 + 25)), "fork", parent_context_id="parent")


def test_unknown_model_names_are_a_model_load_error(make_engine, tmp_path):
    with pytest.raises(ModelLoadError, match="checkpoint directory"):
        make_engine(model=str(tmp_path / "missing"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_a_damaged_safetensors_file_is_a_model_load_error_naming_it(make_engine, hf_checkpoint, tmp_path, damage):
    source, _ = hf_checkpoint("llama")
    shutil.copytree(source, tmp_path / "copy")
    weights = tmp_path / "copy" / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(64))
    else:  # listed in an index, absent
        (tmp_path / "copy" / "model.safetensors.index.json").write_text(
            '{"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(ModelLoadError, match=r"is not a readable safetensors file"):
        make_engine(model=str(tmp_path / "copy"))


def test_when_blocks_run_out_requests_are_preempted_and_all_complete_unchanged(make_engine):
    prompts = [list(range(3 + i, 3 + i + 30)) for i in range(6)]
    sampling = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    roomy = generate_from_all(make_engine(), prompts, sampling)
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # layers * (k, v) * block * kv heads * head dim * float32
    engine = make_engine(kv_cache_bytes=12 * block_bytes)  # 6 contexts of 50 tokens need 24
    assert generate_from_all(engine, prompts, sampling) == roomy
    assert engine.stats().num_preemptions > 0
    assert engine.stats().kv_blocks_used == 0
    # Recomputing a preempted request's prompt and tokens is prefill; decode counts the generated tokens fed
    # back one at a time (19 of each request's 20, less the one a recomputation took along, per preemption).
    stats = engine.stats()
    assert 6 * 19 - stats.num_preemptions <= stats.decode_tokens <= 6 * 19
    assert stats.prefill_tokens > 6 * 30


def test_an_idle_cache_that_cannot_make_room_fails_the_request_not_the_engine(make_engine):
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4
    engine = make_engine(kv_cache_bytes=4 * block_bytes)
    engine.fill(list(range(3, 3 + 48)), "idle")  # 3 of 4 blocks held by an idle context
    with pytest.raises(OutOfMemoryError, match="free contexts"):
        engine.fill(list(range(200, 200 + 40)), "big")  # no block in common with the idle context's
    engine.free_context("idle")
    engine.fill(list(range(200, 200 + 40)), "big2")


def test_a_step_that_raises_fails_its_requests_and_the_engine_thread_serves_on(tiny, monkeypatch):
    from parrot_lc.engine.async_engine import AsyncEngine

    run = tiny.runner.run
    calls = []

    def broken_once(chunks, in_flight_tokens=None):  # a bug in the first step only
        calls.append(len(chunks))
        if len(calls) == 1:
            raise RuntimeError("a bug in the model runner")
        return run(chunks, in_flight_tokens)

    monkeypatch.setattr(tiny.runner, "run", broken_once)
    engine = AsyncEngine(tiny)

    async def generate(context_id: str) -> list[int]:
        await engine.fill([5, 6, 7], context_id)
        return [t async for output in engine.generate(GREEDY, context_id) for t in output.token_ids]

    async def scenario() -> list[int]:
        with pytest.raises(EngineStepError, match="a bug in the model runner"):
            await generate("first")
        return await generate("second")

    try:
        assert len(asyncio.run(asyncio.wait_for(scenario(), 30))) == GREEDY.max_tokens  # a dead thread: timeout
    finally:
        engine.close()


def test_the_cuda_backend_on_a_cpu_device_is_refused(make_engine):
    with pytest.raises(ValueError, match="attention_backend 'cuda' needs a CUDA device"):
        make_engine(attention_backend="cuda")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_gpu_backend_on_a_cpu_device_is_refused_at_start_up_where_triton_does_not_interpret(
        make_engine, monkeypatch, backend):
    # Outside the tests (which run Triton in its CPU interpreter) such an engine would fail every request instead.
    monkeypatch.setattr(attention, "_triton_interprets", lambda: False)
    with pytest.raises(SettingsError, match=f"attention_backend '{backend}' needs a CUDA device"):
        make_engine(attention_backend=backend)
