"""Server counters rendered in Prometheus' text exposition format (no client library needed).

Counters are bumped by the scheduler thread and read by the HTTP side; plain attribute updates
are atomic under the GIL, and the only multi-field update (histograms) takes a lock.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPS_WINDOW = 10.0  # seconds over which the tokens/s gauge is averaged


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, le in enumerate(self.buckets):
            if v <= le:
                self.counts[i] += 1
        self.sum += v
        self.count += 1


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.time()
        self.prompt_tokens = 0
        self.prompt_seconds = 0.0
        self.generated_tokens = 0
        self.decode_steps = 0
        self.decode_seconds = 0.0
        self.active = 0
        self.queued = 0
        self.slots_total = 0
        self.cancelled = 0
        # llama-server's counters (llamacpp:* names)
        self.prompt_tokens_cached = 0
        self.n_decode = 0  # engine calls: prompt chunks and batched steps
        self.n_busy_slots = 0  # summed over batched steps
        self.n_tokens_max = 0
        self.requests: dict[tuple[str, int], int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.ttft = Histogram(LATENCY_BUCKETS)
        self._recent: deque[tuple[float, int, float]] = deque()  # (time, tokens, s) per step
        # llama-server's throughput buckets (server_metrics prompt_bucket / predict_bucket):
        # [tokens or steps, seconds] since the last /metrics scrape, which empties them
        self.prompt_bucket = [0, 0.0]
        self.predict_bucket = [0, 0.0]
        self.as_of: float | None = None  # a snapshot's time (its gauges are as of then)

    def add_prompt(self, n_tokens: int, seconds: float) -> None:
        self.prompt_tokens += n_tokens
        self.prompt_seconds += seconds
        self.prompt_bucket[0] += n_tokens
        self.prompt_bucket[1] += seconds

    def reset_bucket(self) -> None:
        self.prompt_bucket = [0, 0.0]
        self.predict_bucket = [0, 0.0]

    def snapshot(self) -> Metrics:
        """A frozen copy (what /metrics reports while the server sleeps, as llama-server's
        cached_metrics)."""
        with self.lock:
            out = copy.copy(self)
            out.as_of = time.monotonic()
            out.lock = threading.Lock()
            out.requests = dict(self.requests)
            out.latency, out.ttft = copy.deepcopy(self.latency), copy.deepcopy(self.ttft)
            out._recent = deque(self._recent)
            out.prompt_bucket, out.predict_bucket = list(self.prompt_bucket), \
                list(self.predict_bucket)
        return out

    def forget_work(self) -> None:
        """Zero what the warmup request counted: llama-server's counters start after it."""
        with self.lock:
            self.prompt_tokens = self.generated_tokens = self.decode_steps = 0
            self.prompt_seconds = self.decode_seconds = 0.0
            self.prompt_tokens_cached = self.n_decode = self.n_busy_slots = 0
            self.n_tokens_max = 0
            self._recent.clear()
            self.reset_bucket()

    def observe_step(self, n_tokens: int, seconds: float) -> None:
        now = time.monotonic()
        self.decode_steps += 1
        self.decode_seconds += seconds
        self.predict_bucket[0] += 1
        self.predict_bucket[1] += seconds
        with self.lock:
            self._recent.append((now, n_tokens, seconds))
            while self._recent and self._recent[0][0] < now - TPS_WINDOW:
                self._recent.popleft()

    def observe_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def observe_latency(self, seconds: float, ttft: float) -> None:
        """A generation that completed: total latency and time to its first event."""
        with self.lock:
            self.latency.observe(seconds)
            self.ttft.observe(ttft)

    def tokens_per_second(self) -> float:
        """Tokens per second of decoding over the steps of the last TPS_WINDOW seconds (all
        slots together): what the decode steps ran at, not diluted by idle time, so that a
        snapshot taken on going to sleep reads as the scrape just before it."""
        now = self.as_of if self.as_of is not None else time.monotonic()
        with self.lock:
            recent = [(n, s) for t, n, s in self._recent if t >= now - TPS_WINDOW]
        secs = sum(s for _, s in recent)
        return sum(n for n, _ in recent) / secs if secs > 0 else 0.0

    def render(self) -> str:
        p = "jllama_"
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, value: float | None = None) -> None:
            lines.append(f"# HELP {p}{name} {help_}")
            lines.append(f"# TYPE {p}{name} {kind}")
            if value is not None:
                lines.append(f"{p}{name} {value:g}" if isinstance(value, float)
                             else f"{p}{name} {value}")

        metric("prompt_tokens_total", "counter", "Prompt tokens evaluated (cached prefixes "
               "excluded).", self.prompt_tokens)
        metric("prompt_seconds_total", "counter", "Seconds spent evaluating prompts.",
               float(self.prompt_seconds))
        metric("tokens_generated_total", "counter", "Tokens generated.", self.generated_tokens)
        metric("decode_steps_total", "counter", "Batched decode steps run.", self.decode_steps)
        metric("decode_seconds_total", "counter", "Seconds spent in batched decode steps.",
               float(self.decode_seconds))
        metric("tokens_per_second", "gauge", f"Generated tokens per second of the decode steps "
               f"of the last {TPS_WINDOW:g} s, all slots together.",
               float(self.tokens_per_second()))
        metric("requests_processing", "gauge", "Requests holding a slot.", self.active)
        metric("requests_queued", "gauge", "Requests waiting for a slot.", self.queued)
        metric("slots_total", "gauge", "Slots (parallel sequences).", self.slots_total)
        metric("requests_cancelled_total", "counter", "Requests dropped because the client "
               "went away or timed out.", self.cancelled)
        metric("requests_total", "counter", "HTTP requests answered, by endpoint and status "
               "(the status reads /health, GET /props, /models and /metrics are not counted).")
        with self.lock:
            for (ep, st), n in sorted(self.requests.items()):
                lines.append(f'{p}requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            for name, h, help_ in (("request_duration_seconds", self.latency,
                                    "Generation request latency, arrival to last byte."),
                                   ("time_to_first_token_seconds", self.ttft,
                                    "Arrival to first generated text.")):
                metric(name, "histogram", help_)
                for le, c in zip(h.buckets, h.counts):
                    lines.append(f'{p}{name}_bucket{{le="{le:g}"}} {c}')
                lines.append(f'{p}{name}_bucket{{le="+Inf"}} {h.count}')
                lines.append(f"{p}{name}_sum {h.sum:g}")
                lines.append(f"{p}{name}_count {h.count}")
        return "\n".join(lines + self.render_llamacpp()) + "\n"

    def render_llamacpp(self) -> list[str]:
        """llama-server's own metrics under its names (server-task.cpp to_metrics), so its
        dashboards read jllama unchanged. The two throughput gauges are over the window since
        the previous scrape, as its buckets are (the caller empties them after a scrape);
        llama-server counts decode steps there, not tokens."""
        counters = [
            ("prompt_tokens_total", "Number of prompt tokens processed, excluding cached "
             "tokens", self.prompt_tokens),
            ("prompt_tokens_cached_total", "Number of prompt tokens reused from the cache",
             self.prompt_tokens_cached),
            ("prompt_seconds_total", "Total time spent processing prompts",
             self.prompt_seconds),
            ("tokens_predicted_total", "Number of generation tokens processed",
             self.generated_tokens),
            ("tokens_predicted_seconds_total", "Total time spent generating tokens",
             self.decode_seconds),
            ("n_decode_total", "Total number of engine calls (prompt chunks and batched "
             "steps)", self.n_decode),
            ("n_tokens_max", "Largest observed sequence length (prompt + generation)",
             self.n_tokens_max),
            ("spec_decode_num_draft_tokens_total", "Speculative: Total draft tokens generated",
             0),
            ("spec_decode_num_accepted_tokens_total", "Speculative: Total draft tokens "
             "accepted by the target model", 0),
            ("spec_decode_num_drafts_total", "Speculative: Total speculative decoding "
             "verification steps", 0),
        ]
        gauges = [
            ("prompt_tokens_seconds", "Average prompt throughput in tokens/s",
             _rate(self.prompt_bucket)),
            ("predicted_tokens_seconds", "Average generation throughput in tokens/s",
             _rate(self.predict_bucket)),
            ("requests_processing", "Number of requests processing", self.active),
            ("requests_deferred", "Number of requests deferred", self.queued),
            ("n_busy_slots_per_decode", "Average number of busy slots per decode step",
             self.n_busy_slots / max(self.decode_steps, 1)),
        ]
        out = []
        for kind, items in (("counter", counters), ("gauge", gauges)):
            for name, help_, v in items:
                out += [f"# HELP llamacpp:{name} {help_}", f"# TYPE llamacpp:{name} {kind}",
                        f"llamacpp:{name} {v!r}" if isinstance(v, float)
                        else f"llamacpp:{name} {v}"]
        return out


def _rate(bucket: list) -> float:
    return bucket[0] / bucket[1] if bucket[1] > 0 else 0.0
