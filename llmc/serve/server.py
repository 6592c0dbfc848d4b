"""`llmc serve`'s lifecycle: load the engine, bind, warm up, serve, drain on SIGINT/SIGTERM, exit 0.

The engine is loaded before the port is bound, so a bad engine directory is a one-line error.
The engine loop starts (and warms up) in the background once uvicorn is listening: /health
answers 503 until the first engine step has run, then 200. On SIGINT or SIGTERM the server stops
accepting (the listening socket closes, new requests on open connections get 503 and /health
503), lets running and waiting requests finish for up to `drain_timeout` seconds, cancels what is
left (their KV blocks are freed), stops the engine loop and returns normally, so the process exits
0. A second SIGINT forces an immediate exit.
"""

from __future__ import annotations

import contextlib
import copy
import signal
import sys
import threading
from pathlib import Path

import uvicorn

from llmc.serve.app import ServerState, create_app

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def serve(engine_dir: Path, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          max_queue: int | None = None, kv_cache_mb: float | None = None, api_key: str | None = None,
          drain_timeout: float = 30.0, log_level: str = "info", access_log: bool = False,
          prefill_budget: int | None = None, threads: int | None = None, spinning: bool | None = None) -> None:
    from llmc.runtime.llm import LLM
    from llmc.serve.engine_loop import EngineLoop

    llm = LLM(engine_dir, kv_cache_mb=kv_cache_mb, prefill_budget=prefill_budget, num_threads=threads, spinning=spinning)
    loop = EngineLoop(llm, max_queue=max_queue)
    own_tokenizer = copy.deepcopy(llm.tokenizer)  # not the instance the loop thread detokenises with
    state = ServerState(model_name or Path(engine_dir).resolve().name, api_key, own_tokenizer, llm.max_seq_len)
    app = create_app(state)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        def start() -> None:
            loop.start()
            state.loop = loop
            print(f"llmc serve: {state.model_name} ready on http://{host}:{port}", file=sys.stderr, flush=True)

        threading.Thread(target=start, name="llmc-engine-start", daemon=True).start()
        yield
        # Connections are drained (or cancelled after drain_timeout) by now: stop the engine.
        loop.shutdown(drain=False, timeout=10.0)

    app.router.lifespan_context = lifespan
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=drain_timeout, lifespan="on")
    DrainingServer(config, state).run()


class DrainingServer(uvicorn.Server):
    """uvicorn's Server that marks the state draining on a signal and, unlike uvicorn, does not
    re-raise the signal after its graceful shutdown (that would turn a clean drain into exit 130)."""

    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig, frame) -> None:
        self._state.draining = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
