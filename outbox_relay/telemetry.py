"""OpenTelemetry for the API and the workers: the instruments, Prometheus exposition, OTLP export.

``configure(service_name)`` is called once by the process entry points (``outbox-relay serve``,
``worker``, ``dev``): it installs a MeterProvider with a Prometheus reader (``/metrics`` on the API;
``start_metrics_server(port)`` on a worker) and, when the standard ``OTEL_EXPORTER_OTLP_*``
variables are set, OTLP exporters for metrics and traces. Library code only uses the OTel API
(``metrics.get_meter``, ``trace.get_tracer``), so tests can install in-memory readers instead.

Labels are bounded: tenant, relay, target (names), never message ids or keys.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation

METER_NAME = "outbox_relay"
_lock = threading.Lock()
_configured = False
LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0]
"""Commit-to-ack histogram boundaries, in seconds: milliseconds for a relay that keeps up, up to an
hour for one that is far behind (the SDK's defaults, 0-10,000 meant for milliseconds, put every
delivery under five seconds into one bucket)."""


def otlp_configured(signal: str) -> bool:
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    )


def configure(service_name: str) -> None:
    """Install the SDK providers for this process (idempotent)."""
    global _configured
    with _lock:
        if _configured:
            return
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
        readers: list[MetricReader] = [PrometheusMetricReader()]
        if otlp_configured("metrics"):
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
        if otlp_configured("traces"):
            # only where spans go somewhere: without an exporter the API's no-op tracer is used, whose
            # spans cost nothing (the SDK's cost ~100 us each, a third of a trickle's CPU per batch)
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            tracer_provider = TracerProvider(resource=resource)
            tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            trace.set_tracer_provider(tracer_provider)
        _configured = True


def start_metrics_server(port: int, host: str = "0.0.0.0") -> None:
    from prometheus_client import start_http_server

    start_http_server(port, addr=host)


def prometheus_text() -> bytes:
    from prometheus_client import REGISTRY, generate_latest

    return generate_latest(REGISTRY)


@dataclass
class PendingSample:
    """What a worker last saw of one relay partition's backlog."""

    labels: dict[str, str]
    pending: int
    oldest_age_s: float


class Instruments:
    """The relay's metrics; one instance per process (``instruments()``)."""

    def __init__(self) -> None:
        meter = metrics.get_meter(METER_NAME)
        self._sent: dict[tuple[str, str, str], int] = {}
        meter.create_observable_counter(
            "outbox_messages_sent", callbacks=[self._observe_sent], description="Messages the broker acknowledged"
        )
        self._filtered: dict[tuple[str, str, str], int] = {}
        meter.create_observable_counter(
            "outbox_messages_filtered",
            callbacks=[self._observe_filtered],
            description="Outbox rows the relay's filter left out (the cursor passed them unpublished)",
        )
        self.failed = meter.create_counter(
            "outbox_messages_failed", description="Messages whose publish failed (refused, or target unavailable)"
        )
        self.retried = meter.create_counter("outbox_messages_retried", description="Refused messages retried")
        self.dead = meter.create_counter("outbox_messages_dead", description="Messages dead-lettered")
        self.latency = meter.create_histogram(
            "outbox_commit_to_ack_seconds",
            unit="s",
            description=(
                "Per relay and published round: from its oldest message's insert time (the best known "
                "commit time) to the broker's ack"
            ),
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        )
        self.lease_acquired = meter.create_counter("outbox_lease_acquired", description="Partition leases taken")
        self.lease_lost = meter.create_counter("outbox_lease_lost", description="Leases lost mid-slice")
        self.leases_held = meter.create_up_down_counter("outbox_leases_held", description="Leases held right now")
        self.pending: dict[tuple[str, str, str, int], PendingSample] = {}
        meter.create_observable_gauge(
            "outbox_pending_messages", callbacks=[self._observe_pending], description="Messages waiting per relay"
        )
        meter.create_observable_gauge(
            "outbox_oldest_pending_age_seconds",
            callbacks=[self._observe_oldest],
            unit="s",
            description="Age of the oldest waiting message per relay",
        )

        self.fleet_sources: list[Callable[[], dict[str, list[tuple[float, dict[str, Any]]]]]] = []
        """Callbacks of this process's fleet engines: gauge name -> (value, labels) observations."""
        for name, unit, description in (
            ("outbox_batches_in_flight", "", "Batches a worker is publishing now, per tenant (fair share)"),
            ("outbox_batches_waiting", "", "Batches waiting for a worker slot, per tenant"),
            ("outbox_target_throttled_seconds", "s", "Time batches waited on the target's rate limit, in all"),
            ("outbox_partitions_owned", "", "Relay partitions this worker owns"),
        ):
            meter.create_observable_gauge(
                name, callbacks=[self._fleet_observer(name)], unit=unit, description=description
            )

    def _fleet_observer(self, name: str) -> Callable[[CallbackOptions], list[Observation]]:
        def observe(options: CallbackOptions) -> list[Observation]:
            out: list[Observation] = []
            for source in list(self.fleet_sources):
                out += [Observation(value, attributes) for value, attributes in source().get(name, [])]
            return out

        return observe

    def add_sent(self, labels: dict[str, Any], count: int) -> None:
        """Count acknowledged messages: a dict update per batch, read at collection (a synchronous
        counter hashes its attributes on every add, a noticeable part of a batch's cost)."""
        key = (labels["tenant"], labels["relay"], labels["target"])
        self._sent[key] = self._sent.get(key, 0) + count

    def add_filtered(self, labels: dict[str, Any], count: int) -> None:
        """Count rows the relay's filter left out, as :meth:`add_sent` counts sent ones."""
        key = (labels["tenant"], labels["relay"], labels["target"])
        self._filtered[key] = self._filtered.get(key, 0) + count

    def _observe_sent(self, options: CallbackOptions) -> list[Observation]:
        return self._observe_totals(self._sent)

    def _observe_filtered(self, options: CallbackOptions) -> list[Observation]:
        return self._observe_totals(self._filtered)

    @staticmethod
    def _observe_totals(totals: dict[tuple[str, str, str], int]) -> list[Observation]:
        return [
            Observation(total, {"tenant": tenant, "relay": relay, "target": target})
            for (tenant, relay, target), total in list(totals.items())
        ]

    def _per_relay(self) -> dict[tuple[str, str, str], list[PendingSample]]:
        grouped: dict[tuple[str, str, str], list[PendingSample]] = {}
        for (tenant, relay, target, _), sample in list(self.pending.items()):
            grouped.setdefault((tenant, relay, target), []).append(sample)
        return grouped

    def _observe_pending(self, options: CallbackOptions) -> list[Observation]:
        return [
            Observation(sum(s.pending for s in samples), samples[0].labels) for samples in self._per_relay().values()
        ]

    def _observe_oldest(self, options: CallbackOptions) -> list[Observation]:
        return [
            Observation(max(s.oldest_age_s for s in samples), samples[0].labels)
            for samples in self._per_relay().values()
        ]


_instruments: Instruments | None = None


def instruments() -> Instruments:
    global _instruments
    if _instruments is None:
        _instruments = Instruments()
    return _instruments


def labels(tenant: str, relay: str, target: str) -> dict[str, Any]:
    return {"tenant": tenant, "relay": relay, "target": target}
