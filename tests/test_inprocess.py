"""In-process mode: the same client API against a server started inside this process."""

import sys
import subprocess

import parrot_lc


def test_connect_runs_semantic_functions_in_process():
    client = parrot_lc.connect("tiny")
    double = parrot_lc.SemanticFunction.from_template("Say {{input:x}} twice:{{output:y}}", max_tokens=3, temperature=0)
    with client.session():
        assert isinstance(double("hello").get(), str)
    assert parrot_lc.connect("tiny").base_url == client.base_url  # one server per model, shared


def test_importing_the_client_does_not_load_torch():
    code = "import sys, parrot_lc; parrot_lc.ParrotClient; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
