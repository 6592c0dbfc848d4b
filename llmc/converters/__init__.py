"""Hugging Face / GGUF -> TensorRT-LLM-layout checkpoint conversion."""
