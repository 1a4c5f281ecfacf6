"""Property: any sequence of fills, forks, generations and frees leaks no KV block."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parrot_lc.engine import EngineError, SamplingParams
from parrot_lc.engine.engine import LLMEngine
from parrot_lc.settings import EngineSettings

BLOCK_BYTES = 2 * 2 * 4 * 2 * 16 * 4  # tiny: layers * (k, v) * block of 4 * kv heads * head dim * float32

operation = st.one_of(
    st.tuples(st.just("fill"), st.integers(0, 7), st.integers(1, 30)),
    st.tuples(st.just("fork"), st.integers(0, 7), st.integers(0, 7), st.integers(1, 9)),
    st.tuples(st.just("generate"), st.integers(0, 7), st.integers(1, 6)),
    st.tuples(st.just("fork_generate"), st.integers(0, 7), st.integers(0, 7), st.integers(1, 6)),
    st.tuples(st.just("free"), st.integers(0, 7)),
    st.tuples(st.just("step"), st.integers(1, 3)),
)


def apply(engine: LLMEngine, op: tuple) -> None:
    kind, *args = op
    try:
        if kind == "fill":
            engine.submit_fill(list(range(3, 3 + args[1])), args[0])
        elif kind == "fork":
            engine.submit_fill(list(range(5, 5 + args[2])), args[0], parent_context_id=args[1])
        elif kind == "generate":
            engine.submit_generate(SamplingParams(max_tokens=args[1], temperature=0.0), args[0])
        elif kind == "fork_generate":
            engine.submit_generate(SamplingParams(max_tokens=args[2], seed=1), args[0], parent_context_id=args[1])
        elif kind == "free":
            engine.free_context(args[0])
        else:
            for _ in range(args[0]):
                engine.step()
    except EngineError:
        pass  # unknown or busy contexts are expected in random operations; they must leave no trace


@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, min_size=200, max_size=200))
def test_random_operations_leak_no_block(ops):
    engine = LLMEngine(EngineSettings(model="tiny", device="cpu", dtype="float32", block_size=4,
                                      kv_cache_bytes=40 * BLOCK_BYTES))
    initial_free = engine.allocator.num_free
    for op in ops:
        apply(engine, op)
    while engine.has_work():
        engine.step()
    for context_id in list(engine.tree._contexts):
        engine.free_context(context_id)
    assert engine.allocator.num_free == initial_free
    assert all(engine.allocator.refcount(b) == 0 for b in range(engine.allocator.num_blocks))
