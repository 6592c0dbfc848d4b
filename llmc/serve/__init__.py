"""Serving: one engine loop owning the runtime, and the frontends that feed it.

`engine_loop.EngineLoop` is the only code that touches an `LLM` while serving; HTTP handlers
(the OpenAI-compatible server) and Triton's Python backend only submit requests to it and read
their token events. Nothing here is imported at CLI start-up: FastAPI, uvicorn and
prometheus-client load only when a server starts.
"""
