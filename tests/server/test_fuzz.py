"""Fuzzing (schemathesis) against the server's own OpenAPI schema, on a real server: no request that the schema
allows makes any endpoint answer 5xx or answer what its schema does not describe."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from parrot_lc.server.local import LocalServer
from parrot_lc.server.remote_engine import RemoteEngine
from parrot_lc.settings import EngineSettings, ServerSettings

KEY, ENGINE_KEY = "fuzz-key", "fuzz-engine-key"
MAX_TOKENS = 8  # generated lengths are cut to this, so that the run stays short
EXAMPLES = 20  # per endpoint


@pytest.fixture(scope="module")
def fuzzed_server():
    """A server of its own: the fuzzer fills sessions that other tests should not see. It has an engine key, which
    the fuzzer sends to the engine routes, so that their cases get past the key to the checks of the URL."""
    engine = EngineSettings(model="tiny", device="cpu", dtype="float32", kv_cache_bytes=32 * 2**20)
    with LocalServer(engine, ServerSettings(port=0, api_key=KEY, engine_key=ENGINE_KEY, engine_timeout=1.0)) as server:
        yield server


def auth(path: str = "") -> dict:
    """The key of the route at `path`: the engine key for the engine routes, the API key for the rest."""
    return {"Authorization": f"Bearer {ENGINE_KEY if path.startswith('/api/engines') else KEY}"}


def shorten(value):
    """The value with every `max_tokens`-like field cut to MAX_TOKENS."""
    if isinstance(value, dict):
        return {k: min(v, MAX_TOKENS) if k in ("max_tokens", "max_completion_tokens") and isinstance(v, (int, float))
                and not isinstance(v, bool) else shorten(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shorten(v) for v in value]
    return value


def test_no_endpoint_answers_5xx_or_outside_its_schema(fuzzed_server):
    api = schemathesis.openapi.from_url(f"{fuzzed_server.base_url}/openapi.json", headers=auth())
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 12  # every endpoint, not a schema that failed to load
    client = httpx.Client(base_url=fuzzed_server.base_url, headers=auth(), timeout=30)
    session = client.post("/api/sessions").json()
    base, token = f"/api/sessions/{session['session_id']}", {"X-Session-Token": session["session_token"]}
    variables = [client.post(f"{base}/variables", json=body, headers=token).json()["var_id"]
                 for body in ({"value": "a value"}, {}, {})]
    failures = {}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            case.body = shorten(case.body)
            headers = auth(operation.path)
            if "session_id" in (case.path_parameters or {}) and len(case.path_parameters["session_id"]) % 2:
                # Half the cases reach a real session (with its variables), not only the 404 of unknown ids.
                case.path_parameters["session_id"] = session["session_id"]
                headers["X-Session-Token"] = session["session_token"]
                if "var_id" in case.path_parameters and len(case.path_parameters["var_id"]) % 2:
                    # the variable that has a value: a fetch of one that never gets any would wait without end
                    case.path_parameters["var_id"] = variables[0]
            case.call_and_validate(base_url=fuzzed_server.base_url, headers=headers, timeout=30,
                                   checks=[not_a_server_error, response_schema_conformance])

        try:
            fuzz()
        except Exception as exc:  # every operation is fuzzed; all that fail are reported together
            failures[operation.label] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{label}:\n{why}" for label, why in failures.items())
    # No URL the fuzzer made up answered as an engine: none was taken (and sent calls).
    assert not [slot for slot in fuzzed_server.manager.engines if isinstance(slot.engine, RemoteEngine)]
