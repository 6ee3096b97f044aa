"""Prometheus metrics of the server (/metrics), through ``prometheus_client``, named as vLLM names
its own with ``pagedllm:`` in place of ``vllm:``.

The engine's gauges and counters come from the stats its thread publishes after each step (the
HTTP thread never reads the scheduler); per-request histograms and the finish-reason counter are
observed as each request ends.
"""

import os

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client import Counter as PrometheusCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.metrics import Counter, engine_metrics
from pagedllm.outputs import RequestOutput

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
FINISH_REASONS = ("stop", "length", "abort", "error")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# set for several API-server processes: prometheus_client then keeps each one's values in files there, summed at a
# scrape
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class EngineCollector(Collector):
    """The engine's state at the last step, read at scrape time."""

    def __init__(self, engine: AsyncLLM):
        self.engine = engine

    def collect(self):
        for metric in engine_metrics(self.engine.stats):
            family = CounterMetricFamily if isinstance(metric, Counter) else GaugeMetricFamily
            yield family(metric.name, metric.help, metric.value)


class ServerMetrics:
    """One registry per server (several may run in one process, as in the tests)."""

    def __init__(self, engine: AsyncLLM):
        self.registry = CollectorRegistry()
        self.engine_collector = EngineCollector(engine)
        self.registry.register(self.engine_collector)

        def histogram(name: str, help_text: str, buckets: tuple) -> Histogram:
            return Histogram(f"pagedllm:{name}", help_text, buckets=buckets, registry=self.registry)

        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first token.",
                              LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between a request's outputs.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last token.", LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Time from arrival to first scheduled.",
                               LATENCY_BUCKETS)
        self.prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.generation_tokens = histogram("request_generation_tokens", "Generated tokens per request.",
                                           TOKEN_BUCKETS)
        self.success = PrometheusCounter("pagedllm:request_success", "Requests that ended, by finish reason.",
                               ["finished_reason"], registry=self.registry)
        # At 0 from the start. And with several API-server processes each one's counter file is made now: a file
        # is empty for a moment as it is made, and a scrape by another process then failed with a 500
        # (prometheus/client_python#1199; seen here when a client's hang-up made the first "abort")
        for reason in FINISH_REASONS:
            self.success.labels(finished_reason=reason)

    def observe_request(self, arrival: float, token_times: list[float], final: RequestOutput | None,
                        generated_tokens: int) -> None:
        """A request's arrival, the times its outputs grew (time.monotonic()), its last output and
        the tokens it generated."""
        if token_times:
            self.ttft.observe(token_times[0] - arrival)
            self.e2e.observe(token_times[-1] - arrival)
            for earlier, later in zip(token_times, token_times[1:], strict=False):
                self.itl.observe(later - earlier)
        if final is None or not final.finished:  # the client left (or the request failed) before the end
            self.success.labels(finished_reason="abort").inc()
            return
        self.prompt_tokens.observe(len(final.prompt_token_ids))
        self.generation_tokens.observe(generated_tokens)
        if final.metrics is not None and final.metrics.time_in_queue is not None:
            self.queue.observe(final.metrics.time_in_queue)
        for completion in final.outputs:
            self.success.labels(finished_reason=completion.finish_reason).inc()

    def render(self) -> bytes:
        """This registry's metrics; in an API-server process of several, every process's requests
        summed (the engine's gauges and counters are the same in each: its stats reach them all)."""
        if MULTIPROCESS_DIR_ENV not in os.environ:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(self.engine_collector)
        return generate_latest(registry)
