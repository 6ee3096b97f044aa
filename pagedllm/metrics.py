"""The engine's counters and gauges, as ``LLM.get_metrics()`` returns them and the server's
/metrics exposes them (vLLM's names, ``pagedllm:`` in place of ``vllm:``)."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineStats:
    """The engine's state after a step (the server's engine thread publishes it for others to read)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_in_use: int = 0
    kv_blocks_total: int = 0
    prompt_tokens: int = 0  # totals over the engine's life from here on
    generation_tokens: int = 0
    preemptions: int = 0
    prefix_cache_queries: int = 0  # in blocks
    prefix_cache_hits: int = 0


@dataclass
class Metric:
    name: str
    help: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)


class Counter(Metric):
    """A total that only grows."""


class Gauge(Metric):
    """A value now."""


def engine_metrics(s: EngineStats) -> list[Metric]:
    return [
        Gauge("pagedllm:num_requests_running", "Requests in the running batch.", s.num_running),
        Gauge("pagedllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
        Gauge("pagedllm:kv_cache_usage_perc", "Share of KV cache blocks in use (1 is all).",
              s.kv_blocks_in_use / max(s.kv_blocks_total, 1)),
        Counter("pagedllm:prompt_tokens", "Prompt tokens of the requests added.", s.prompt_tokens),
        Counter("pagedllm:generation_tokens", "Tokens generated.", s.generation_tokens),
        Counter("pagedllm:num_preemptions", "Requests preempted for lack of KV blocks.", s.preemptions),
        Counter("pagedllm:prefix_cache_queries", "Prompt blocks looked up in the prefix cache.",
                s.prefix_cache_queries),
        Counter("pagedllm:prefix_cache_hits", "Prompt blocks found in the prefix cache.", s.prefix_cache_hits),
    ]
