"""Prometheus metrics of the manager and its engines, collected at scrape time (prometheus-client)."""

from __future__ import annotations

from typing import Iterator

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric

from parrot_lc.server.graph import CallState
from parrot_lc.server.manager import ParrotManager


CALLS_FINISHED_HELP = (
    "Calls finished, by outcome (label state): done (its outputs set); failed (an error: of its engine, its prompt, "
    "a failed input, or the server); cancelled (stopped before it finished: its client went away, or it or its "
    "session was deleted, or it still ran at the shutdown deadline)")
ENGINE_COUNTERS = (  # (metric, help, EngineStats field), summed over every engine the server ever had
    ("parrot_prefill_tokens", "Tokens computed by prefill", "prefill_tokens"),
    ("parrot_prefix_reused_tokens", "Tokens a fork got from its parent context", "reused_tokens"),
    ("parrot_prefix_cached_tokens", "Prompt tokens served from the engines' block cache", "cached_tokens"),
    ("parrot_decode_tokens", "Generated tokens fed back through the model", "decode_tokens"),
    ("parrot_engine_steps", "Batches the engines ran (prefill and decode together)", "num_steps"),
)


class ManagerCollector:
    def __init__(self, manager: ParrotManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        manager = self.manager
        calls = [c for s in manager.sessions.values() for c in s.calls.values()]
        by_state = GaugeMetricFamily("parrot_requests", "Calls in live sessions, by state", labels=["state"])
        for state in CallState:
            by_state.add_metric([state.value], sum(c.state is state for c in calls))
        yield by_state
        finished = CounterMetricFamily("parrot_calls_finished", CALLS_FINISHED_HELP, labels=["state"])
        for outcome, count in manager.calls_finished.items():
            finished.add_metric([outcome.value], count)
        yield finished
        yield GaugeMetricFamily("parrot_queue_length", "Calls waiting for their inputs",
                                value=sum(c.state is CallState.WAITING for c in calls))
        yield GaugeMetricFamily("parrot_queued_calls", "Unfinished calls, bounded by max_queued_calls",
                                value=manager.queued_calls)
        yield CounterMetricFamily("parrot_rejected_calls", "Calls refused with 429 because the queue was full",
                                  value=manager.rejected_calls)
        gauges = {
            "parrot_kv_blocks_used": ("KV cache blocks in use", lambda st, slot: st.kv_blocks_used),
            "parrot_kv_blocks_free": ("KV cache blocks free", lambda st, slot: st.kv_blocks_free),
            "parrot_engine_running_requests": ("Engine requests in the last step", lambda st, slot: st.num_running),
            "parrot_engine_waiting_requests": ("Engine requests left out of the last step",
                                               lambda st, slot: st.num_waiting),
            "parrot_engine_calls": ("Calls placed on the engine and running (its load)", lambda st, slot: slot.running),
            "parrot_engine_prefix_contexts": ("Warm prefix contexts", lambda st, slot: len(slot.prefixes)),
        }
        stats = [(slot, slot.engine.stats()) for slot in manager.engines]
        for name, (doc, read) in gauges.items():
            family = GaugeMetricFamily(name, doc, labels=["engine"])
            for slot, st in stats:
                family.add_metric([slot.name], read(st, slot))
            yield family
        # Summed over every engine the server ever had: an engine dropped, replaced or registered again keeps what
        # it counted in the sums, which only rise (EnginePool.counter_totals).
        totals = manager.pool.counter_totals()
        for name, doc, counter in ENGINE_COUNTERS:
            yield CounterMetricFamily(name, doc, value=totals[counter])


def registry_for(manager: ParrotManager) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(ManagerCollector(manager))
    return registry
