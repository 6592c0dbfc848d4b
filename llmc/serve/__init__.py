"""Serving: the engine loop and the front ends (OpenAI HTTP, Triton)."""
