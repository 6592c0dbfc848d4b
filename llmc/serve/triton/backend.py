"""The Triton Python-backend model behind `model.py`: llmc's EngineLoop per model instance.

Runs inside Triton's Python stub (the numpy<2 venv). Each Triton request becomes one engine
request: `execute()` parses the TensorRT-LLM-named tensors, submits to the loop and returns at
once (decoupled model); the loop thread then streams responses through the request's response
sender, the last one flagged TRITONSERVER_RESPONSE_COMPLETE_FINAL. In-flight batching happens in
the loop, across all Triton requests of this instance.

Cancellation: a client that cancels (gRPC stream cancel, closed HTTP connection) is seen through
`sender.is_cancelled()`, polled in the loop thread before a non-final send, and turned into
`loop.abort()`, which frees the request's KV blocks. `is_cancelled()` is never called after the
final response was sent: on Triton 2.51 that crashes the whole server (SIGSEGV).

llmc's own figures (KV blocks, running/waiting sequences, token counts) are published as Triton
custom metrics (`llmc_*` on the metrics endpoint) by a small thread.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmc.errors import LlmcError
from llmc.serve.engine_loop import ENGINE_STATS
from llmc.serve.triton.export import INPUTS

INPUT_NAMES = tuple(row[0] for row in INPUTS)  # as declared in config.pbtxt
CANCEL_POLL_SECONDS = 0.05   # how often a running request's cancellation is polled
METRICS_SECONDS = 0.2        # how often the llmc_* custom metrics are refreshed
# (metric name, stats key, help); requests_finished is labelled by reason separately.
GAUGES = [(f"llmc_{name}", key, doc) for key, doc, _, _, name in ENGINE_STATS]


@dataclass
class ParsedRequest:
    prompt: str
    params: Any          # SamplingParams
    stream: bool


def _scalar(inputs: dict[str, np.ndarray], name: str):
    """The single value of a [1] / [1, 1] tensor, or None when the input was not sent."""
    arr = inputs.get(name)
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.ndim >= 1 and arr.shape[0] > 1:
        raise LlmcError(f"{name}: one prompt per request (got a batch of {arr.shape[0]}); "
                        "send requests concurrently, the engine batches them in flight")
    flat = arr.reshape(-1)
    if flat.size != 1:
        raise LlmcError(f"{name} must hold exactly one value, got shape {list(arr.shape)}")
    return flat[0]


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def parse_request(inputs: dict[str, np.ndarray], eos_ids: frozenset[int]) -> ParsedRequest:
    """TensorRT-LLM backend tensors -> (prompt, SamplingParams, stream). Raises LlmcError.

    Conventions kept from tensorrtllm_backend: top_k 0 and top_p 0 mean "off"; end_id -1 means
    "ignore EOS" (benchmarks); pad_id is accepted and unused (responses are never padded)."""
    from llmc.runtime.sampling import SamplingParams

    text = _scalar(inputs, "text_input")
    if text is None:
        raise LlmcError("text_input is required")
    kw: dict[str, Any] = {}
    max_tokens = _scalar(inputs, "max_tokens")
    if max_tokens is not None:  # SamplingParams refuses values < 1 with the same one-line error
        kw["max_tokens"] = int(max_tokens)
    for name, key, cast in (("temperature", "temperature", float), ("top_k", "top_k", int),
                            ("top_p", "top_p", float), ("random_seed", "seed", int)):
        value = _scalar(inputs, name)
        if value is not None:
            kw[key] = cast(value)
    if kw.get("top_p") == 0.0:
        kw["top_p"] = 1.0
    stop = inputs.get("stop_words")
    if stop is not None:
        kw["stop"] = [s for s in (_text(v) for v in np.asarray(stop).reshape(-1)) if s]
    end_id = _scalar(inputs, "end_id")
    if end_id is not None:
        end_id = int(end_id)
        if end_id == -1:
            kw["ignore_eos"] = True
        elif end_id not in eos_ids:
            raise LlmcError(f"end_id {end_id} is not an EOS token of this model ({sorted(eos_ids)}); "
                            "send one of those, or -1 to ignore EOS")
    stream = _scalar(inputs, "stream")
    return ParsedRequest(_text(text), SamplingParams(**kw), bool(stream) if stream is not None else False)


@dataclass
class _Stream:
    """One Triton request in flight: its sender and what was sent so far."""

    sender: Any
    stream: bool
    done: bool = False
    cancelled: bool = False
    next_cancel_check: float = 0.0


class LlmcTritonModel:
    """What `TritonPythonModel` delegates to (see module docstring)."""

    def __init__(self, args: dict, pb_utils: Any = None):
        if pb_utils is None:
            import triton_python_backend_utils as pb_utils
        from llmc.runtime.llm import LLM
        from llmc.serve.engine_loop import EngineLoop

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        engine = Path(params["engine_dir"])
        if not engine.is_absolute():  # --copy-engine: relative to the version directory
            engine = Path(args["model_repository"]) / args["model_version"] / engine
        self.logger = pb_utils.Logger
        self.llm = LLM(engine, kv_cache_mb=float(params["kv_cache_mb"]) if params.get("kv_cache_mb") else None,
                       max_batch_size=int(params["max_batch_size"]) if params.get("max_batch_size") else None)
        self.eos_ids = frozenset(self.llm.eos_ids)
        self.loop = EngineLoop(self.llm, max_queue=int(params["max_queue"]) if params.get("max_queue") else None)
        self.loop.start()
        self._stop = threading.Event()
        self._labels = {"model": config.get("name", "llmc"), "instance": args.get("model_instance_name", "")}
        self._metrics_thread = threading.Thread(target=self._publish_metrics, name="llmc-metrics", daemon=True)
        self._metrics_thread.start()
        self.logger.log_info(f"llmc: {args.get('model_instance_name')} serving {engine} "
                             f"({self.llm.num_blocks} KV blocks, batch {self.llm.max_batch_size})")

    # ---- requests ---------------------------------------------------------------------------
    def execute(self, requests: list) -> None:
        pb = self.pb
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = {}
                for name in INPUT_NAMES:
                    tensor = pb.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        inputs[name] = tensor.as_numpy()
                parsed = parse_request(inputs, self.eos_ids)
                st = _Stream(sender, parsed.stream)
                self.loop.submit(parsed.prompt, parsed.params, self._sink(st))
            except Exception as exc:  # noqa: BLE001 - any bad request is that request's error only
                msg = str(exc) if isinstance(exc, LlmcError) else f"llmc: bad request ({exc!r})"
                sender.send(pb.InferenceResponse(error=pb.TritonError(msg)),
                            flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _sink(self, st: _Stream) -> Callable:
        def sink(ev) -> None:
            try:
                self._on_event(st, ev)
            except Exception as exc:  # noqa: BLE001 - never let one request kill the loop thread
                self.logger.log_error(f"llmc: sending a response failed: {exc!r}")
                if not ev.finished:  # nobody to stream to: stop generating, free its KV blocks
                    st.cancelled = True
                    self.loop.abort(ev.request_id)
        return sink

    def _response(self, text: str, ids: list[int], finish_reason: str | None):
        pb = self.pb
        tensors = [pb.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=object)),
                   pb.Tensor("output_ids", np.array([ids], dtype=np.int32).reshape(1, -1))]
        if finish_reason is not None:
            tensors.append(pb.Tensor("finish_reason", np.array([[finish_reason.encode()]], dtype=object)))
        return pb.InferenceResponse(output_tensors=tensors)

    def _on_event(self, st: _Stream, ev) -> None:
        """Runs in the loop thread: forward one TokenEvent to the request's sender."""
        pb = self.pb
        if st.done:
            return
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if not ev.finished:
            if st.cancelled:
                return
            now = time.monotonic()
            if now >= st.next_cancel_check:  # only ever before the final response
                st.next_cancel_check = now + CANCEL_POLL_SECONDS
                if st.sender.is_cancelled():
                    st.cancelled = True
                    self.loop.abort(ev.request_id)
                    return
            if st.stream and (ev.text or ev.token_ids):
                st.sender.send(self._response(ev.text, list(ev.token_ids), None))
            return
        st.done = True
        out = ev.output
        if out.finish_reason == "error":
            st.sender.send(pb.InferenceResponse(error=pb.TritonError(out.error or "llmc: request failed")),
                           flags=final)
        elif st.cancelled:
            st.sender.send(flags=final)
        elif st.stream:
            st.sender.send(self._response(ev.text, list(ev.token_ids), out.finish_reason), flags=final)
        else:
            st.sender.send(self._response(out.text, list(out.output_token_ids), out.finish_reason), flags=final)

    # ---- metrics ------------------------------------------------------------------------------
    def _publish_metrics(self) -> None:
        pb = self.pb
        try:
            families = {key: pb.MetricFamily(name=name, description=desc, kind=pb.MetricFamily.GAUGE)
                        for name, key, desc in GAUGES}
            metrics = {key: fam.Metric(labels=self._labels) for key, fam in families.items()}
            finished = pb.MetricFamily(name="llmc_requests_finished",
                                       description="Requests finished, by reason (cumulative)",
                                       kind=pb.MetricFamily.GAUGE)
        except Exception as exc:  # custom metrics unavailable (older backend, metrics disabled)
            self.logger.log_warn(f"llmc: custom metrics disabled: {exc!r}")
            return
        by_reason: dict[str, Any] = {}
        while not self._stop.wait(METRICS_SECONDS):
            stats = self.loop.stats()
            for key, metric in metrics.items():
                metric.set(float(stats.get(key, 0)))
            for reason, count in stats.get("requests_finished", {}).items():
                if reason not in by_reason:
                    by_reason[reason] = finished.Metric(labels={**self._labels, "reason": reason})
                by_reason[reason].set(float(count))

    def finalize(self) -> None:
        self._stop.set()
        self._metrics_thread.join(timeout=2)
        self.loop.shutdown(drain=False, timeout=30)
