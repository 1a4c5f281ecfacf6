"""Objective deduction on known DAGs: which calls are latency-critical and which form task groups."""

import pytest

from parrot_lc.server.errors import GraphError
from parrot_lc.server.graph import Call, Criterion, Piece, Session, Variable, deduce_objectives, validate_new_calls


def build(session: Session, edges: dict[str, list[str]]) -> dict[str, Call]:
    """edges: call name -> names of the calls whose outputs it reads. Each call outputs variable `out:<name>`."""
    for name in edges:
        session.variables[f"out:{name}"] = Variable(f"out:{name}", session.session_id)
    calls = {}
    for name, reads in edges.items():
        pieces = [Piece("text", "x")] + [Piece("input", var_id=f"out:{r}") for r in reads]
        calls[name] = Call(name, session.session_id, pieces + [Piece("output", var_id=f"out:{name}")])
    validate_new_calls(session, list(calls.values()))
    for call in calls.values():
        session.variables[call.outputs[0]].producer = call
    return calls


@pytest.fixture
def session():
    return Session("s")


def test_map_reduce_maps_form_one_task_group_and_the_reduce_is_latency_critical(session):
    calls = build(session, {**{f"map{i}": [] for i in range(4)}, "reduce": [f"map{i}" for i in range(4)]})
    deduce_objectives(session, session.variables["out:reduce"], Criterion.LATENCY)
    assert calls["reduce"].latency_critical and calls["reduce"].task_group is None
    assert {calls[f"map{i}"].task_group for i in range(4)} == {"group:reduce"}
    assert not any(calls[f"map{i}"].latency_critical for i in range(4))


def test_every_step_of_a_chain_is_latency_critical(session):
    calls = build(session, {"s1": [], "s2": ["s1"], "s3": ["s2"], "s4": ["s3"]})
    deduce_objectives(session, session.variables["out:s4"], Criterion.LATENCY)
    assert all(c.latency_critical and c.task_group is None for c in calls.values())


def test_multi_agent_parallel_coders_group_while_architect_and_reviewer_stay_critical(session):
    calls = build(session, {"architect": [], "coder1": ["architect"], "coder2": ["architect"],
                            "coder3": ["architect"], "reviewer": ["coder1", "coder2", "coder3"]})
    deduce_objectives(session, session.variables["out:reviewer"], Criterion.LATENCY)
    assert calls["reviewer"].latency_critical and calls["architect"].latency_critical
    assert {calls[f"coder{i}"].task_group for i in (1, 2, 3)} == {"group:reviewer"}


def test_a_throughput_fetch_makes_nothing_latency_critical(session):
    calls = build(session, {"a": [], "b": ["a"]})
    deduce_objectives(session, session.variables["out:b"], Criterion.THROUGHPUT)
    assert not any(c.latency_critical for c in calls.values())


def test_a_cycle_is_rejected_with_its_path(session):
    with pytest.raises(GraphError, match="cycle: .*a -> .*b"):
        build(session, {"a": ["b"], "b": ["a"]})
