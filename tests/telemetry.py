"""In-memory OpenTelemetry for the test run, installed before any instrument is created.

``METRICS`` and ``SPANS`` collect what the code under test records; the Prometheus reader makes
``/metrics`` show the same numbers.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

METRICS = InMemoryMetricReader()
SPANS = InMemorySpanExporter()
metrics.set_meter_provider(MeterProvider(metric_readers=[METRICS, PrometheusMetricReader()]))
_tracer_provider = TracerProvider()
_tracer_provider.add_span_processor(SimpleSpanProcessor(SPANS))
trace.set_tracer_provider(_tracer_provider)


def metric_points(name: str) -> list[Any]:
    """Every data point of the named metric collected so far (cumulative)."""
    data = METRICS.get_metrics_data()
    points: list[Any] = []
    if data is None:
        return points
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    points.extend(metric.data.data_points)
    return points


def counter_value(name: str, **attributes: str) -> float:
    return sum(p.value for p in metric_points(name) if all(p.attributes.get(k) == v for k, v in attributes.items()))
