"""Post-training quantization with NVIDIA ModelOpt, written as TensorRT-LLM checkpoints.

    formats.py     the --qformat registry (QFORMATS): ModelOpt preset, quant_algo, defaults
                   (what each quant_algo stores: llmc.checkpoint.quant_algos)
    calib_data.py  calibration token windows (text itself: llmc.text)
    ptq.py         mtq.quantize over llmc's reference model (fused qkv / gate_up, KV cache)
    export.py      quantizer states -> checkpoint tensors (TensorRT-LLM names and layout)
    layout.py      the stored layout and its canonical unpacked view (QLinear, the one
                   quantized-linear type the simulation and the engine's emitter consume)
    simulate.py    exact fake-quant simulation of a quantized checkpoint (what the engine runs)
    options.py     QuantizeOptions: every `llmc quantize` option (CLI and recipe stage)
    api.py         quantize_checkpoint(): the stage, in named steps

Importing this package is cheap; ModelOpt and torch-heavy work load on first use.
"""

from llmc.quantize.formats import KV_CACHE_DTYPES, QFORMATS, QFormat, get_qformat

__all__ = ["KV_CACHE_DTYPES", "QFORMATS", "QFormat", "get_qformat", "quantize_checkpoint",
           "read_quantized_linear", "QLinear", "build_simulated_model"]


def __getattr__(name):  # lazy: keep `llmc --help` fast
    if name == "quantize_checkpoint":
        from llmc.quantize.api import quantize_checkpoint
        return quantize_checkpoint
    if name in ("read_quantized_linear", "QLinear"):
        from llmc.quantize import layout
        return getattr(layout, name)
    if name == "build_simulated_model":
        from llmc.quantize.simulate import build_simulated_model
        return build_simulated_model
    raise AttributeError(name)
