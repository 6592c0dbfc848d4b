"""Engine backends: onnxruntime (CPU), tensorrt, tensorrt-llm (optional extras, imported lazily)."""
