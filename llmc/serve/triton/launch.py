"""Run the real `tritonserver` on a model repository, and tear it down without leftovers.

`TritonServer` starts the wheel's server in its own process group with the environment from
env.py (libpython on LD_LIBRARY_PATH, our backend directory, GPU probes silenced), waits for
readiness, and on stop sends SIGTERM (models unload, stubs exit, shared memory is released),
then kills whatever is left of its process group and removes the Python backend's shared-memory
regions it created. A per-server shared-memory prefix makes "what it created" exact, so two
servers on one machine never touch each other's regions.

`serve_triton()` is `llmc serve ENGINE --frontend triton`: export to a temporary repository,
run the server in the foreground until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import IO

from llmc.errors import LlmcError
from llmc.serve.triton.env import TritonEnv

SHM_DIR = Path("/dev/shm")
# Flags that keep a CPU-only machine quiet and fast: no GPU metrics, no pinned or CUDA pools.
CPU_FLAGS = ["--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0",
             "--cuda-memory-pool-byte-size=0:0"]


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TritonServer:
    """A running tritonserver process (use as a context manager, or call start()/stop())."""

    def __init__(self, env: TritonEnv, repo: str | Path, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, host: str = "0.0.0.0", log: IO | None = None,
                 extra_args: list[str] | None = None):
        self.env, self.repo, self.host = env, Path(repo), host
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.log = log
        self.extra_args = list(extra_args or [])
        self.shm_prefix = f"llmc_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self.proc: subprocess.Popen | None = None
        self.killed_leftovers = False    # set by stop(): processes of the group had to be killed
        self.leaked_shm: list[Path] = []  # set by stop(): regions the server left (then removed)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.http_port}"

    def command(self) -> list[str]:
        return [str(self.env.tritonserver), f"--model-repository={self.repo}",
                f"--backend-directory={self.env.backend_dir}",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                "--exit-timeout-secs=30", *CPU_FLAGS, *self.extra_args]

    def start(self, timeout: float = 300.0) -> TritonServer:
        out = self.log
        self.proc = subprocess.Popen(self.command(), env=self.env.server_environ(), stdout=out,
                                     stderr=subprocess.STDOUT if out is not None else None,
                                     start_new_session=True)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LlmcError(f"tritonserver exited with code {self.proc.returncode} while loading "
                                f"the models (see its log above)")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise LlmcError(f"tritonserver was not ready after {timeout:.0f}s")

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def shm_regions(self) -> list[Path]:
        return sorted(SHM_DIR.glob(f"{self.shm_prefix}*")) if SHM_DIR.is_dir() else []

    def group_alive(self) -> bool:
        """True while any process of the server's group (the server, its Python stubs) lives."""
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait; then SIGKILL the process group; remove our shared memory. Idempotent."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        deadline = time.monotonic() + 10
        while self.group_alive() and time.monotonic() < deadline:  # stubs exit right after
            time.sleep(0.1)
        if self.group_alive():
            self.killed_leftovers = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.leaked_shm = self.shm_regions()  # only left behind by a killed server
        for region in self.leaked_shm:
            region.unlink(missing_ok=True)
        return proc.returncode

    def __enter__(self) -> TritonServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_triton(engine_dir: str | Path, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, host: str = "0.0.0.0", model_name: str = "llmc",
                 instances: int = 1, max_batch_size: int | None = None, kv_cache_mb: float | None = None,
                 max_queue: int | None = None) -> int:
    """`llmc serve ENGINE --frontend triton`: export to a temporary repository and run the real
    tritonserver in the foreground until Ctrl-C / SIGTERM; return its exit code."""
    from rich.console import Console

    from llmc.serve.triton.env import ensure_triton_env, find_triton_env
    from llmc.serve.triton.export import ExportOptions, export_triton

    console = Console(stderr=True)
    if find_triton_env() is None:
        console.print("[dim]setting up the Triton environment (once: a numpy<2 venv with tritonserver, "
                      "about a minute)...[/]")
    env = ensure_triton_env()
    tmp = Path(tempfile.mkdtemp(prefix="llmc-triton-repo-"))
    try:
        export_triton(engine_dir, tmp, ExportOptions(model_name=model_name, instances=instances,
                                                     max_batch_size=max_batch_size, kv_cache_mb=kv_cache_mb,
                                                     max_queue=max_queue, env_path=str(env.root)))
        server = TritonServer(env, tmp, http_port, grpc_port, metrics_port, host=host)
        def on_term(signum, frame):  # SIGTERM behaves like Ctrl-C: graceful shutdown
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            server.start()
            console.print(f"[bold]Triton[/] serving model [bold]{model_name}[/] from {engine_dir}: "
                          f"HTTP {server.url}  gRPC {host}:{grpc_port}  metrics "
                          f"http://{host}:{metrics_port}/metrics  (Ctrl-C to stop)")
            return server.proc.wait()
        except KeyboardInterrupt:
            console.print("[dim]stopping tritonserver...[/]")
            return 0
        finally:
            server.stop()
            signal.signal(signal.SIGTERM, previous)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
