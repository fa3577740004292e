"""`tunelab serve --demo` as a real process: finds the demo run, answers the openai client, logs the request."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")


def test_serve_demo_run_cli(tiny_model, tmp_path):
    import httpx2 as httpx

    from tests.unit.test_serve import make_adapter

    # a finished demo run as `tunelab demo` leaves it: config, lineage (base model), adapter/
    run_id = "sft-support-demo-20261126-120000-abcd"
    run = tmp_path / "ws" / "runs" / run_id
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"recipe: sft\nname: support-demo\nmodel:\n  name: {tiny_model}\n")
    (run / "lineage.json").write_text(json.dumps({"run_id": run_id, "base_model": "tiny-llama",
                                                  "base_model_path": str(tiny_model)}))
    make_adapter(tiny_model, run / "adapter", seed=3)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", "--demo", "-w", str(tmp_path / "ws"),
                             "--port", str(port), "--threads", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-llama", run_id]
        r = client.chat.completions.create(model=run_id, messages=[{"role": "user", "content": "What color is the cat?"}],
                                           max_tokens=6, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    line = next(l for l in err.splitlines() if "request model=" in l)
    assert f"model={run_id} prompt_tokens={r.usage.prompt_tokens} completion_tokens={r.usage.completion_tokens}" in line
    assert "latency_ms=" in line and "queue_ms=" in line


def test_serve_without_a_model_is_one_line_error(tmp_path):
    from tests.conftest import run_cli

    r = run_cli("serve", "--demo", "-w", str(tmp_path / "empty"))
    assert r.returncode == 2 and "run 'tunelab demo' first" in r.stderr and "Traceback" not in r.stderr
