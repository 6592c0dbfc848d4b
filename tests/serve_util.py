"""Helpers for the server tests: start the real `llmc serve` on a free loopback port, read /metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


from llmc.serve.triton.launch import free_port  # noqa: E402  (one free-port helper for every server test)


class Server:
    """`python -m llmc.cli.app serve ENGINE ...` as a subprocess; ready once /health says 200."""

    def __init__(self, engine: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 180.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"llmc-serve-{self.port}.log"
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmc.cli.app", "serve", str(engine), "--port", str(self.port),
             "--log-level", "warning", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        from llmc.errors import LlmcError
        from llmc.serve.bench_client import wait_ready

        try:
            wait_ready(self.url, timeout, self.proc)
        except LlmcError as exc:
            self.kill()
            raise RuntimeError(f"{exc}:\n{self.output()}") from None
        except BaseException:
            self.kill()
            raise

    def output(self) -> str:
        if self.log.closed:  # the server was stopped: what it printed was kept then
            return self._final_output
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """Stop the process if it still runs, and drop its log (kept open until now for output())."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self.log.closed:
            self._final_output = self.output()
            self.log.close()
            self.log_path.unlink(missing_ok=True)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics, parsed by prometheus-client's own parser."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics()[(name, tuple(sorted(labels.items())))]

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """Poll /metrics until nothing runs, waits or holds a KV block; return the last sample."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            busy = sum(m[(k, ())] for k in ("llmc:num_requests_running", "llmc:num_requests_waiting",
                                            "llmc:kv_blocks_used"))
            if busy == 0 or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss


def sse_events(lines) -> list:
    """Parse `data:` lines of a server-sent event stream (stops at [DONE], which it appends as None)."""
    import json

    out = []
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            out.append(None)
            break
        out.append(json.loads(data))
    return out
