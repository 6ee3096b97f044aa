"""Prometheus metrics of the server (/metrics), in the text exposition format.

Gauges are read from the engine when scraped; time-to-first-token and inter-token latency are
histograms observed as each request's outputs arrive.
"""

import bisect
import time

from pagedllm.engine.async_llm import AsyncLLM

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {sum(self.counts)}')
        lines += [f"{self.name}_sum {self.total}", f"{self.name}_count {sum(self.counts)}"]
        return lines


class ServerMetrics:
    def __init__(self, engine: AsyncLLM):
        self.engine = engine
        self.ttft = Histogram("pagedllm:time_to_first_token_seconds", "Time from arrival to first token.",
                              TTFT_BUCKETS)
        self.itl = Histogram("pagedllm:inter_token_latency_seconds", "Time between a request's tokens.",
                             ITL_BUCKETS)
        self._last_scrape = (time.monotonic(), 0)

    def observe_request(self, arrival: float, token_times: list[float]) -> None:
        """A request's arrival time and the times its outputs grew (time.monotonic())."""
        if token_times:
            self.ttft.observe(token_times[0] - arrival)
            for earlier, later in zip(token_times, token_times[1:], strict=False):
                self.itl.observe(later - earlier)

    def render(self) -> str:
        engine = self.engine.engine
        manager, scheduler = engine.block_manager, engine.scheduler
        now, generated = time.monotonic(), engine.num_generated_tokens
        then, generated_then = self._last_scrape
        self._last_scrape = (now, generated)
        hit_rate = manager.num_cache_hits / manager.num_cache_queries if manager.num_cache_queries else 0.0
        gauges = [
            ("num_requests_running", "Requests in the running batch.", len(scheduler.running)),
            ("num_requests_waiting", "Requests waiting to be scheduled.", len(scheduler.waiting)),
            ("kv_cache_blocks_in_use", "KV cache blocks held by requests.",
             manager.num_blocks - manager.num_free_blocks),
            ("kv_cache_blocks_total", "KV cache blocks in all.", manager.num_blocks),
            ("prefix_cache_hit_rate", "Share of looked-up prompt blocks found in the prefix cache.", hit_rate),
            ("generation_tokens_per_second", "Generated tokens per second since the previous scrape.",
             (generated - generated_then) / max(now - then, 1e-9)),
        ]
        lines = []
        for name, help_text, value in gauges:
            lines += [f"# HELP pagedllm:{name} {help_text}", f"# TYPE pagedllm:{name} gauge",
                      f"pagedllm:{name} {value}"]
        lines += ["# HELP pagedllm:generation_tokens_total Tokens generated.",
                  "# TYPE pagedllm:generation_tokens_total counter", f"pagedllm:generation_tokens_total {generated}"]
        lines += self.ttft.render() + self.itl.render()
        return "\n".join(lines) + "\n"
