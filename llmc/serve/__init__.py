"""Serving: the engine loop that owns an LLM, and the OpenAI-compatible HTTP server over it.

Imports nothing heavy: FastAPI, uvicorn and prometheus-client load only when a server starts.
"""
