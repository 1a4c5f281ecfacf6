"""An existing OpenAI-compatible server as the manager's engine: graphs still run inside the manager and give
what that server gives for the same prompts."""

import httpx

from parrot_lc.server.local import LocalServer
from parrot_lc.settings import EngineSettings, ServerSettings


def test_a_chain_runs_on_an_openai_compatible_engine(parrot_server):
    settings = EngineSettings(model="tiny", device="cpu", dtype="float32")
    front_settings = ServerSettings(port=0, engines=0, openai_engine=parrot_server)
    with LocalServer(settings, front_settings) as front, httpx.Client(timeout=60) as client:
        session = client.post(f"{front.base_url}/api/sessions").json()
        headers = {"X-Session-Token": session["session_token"]}
        base = f"{front.base_url}/api/sessions/{session['session_id']}"
        start = client.post(f"{base}/variables", json={"value": "a lighthouse"}, headers=headers).json()["var_id"]
        middle = client.post(f"{base}/variables", json={}, headers=headers).json()["var_id"]
        end = client.post(f"{base}/variables", json={}, headers=headers).json()["var_id"]
        greedy = {"max_tokens": 5, "temperature": 0}
        calls = [{"template": [{"text": "Describe "}, {"input": start}, {"output": middle, "sampling": greedy}]},
                 {"template": [{"text": "Now shorter: "}, {"input": middle}, {"output": end, "sampling": greedy}]}]
        assert client.post(f"{base}/calls", json={"calls": calls}, headers=headers).status_code == 201
        value = client.get(f"{base}/variables/{end}", headers=headers).json()["value"]

        def direct(prompt: str) -> str:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 5, "temperature": 0}
            return client.post(f"{parrot_server}/v1/completions", json=body).json()["choices"][0]["text"]

        assert value == direct("Now shorter: " + direct("Describe a lighthouse"))


def test_an_openai_compatible_engine_gets_the_penalties_of_a_request(parrot_server):
    settings = EngineSettings(model="tiny", device="cpu", dtype="float32")
    front_settings = ServerSettings(port=0, engines=0, openai_engine=parrot_server)
    body = {"model": "tiny", "prompt": "the cat the cat the cat the cat", "max_tokens": 12, "temperature": 0}
    penalties = {"frequency_penalty": 2.0, "repetition_penalty": 1.5}
    with LocalServer(settings, front_settings) as front, httpx.Client(timeout=60) as client:
        def text(url: str, **fields) -> str:
            return client.post(f"{url}/v1/completions", json={**body, **fields}).json()["choices"][0]["text"]

        through_front = text(front.base_url, **penalties)
        assert through_front == text(parrot_server, **penalties) != text(parrot_server)
