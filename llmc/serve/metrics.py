"""Prometheus metrics of the server: engine state read at scrape time, latencies per request.

Gauges and counters of the engine (running/waiting requests, KV blocks, prefix-cache hits,
preemptions, finished requests by reason, token totals) are a custom collector over
`EngineLoop.stats()`, so they are exact at every scrape and cost nothing between scrapes.
Histograms (TTFT, time per output token, end-to-end latency, prompt and generation lengths)
are observed once per request from its final `RequestOutput`, in the engine loop's thread
(prometheus-client's metrics are thread-safe). Names follow vLLM's, under the `llmc:` prefix.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llmc.serve.engine_loop import ENGINE_STATS

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

# (metric name, stats key, help, kind) for the engine snapshot.
ENGINE_METRICS = [(f"llmc:{name}", key, doc, kind) for key, doc, kind, name, _ in ENGINE_STATS]


class EngineCollector:
    """Reads one `stats()` snapshot per scrape."""

    def __init__(self, stats: Callable[[], dict]):
        self._stats = stats

    def collect(self):
        s = self._stats()
        for name, key, doc, kind in ENGINE_METRICS:
            fam = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc)
            fam.add_metric([], float(s.get(key, 0)))
            yield fam
        used, total = s.get("kv_blocks_used", 0), s.get("kv_blocks_total", 0)
        usage = GaugeMetricFamily("llmc:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).")
        usage.add_metric([], used / total if total else 0.0)
        yield usage
        done = CounterMetricFamily("llmc:request_success", "Finished requests by finish reason.",
                                   labels=["finished_reason"])
        for reason in sorted({"stop", "length", "abort", "error", *s.get("requests_finished", {})}):
            done.add_metric([reason], float(s.get("requests_finished", {}).get(reason, 0)))
        yield done


class ServerMetrics:
    """The server's registry: the engine collector, request histograms, HTTP rejections."""

    def __init__(self, stats: Callable[[], dict]):
        from prometheus_client import disable_created_metrics

        disable_created_metrics()  # the *_created series only add noise to a scrape
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(EngineCollector(stats))
        r = self.registry
        self.ttft = Histogram("llmc:time_to_first_token_seconds", "Time to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("llmc:time_per_output_token_seconds", "Time per output token after the first.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("llmc:e2e_request_latency_seconds", "Request latency from arrival to finish.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Histogram("llmc:request_prompt_tokens", "Prompt length of finished requests.",
                                       buckets=TOKEN_BUCKETS, registry=r)
        self.generation_tokens = Histogram("llmc:request_generation_tokens",
                                           "Generated length of finished requests.", buckets=TOKEN_BUCKETS,
                                           registry=r)
        self.rejected = Counter("llmc:http_requests_rejected", "Requests refused before reaching the engine.",
                                ["status"], registry=r)

    def observe(self, out) -> None:
        """Record one finished request (a RequestOutput)."""
        if out.error:
            return
        if out.ttft is not None:
            self.ttft.observe(out.ttft)
        if out.tpot is not None:
            self.tpot.observe(out.tpot)
        if out.finish_time is not None and out.arrival_time:
            self.e2e.observe(out.finish_time - out.arrival_time)
        self.prompt_tokens.observe(len(out.prompt_token_ids))
        self.generation_tokens.observe(len(out.output_token_ids))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
