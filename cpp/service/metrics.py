"""Prometheus text-format metrics (exposition format 0.0.4), kept in-process without extra dependencies."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: LabelValues, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Counter:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, labels
        self._values: dict[LabelValues, float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] += amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            for labels, value in sorted(self._values.items()):
                yield f"{self.name}{_labels(self.label_names, labels)} {value}"


class Histogram:
    def __init__(
        self, name: str, help_text: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()
    ) -> None:
        self.name, self.help, self.label_names, self.buckets = name, help_text, labels, buckets
        self._counts: dict[LabelValues, list[int]] = {}
        self._sums: dict[LabelValues, float] = defaultdict(float)
        self._lock = threading.Lock()

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            counts = self._counts.setdefault(labels, [0] * (len(self.buckets) + 1))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sums[labels] += value

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            for labels, counts in sorted(self._counts.items()):
                cumulative = 0
                for bound, count in zip((*self.buckets, float("inf")), counts, strict=True):
                    cumulative += count
                    le = "+Inf" if bound == float("inf") else repr(bound)
                    bucket_labels = _labels(self.label_names, labels, f'le="{le}"')
                    yield f"{self.name}_bucket{bucket_labels} {cumulative}"
                yield f"{self.name}_sum{_labels(self.label_names, labels)} {self._sums[labels]}"
                yield f"{self.name}_count{_labels(self.label_names, labels)} {cumulative}"


class Gauge:
    """A gauge whose labelled values are read from a callback at scrape time."""

    def __init__(
        self, name: str, help_text: str, labels: tuple[str, ...], read: Callable[[], dict[LabelValues, float]]
    ) -> None:
        self.name, self.help, self.label_names, self._read = name, help_text, labels, read

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        for labels, value in sorted(self._read().items()):
            yield f"{self.name}{_labels(self.label_names, labels)} {value}"


class ServiceMetrics:
    """The service's metrics; ``jobs_by_status`` is read from the job store at scrape time."""

    def __init__(self, jobs_by_status: Callable[[], dict[LabelValues, float]]) -> None:
        self.requests = Counter(
            "cpp_http_requests_total",
            "HTTP requests by method, handler (endpoint function) and status.",
            ("method", "handler", "status"),
        )
        self.latency = Histogram(
            "cpp_http_request_duration_seconds",
            "HTTP request latency by method and handler.",
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            ("method", "handler"),
        )
        self.jobs_finished = Counter("cpp_jobs_finished_total", "Jobs finished by this process.", ("status",))
        self.job_duration = Histogram(
            "cpp_job_duration_seconds",
            "Run time of jobs finished by this process.",
            (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0),
        )
        self.jobs = Gauge("cpp_jobs", "Jobs in the store by status.", ("status",), jobs_by_status)

    def render(self) -> str:
        families = (self.requests, self.latency, self.jobs_finished, self.job_duration, self.jobs)
        return "\n".join(line for family in families for line in family.render()) + "\n"
