"""Objective deduction on known DAGs: which calls are latency-critical and which form task groups."""

import time

import pytest

from parrot_lc.server.errors import GraphError
from parrot_lc.server.graph import (
    Call, CallState, Criterion, Piece, Session, Variable, deduce_objectives, fetch_objective, mark_shared_pieces,
    validate_new_calls,
)


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
        session.calls[call.call_id] = call
        session.variables[call.outputs[0]].producer = call
        for var_id in call.inputs:
            session.variables[var_id].consumers.append(call)
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
    with pytest.raises(GraphError, match="cycle: calls.0 -> calls.1 -> calls.0"):  # by their place in the request
        build(session, {"a": ["b"], "b": ["a"]})


def submitted(session: Session, edges: dict[str, list[str]]) -> dict[str, Call]:
    """The calls as the server holds them after submission: each sink assumed latency-critical."""
    calls = build(session, edges)
    for variable in list(session.variables.values()):
        if not variable.consumers:
            deduce_objectives(session, variable, Criterion.LATENCY)
    return calls


def test_a_throughput_fetch_of_a_sink_takes_its_waiting_producers_off_the_critical_path(session):
    calls = submitted(session, {**{f"map{i}": [] for i in range(3)}, "reduce": [f"map{i}" for i in range(3)]})
    assert calls["reduce"].latency_critical
    fetch_objective(session, session.variables["out:reduce"], Criterion.THROUGHPUT)
    assert not calls["reduce"].latency_critical
    assert {calls[f"map{i}"].task_group for i in range(3)} == {"group:reduce"}


def test_a_call_that_runs_keeps_its_objective_when_a_fetch_changes_the_criterion(session):
    calls = submitted(session, {"a": [], "b": ["a"]})
    calls["a"].state = CallState.RUNNING
    fetch_objective(session, session.variables["out:b"], Criterion.THROUGHPUT)
    assert calls["a"].latency_critical and not calls["b"].latency_critical


def test_a_producer_on_a_latency_fetchs_path_stays_critical_whatever_else_fetches_it(session):
    calls = submitted(session, {"shared": [], "chat": ["shared"], "report": ["shared"]})
    fetch_objective(session, session.variables["out:report"], Criterion.THROUGHPUT)
    fetch_objective(session, session.variables["out:chat"], Criterion.LATENCY)
    assert calls["chat"].latency_critical and calls["shared"].latency_critical
    assert not calls["report"].latency_critical


def test_only_the_first_fetch_of_a_variable_names_its_criterion(session):
    calls = submitted(session, {"a": [], "b": ["a"]})
    fetch_objective(session, session.variables["out:b"], Criterion.THROUGHPUT)
    fetch_objective(session, session.variables["out:b"], Criterion.LATENCY)
    assert not calls["b"].latency_critical


# ---- prompt prefixes shared through variables ------------------------------------------------------------------


def agent_call(name: str, *inputs: str) -> Call:
    """A call whose prompt is a role's text, then each input variable after a label, then its output."""
    pieces = [Piece("text", "You are a reviewer.\n")]
    for var_id in inputs:
        pieces += [Piece("text", f"{var_id}: "), Piece("input", var_id=var_id)]
    return Call(name, "s", pieces + [Piece("output", var_id=f"out:{name}")])


def test_calls_that_read_the_same_variables_first_share_those_pieces():
    calls = [agent_call(f"review{i}", "design", "code", f"file{i}") for i in range(3)]
    mark_shared_pieces(calls)
    # The role, "design: ", design, "code: ", code, "file…: ": the file's label differs.
    assert [c.shared_pieces for c in calls] == [5, 5, 5]


def test_a_call_shares_with_the_call_that_begins_like_it_longest():
    calls = [agent_call("a", "design", "code"), agent_call("b", "design", "code"), agent_call("c", "design", "x")]
    mark_shared_pieces(calls)
    assert [c.shared_pieces for c in calls] == [5, 5, 3]


def test_a_call_that_begins_like_no_other_shares_nothing():
    calls = [agent_call("a", "design"), Call("b", "s", [Piece("text", "Other.\n"), Piece("output", var_id="out:b")])]
    mark_shared_pieces(calls)
    assert [c.shared_pieces for c in calls] == [0, 0]


def test_finding_shared_pieces_is_not_quadratic_in_a_calls_pieces():
    """It runs on the event loop as a graph is submitted: four times the pieces take about four times as long, not
    sixteen (the best of three runs each, so that a loaded machine slows both sizes alike)."""

    def best_time(pieces: int) -> float:
        call = Call("c0", "s", [Piece("text", "") for _ in range(pieces)] + [Piece("output", var_id="o")])
        times = []
        for _ in range(3):
            start = time.perf_counter()
            mark_shared_pieces([call, call])
            times.append(time.perf_counter() - start)
        assert call.shared_pieces == pieces
        return min(times)

    assert best_time(32_000) / best_time(8_000) < 8
