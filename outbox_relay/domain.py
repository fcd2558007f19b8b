"""Domain types shared by the control plane and the data plane.

Each tenant resource is one msgspec struct used for both directions of the API, as OpenAPI intends:
fields marked ``readOnly`` (name, timestamps, ``password_set``, ``rotation``) are filled in by the service and
ignored when a client sends them back (so ``GET`` → edit → ``PUT`` works); fields marked
``writeOnly`` (passwords) are accepted on write, encrypted at rest and never returned. Everything
else reads back exactly as written, which keeps Terraform plans free of drift.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

NAME_PATTERN = r"^[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?$"
NAME_RE = re.compile(NAME_PATTERN)
IDENT_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"

Name = Annotated[
    str,
    Meta(
        pattern=NAME_PATTERN,
        description="Lower-case letters, digits, '.', '_' and '-'; 1-63 characters.",
    ),
]
ReadOnlyName = Annotated[str | UnsetType, Meta(extra_json_schema={"readOnly": True})]
ReadOnlyTime = Annotated[datetime | UnsetType, Meta(extra_json_schema={"readOnly": True, "format": "date-time"})]
ReadOnlyFlag = Annotated[bool | UnsetType, Meta(extra_json_schema={"readOnly": True})]
Secret = (
    Annotated[
        str,
        Meta(
            min_length=1,
            max_length=4096,
            extra_json_schema={"writeOnly": True},
            description="Write-only: encrypted at rest, never returned. Omit to keep, null to clear.",
        ),
    ]
    | None
    | UnsetType
)


class Rotation(msgspec.Struct, kw_only=True):
    """A password rotation in progress: the new password is pending next to the current one (both
    must work on the server meanwhile) until every worker reading or publishing through the resource
    has switched to it; the old one is then deleted and this field goes away. No secrets."""

    state: Annotated[
        Literal["switching", "refused"],
        Meta(
            description="`switching`: workers are moving to the new password. `refused`: the server refused "
            "the new password (see `error`); the workers keep using the current one and try the new one again "
            "every few seconds."
        ),
    ]
    started_at: datetime
    workers: Annotated[int, Meta(description="Live workers that use the resource.")]
    switched: Annotated[int, Meta(description="Of those, the workers that use the new password.")]
    error: str | None = None
    """Why the new password did not work (authentication failed ...), as a worker last saw it."""


ReadOnlyRotation = Annotated[Rotation | UnsetType, Meta(extra_json_schema={"readOnly": True})]
Destination = Annotated[str, Meta(min_length=1, max_length=249)]
MAX_BOOTSTRAP_SERVERS = 32
"""More brokers than any cluster needs for bootstrapping; every one is resolved and checked."""
MAX_NATS_SERVERS = 32
"""As many NATS server URLs as a target may list; every one is resolved and checked."""
MAX_STREAM_MAXLEN = 2**63 - 1
"""``XADD ... MAXLEN`` takes a signed 64-bit integer; Redis refuses every larger value."""
# Checked by outbox_relay.specs rather than by these types (a stored spec over a cap still decodes,
# reads back and can be fixed; it is just not used), and documented in the schema all the same.


# --- domain words: the strings the relay stores and reports, one type each -----------------------------
# Each value is stored in the control DB or visible in the API (or both): a value never changes. The
# three words for "the broker cannot be reached" are kept where each is stored and seen:
#
#   PartitionErrorClass.TARGET_UNAVAILABLE  "target_unavailable"  the engine, relay_partitions.last_error_class
#                                                                   (the status's partitions[].last_error_class)
#   CauseKind.TARGET_UNREACHABLE            "target_unreachable"  the status's cause.kind, derived from the above
#   ErrorClass.UNAVAILABLE                  "unavailable"         a dead letter whose replay found no broker
#
# Literals (``...Name``) stand beside an enum where a msgspec schema names the values: the API document
# inlines a Literal's values (an enum would add a named component); tests/unit/test_domain_words.py checks
# that each Literal lists exactly its enum's values.


class ErrorClass(StrEnum):
    """Why a dead letter is dead (``dead_letters.error_class``, the API's ``error_class``).

    ``refused`` and ``too_large`` are written by the engine; a replay that fails writes ``refused``
    or ``unavailable`` (the broker could not be reached: the engine's ``target_unavailable``, the
    status's ``target_unreachable``), one refused before it starts ``unroutable``, ``too_large`` or
    ``not_allowed``. A stored value outside the set still reads (the API's field is a string)."""

    REFUSED = "refused"
    """The broker refused the message (``max_attempts`` times, or on a replay)."""
    TOO_LARGE = "too_large"
    """Over the relay's ``max_payload_bytes``."""
    UNAVAILABLE = "unavailable"
    """A replay found the target unreachable (``PartitionErrorClass.TARGET_UNAVAILABLE`` elsewhere)."""
    UNROUTABLE = "unroutable"
    """A replay had nowhere to go: no such target, the relay gone, no destination."""
    NOT_ALLOWED = "not_allowed"
    """A replay's target is unusable: an address the policy denies, a spec refused."""


class PartitionErrorClass(StrEnum):
    """The class of a partition's last error (``relay_partitions.last_error_class``, the status's
    ``partitions[].last_error_class``), written by the workers."""

    TARGET_UNAVAILABLE = "target_unavailable"
    """The target could not be reached: the status reports it as ``CauseKind.TARGET_UNREACHABLE``."""
    DATABASE_UNAVAILABLE = "database_unavailable"
    """The tenant database could not be reached: ``CauseKind.DATABASE_UNREACHABLE`` in the status."""
    REFUSED = "refused"
    """The broker refused a message, which is being retried."""
    ERROR = "error"
    """Anything else."""


class CauseKind(StrEnum):
    """Why a relay is failing or stalled (the status's ``cause.kind``), worst first."""

    TARGET_UNREACHABLE = "target_unreachable"
    """From ``PartitionErrorClass.TARGET_UNAVAILABLE``: the wire words differ, and both stay."""
    DATABASE_UNREACHABLE = "database_unreachable"
    """From ``PartitionErrorClass.DATABASE_UNAVAILABLE``."""
    POISON_MESSAGE = "poison_message"
    LONG_RUNNING_TRANSACTION = "long_running_transaction"
    LEASE_LOST = "lease_lost"


CauseKindName = Literal[
    "target_unreachable", "database_unreachable", "long_running_transaction", "poison_message", "lease_lost"
]
"""CauseKind's values in the order the API document has always listed them."""


class SliceOutcome(StrEnum):
    """How one partition slice of the engine ended (``engine.SliceResult.outcome``)."""

    RAN = "ran"
    BUSY = "busy"
    """Another holder has the lease."""
    GONE = "gone"
    """The relay was deleted or disabled."""
    LOST = "lost"
    """The lease was taken over mid-slice."""
    CHANGED = "changed"
    """The relay was disabled, deleted or edited mid-slice."""


class LetterStatus(StrEnum):
    """A dead letter's state (``dead_letters.status``, the API's ``status``)."""

    DEAD = "dead"
    """Needs attention: listed, replayable, discardable."""
    REPLAYING = "replaying"
    """Claimed by a replay (one that died holding it is claimable again after a while)."""
    REPLAYED = "replayed"
    DISCARDED = "discarded"


LetterStatusName = Literal["dead", "replaying", "replayed", "discarded"]


class JobStatus(StrEnum):
    """A bulk replay job's state (``dead_letter_jobs.status``, the API's ``status``)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


JobStatusName = Literal["queued", "running", "done", "failed"]


class Resource(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields every tenant resource carries; all are filled in by the service (and ignored when sent:
    the path names the resource)."""

    name: ReadOnlyName = UNSET
    created_at: ReadOnlyTime = UNSET
    updated_at: ReadOnlyTime = UNSET


# --- databases -------------------------------------------------------------------------------------


Ident = Annotated[str, Meta(pattern=IDENT_PATTERN, description="A SQL identifier: lower-case letters, digits, '_'.")]
HEADER_NAME_PATTERN = r"^(?!outbox-)[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""A header an adopted table's column is published as: not one of the relay's own ``outbox-*``."""
ADOPTED_MAX_HEADERS = 16


class OutboxColumns(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which column of an adopted table is which part of a message; the defaults are Debezium's
    outbox layout."""

    id: Annotated[Ident, Meta(description="A uuid column: the message id (`outbox-id`) consumers dedupe on.")] = "id"
    topic: Annotated[Ident, Meta(description="The outbox topic a relay's topic_mapping routes by.")] = "aggregatetype"
    key: Annotated[Ident | None, Meta(description="The message key (per-key order, the partition). Null: no key.")] = (
        "aggregateid"
    )
    payload: Annotated[Ident, Meta(description="The payload (jsonb, json, text or bytea), published as its bytes.")] = (
        "payload"
    )
    headers: Annotated[
        dict[Annotated[str, Meta(pattern=HEADER_NAME_PATTERN)], Ident],
        Meta(
            description="Header name -> column, published as the column's text (a NULL column: no header). "
            "A timestamp column goes here too.",
            extra_json_schema={"maxProperties": ADOPTED_MAX_HEADERS},
        ),
    ] = msgspec.field(default_factory=lambda: {"eventType": "type"})


class OutboxTable(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """An existing outbox table the relay adopts instead of installing its own (Debezium's layout by
    default). Provision adds what the write-free read needs to it, online (docs/delivery.md)."""

    name: Annotated[Ident, Meta(description="The table's name.")]
    schema: Annotated[Ident, Meta(description="The table's schema.")] = "public"
    columns: OutboxColumns = msgspec.field(default_factory=OutboxColumns)


class Database(Resource, kw_only=True, forbid_unknown_fields=True):
    """A tenant PostgreSQL database holding an outbox table."""

    dsn: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=2048,
            description="postgresql://user@host:port/dbname?sslmode=... without the password; "
            "put the password in `password`. Query parameters allowed: sslmode, sslnegotiation, "
            "ssl_min_protocol_version, target_session_attrs, application_name.",
            examples=["postgresql://app@db.example.com:5432/orders"],
        ),
    ]
    password: Secret = UNSET
    schema: Annotated[str, Meta(pattern=IDENT_PATTERN, description="Schema holding the outbox table.")] = "outbox_relay"
    table: Annotated[
        OutboxTable | None,
        Meta(
            description="Adopt an existing outbox table (Debezium's layout by default) instead of installing the "
            "relay's own: provision adds a transaction id, a sequence number and an insert time column, an index "
            "and an insert trigger to it, and a view `outbox` and `outbox_meta` in `schema`. Null: the relay's own.",
            examples=[{"name": "outbox", "schema": "public"}],
        ),
    ] = None
    password_set: ReadOnlyFlag = UNSET
    rotation: ReadOnlyRotation = UNSET


# --- targets ---------------------------------------------------------------------------------------


class TargetBase(Resource, tag_field="kind", kw_only=True, forbid_unknown_fields=True):
    password: Secret = UNSET
    password_set: ReadOnlyFlag = UNSET
    rotation: ReadOnlyRotation = UNSET
    timeout_ms: Annotated[int, Meta(ge=100, le=120_000)] = 10_000
    rate_limit_per_s: (
        Annotated[
            float,
            Meta(
                gt=0,
                le=1_000_000,
                description="At most this many messages a second to this target, over all relays that publish "
                "to it (shared out among the live workers). Null: as fast as the target takes them.",
            ),
        ]
        | None
    ) = None
    max_in_flight: (
        Annotated[
            int,
            Meta(
                ge=1,
                le=1024,
                description="At most this many batches in flight to this target per worker. Null: no cap.",
            ),
        ]
        | None
    ) = None


class RabbitMQTarget(TargetBase, tag="rabbitmq", kw_only=True, forbid_unknown_fields=True):
    """RabbitMQ through publisher confirms; the relay's destination is the routing key."""

    url: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=2048,
            description="amqp://user@host:port/vhost without the password. Query parameters allowed: "
            "heartbeat, and no_verify_ssl with amqps://.",
            examples=["amqp://guest@127.0.0.1:5672/"],
        ),
    ]
    exchange: Annotated[str, Meta(max_length=255, description="'' is the default exchange.")] = ""
    mandatory: Annotated[bool, Meta(description="Treat a message no queue is bound for as refused.")] = True


class RedisStreamsTarget(TargetBase, tag="redis_streams", kw_only=True, forbid_unknown_fields=True):
    """Redis Streams through XADD; the relay's destination is the stream key."""

    url: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=2048,
            description="redis://[user@]host:port/db without the password. Query parameters allowed: "
            "none, or ssl_cert_reqs and ssl_check_hostname with rediss://.",
            examples=["redis://127.0.0.1:6379/0"],
        ),
    ]
    maxlen: (
        Annotated[
            int,
            Meta(
                ge=1,
                description="Approximate stream length cap.",
                extra_json_schema={"maximum": MAX_STREAM_MAXLEN},
            ),
        ]
        | None
    ) = None


class KafkaTarget(TargetBase, tag="kafka", kw_only=True, forbid_unknown_fields=True):
    """Kafka through an idempotent producer; the relay's destination is the topic."""

    bootstrap_servers: Annotated[
        list[Annotated[str, Meta(min_length=1, max_length=512, description="host:port, or [IPv6]:port")]],
        Meta(min_length=1, extra_json_schema={"maxItems": MAX_BOOTSTRAP_SERVERS}),
    ]
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    username: Annotated[str, Meta(max_length=256)] | None = None
    acks: Literal["all", 1] = "all"
    enable_idempotence: Annotated[
        bool,
        Meta(description="Idempotent producer (needs a broker that supports InitProducerId)."),
    ] = True
    compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = None


class NatsTarget(TargetBase, tag="nats", kw_only=True, forbid_unknown_fields=True):
    """NATS JetStream through publish acks; the relay's destination is the subject, which a stream
    must capture (a subject no stream captures is a refused message)."""

    servers: Annotated[
        list[
            Annotated[
                str,
                Meta(
                    min_length=1,
                    max_length=512,
                    description="nats://host[:port] or tls://host[:port] (port 4222 by default), without a user, "
                    "password or token: those go in `username` and `password`.",
                ),
            ]
        ],
        Meta(
            min_length=1,
            extra_json_schema={"maxItems": MAX_NATS_SERVERS},
            description="Servers of one cluster, tried in order until one connects.",
            examples=[["nats://127.0.0.1:4222"]],
        ),
    ]
    username: (
        Annotated[
            str,
            Meta(
                min_length=1,
                max_length=256,
                description="With `password`: user and password authentication. Null: `password`, when set, "
                "is a token.",
            ),
        ]
        | None
    ) = None


WEBHOOK_MAX_CONCURRENCY = 256
"""Requests in flight to one webhook target, per worker, at most (``max_concurrent_requests``)."""


class WebhookTarget(TargetBase, tag="webhook", kw_only=True, forbid_unknown_fields=True):
    """An HTTP endpoint: one POST per message, signed the Standard Webhooks way
    (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``); the body is the payload. The
    signing secret goes in the write-only ``password``: ``whsec_<base64>``, or two of them separated
    by a space during a rotation (each request is then signed with both)."""

    url: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=2048,
            description="http:// or https:// URL the messages are POSTed to; no user or password in it. "
            "Redirects are not followed.",
            examples=["https://hooks.example.com/outbox"],
        ),
    ]
    content_type: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=255,
            description="The requests' content-type, unless a message carries a content-type header.",
        ),
    ] = "application/json"
    connect_timeout_ms: Annotated[
        int, Meta(ge=100, le=60_000, description="Opening a connection (TCP and TLS), at most this long.")
    ] = 5_000
    max_concurrent_requests: Annotated[
        int,
        Meta(
            ge=1,
            le=WEBHOOK_MAX_CONCURRENCY,
            description="Requests in flight to the endpoint at once, per worker; one per message key at a time "
            "whatever this is, so each key's messages arrive in order.",
        ),
    ] = 16


Target = RabbitMQTarget | RedisStreamsTarget | KafkaTarget | NatsTarget | WebhookTarget
TARGET_KINDS = ("rabbitmq", "redis_streams", "kafka", "nats", "webhook")


# --- relays ----------------------------------------------------------------------------------------


class RelayPolicy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    batch_size: Annotated[int, Meta(ge=1, le=10_000)] = 100
    poll_interval_ms: Annotated[int, Meta(ge=10, le=600_000)] = 1000
    max_attempts: Annotated[int, Meta(ge=1, le=1000)] = 10
    backoff_base_ms: Annotated[int, Meta(ge=1, le=3_600_000)] = 500
    backoff_max_ms: Annotated[int, Meta(ge=1, le=86_400_000)] = 60_000
    max_payload_bytes: Annotated[int, Meta(ge=1, le=64 * 1024 * 1024)] = 1024 * 1024
    retention_hours: Annotated[
        int,
        Meta(
            ge=1,
            le=24 * 366,
            description="Keep outbox rows at least this long after they were written; daily partitions "
            "older than the longest retention of the database's relays, and passed by every cursor, are dropped.",
        ),
    ] = 168
    on_restore: Annotated[
        Literal["resend", "skip"],
        Meta(
            description="When the tenant database turns out restored or failed over, what to do with the restored "
            "rows whose transaction ids lie above the new server's counter (which the ordinary read would hold back "
            "until the counter caught up): 'resend' publishes them at once, before anything written after the "
            "restore (consumers drop the duplicates by outbox-id); 'skip' never publishes them again. The status "
            "says which, and how many."
        ),
    ] = "resend"


# --- relay filters ---------------------------------------------------------------------------------
# A small declarative expression, never evaluated as code: compiled once per relay plan into plain
# closures by ``outbox_relay.filters`` (which also checks the bounds below at ``PUT``).

FILTER_MAX_DEPTH = 8
"""Nesting of all/any/not a filter may have (a leaf alone is depth 1)."""
FILTER_MAX_LEAVES = 32
"""Leaves (topic, header, payload tests) in one filter: the work per row is bounded by them."""
FILTER_MAX_VALUES = 64
"""Values in one ``in`` list."""
FILTER_MAX_STRING = 256
"""Characters in a value, a prefix, a header or a payload field name."""

FilterString = Annotated[str, Meta(max_length=FILTER_MAX_STRING)]
FilterName = Annotated[str, Meta(min_length=1, max_length=FILTER_MAX_STRING)]
FilterScalar = FilterString | int | float | bool | None
"""A JSON scalar: a header test takes strings only; a payload test any scalar."""


class TopicTest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Exactly one of ``eq``, ``in``, ``prefix``; case-sensitive."""

    eq: FilterString | UnsetType = UNSET
    in_: Annotated[list[FilterString], Meta(min_length=1, max_length=FILTER_MAX_VALUES)] | UnsetType = msgspec.field(
        default=UNSET, name="in"
    )
    prefix: FilterString | UnsetType = UNSET


class Filter(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One node of a relay filter: exactly one of ``all``, ``any``, ``not`` (combinators), ``topic``,
    ``header``, ``payload`` (leaves). A ``header`` or ``payload`` leaf takes exactly one of ``eq``,
    ``in``, ``exists``. ``payload`` names a top-level field of a JSON-object payload: a payload that
    is not a JSON object (not JSON, an array, a scalar) matches no payload leaf."""

    all: Annotated[list[Filter], Meta(min_length=1, max_length=FILTER_MAX_LEAVES)] | UnsetType = UNSET
    any: Annotated[list[Filter], Meta(min_length=1, max_length=FILTER_MAX_LEAVES)] | UnsetType = UNSET
    not_: Filter | UnsetType = msgspec.field(default=UNSET, name="not")
    topic: TopicTest | UnsetType = UNSET
    header: FilterName | UnsetType = UNSET
    payload: FilterName | UnsetType = UNSET
    eq: FilterScalar | UnsetType = UNSET
    in_: Annotated[list[FilterScalar], Meta(min_length=1, max_length=FILTER_MAX_VALUES)] | UnsetType = msgspec.field(
        default=UNSET, name="in"
    )
    exists: bool | UnsetType = UNSET


class CloudEventsOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Publish every message as a CloudEvent in binary content mode: the payload stays the body and
    the event's attributes go where the broker's CloudEvents binding puts them (Kafka: ``ce_``
    headers and ``content-type``; RabbitMQ: ``ce-`` headers and the content-type property; HTTP:
    ``ce-`` headers and Content-Type; Redis Streams, which has no binding: ``h:ce-`` fields)."""

    source: (
        Annotated[
            str,
            Meta(
                min_length=1,
                max_length=512,
                pattern=r"^[^\s]+$",
                description="`ce-source`, a URI-reference. Null: `/relays/{relay name}`.",
                examples=["https://orders.example.com/outbox"],
            ),
        ]
        | None
    ) = None
    type_header: (
        Annotated[
            str,
            Meta(
                min_length=1,
                max_length=128,
                description="The outbox header whose value is `ce-type`; a row without it uses its topic. "
                "Null: always the topic.",
                examples=["event-type"],
            ),
        ]
        | None
    ) = None
    data_content_type: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=127,
            pattern=r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+(\s*;.*)?$",
            description="`datacontenttype` of every event: what the payload is.",
        ),
    ] = "application/json"


class Relay(Resource, kw_only=True, forbid_unknown_fields=True):
    """Publishes one database's outbox to one target."""

    database: Name
    target: Name
    topic_mapping: Annotated[
        dict[Annotated[str, Meta(min_length=1, max_length=249)], Destination],
        Meta(
            description="Outbox topic -> destination. '*' matches any topic; '{topic}' in a "
            "destination is replaced by the outbox topic. Topics that match nothing are skipped.",
            examples=[{"*": "{topic}"}, {"orders": "orders-events"}],
        ),
    ] = msgspec.field(default_factory=lambda: {"*": "{topic}"})
    partitions: Annotated[int, Meta(ge=1, le=1024, description="Fixed at creation: keys hash onto partitions.")] = 16
    filter: Annotated[
        Filter | None,
        Meta(
            description="Publish only the rows that match (the others move the cursor like unrouted rows, "
            "counted as `filtered` in the status). Null: every routed row. Leaves: "
            "{'topic': {'eq'|'in'|'prefix': ...}}, {'header': name, 'eq'|'in'|'exists': ...}, "
            "{'payload': top-level field, 'eq'|'in'|'exists': ...}; combined with 'all', 'any', 'not'. "
            f"At most {FILTER_MAX_DEPTH} levels, {FILTER_MAX_LEAVES} leaves, {FILTER_MAX_VALUES} values "
            f"per 'in', {FILTER_MAX_STRING} characters per string.",
            examples=[
                {"all": [{"topic": {"prefix": "orders."}}, {"payload": "country", "in": ["DE", "FR"]}]},
                {"not": {"header": "x-test", "exists": True}},
            ],
        ),
    ] = None
    cloudevents: Annotated[
        CloudEventsOptions | None,
        Meta(
            description="Publish each message as a CloudEvent in binary content mode (`ce-id` = the message "
            "id, `ce-source`, `ce-type` = the topic or a header, `ce-time` = when the row was inserted, "
            "`ce-specversion` 1.0), in the target broker's binding. Null: plain messages."
        ),
    ] = None
    policy: RelayPolicy = msgspec.field(default_factory=RelayPolicy)
    enabled: bool = True


def route(mapping: dict[str, str], topic: str) -> str | None:
    """The destination of ``topic`` under a relay's topic mapping, or None to skip it."""
    template = mapping.get(topic, mapping.get("*"))
    if template is None:
        return None
    return template.replace("{topic}", topic)


# --- alerts ----------------------------------------------------------------------------------------


class AlertKind(StrEnum):
    """What an alert is about (an alert channel's ``events``, the alert body's ``event``)."""

    STALL = "stall"
    """The relay's status has had a cause (stalled or failing) for longer than ``stall_after_s``."""
    DEAD_LETTER = "dead_letter"
    """New dead letters of the relay since the last evaluation."""
    RESTORE = "restore"
    """A restore (or failover) of the relay's database was detected."""
    LEASE_LOST = "lease_lost"
    """Workers lost the relay's partitions' leases more often than the service's threshold."""
    QUOTA = "quota"
    """A request of the tenant was refused by one of its quotas."""


AlertKindName = Literal["stall", "dead_letter", "restore", "lease_lost", "quota"]
ALERT_STALL_AFTER_MAX_S = 7 * 24 * 3600
ALERT_PERIOD_MAX_S = 7 * 24 * 3600
ALERT_MAX_RELAYS = 100


class Alert(Resource, kw_only=True, forbid_unknown_fields=True):
    """An alert channel: a webhook the service POSTs an alert to when a relay stalls, a dead letter
    appears, a restore is detected, leases keep being lost or a quota refuses a request; at most one
    alert per relay and event kind per ``period_s``. With a ``password`` (a signing secret,
    ``whsec_...``) each request is signed the Standard Webhooks way, like a webhook target's."""

    url: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=2048,
            description="http:// or https:// URL the alerts are POSTed to; no user or password in it. "
            "Checked by the same network policy as targets. Redirects are not followed.",
            examples=["https://hooks.example.com/outbox-alerts"],
        ),
    ]
    password: Secret = UNSET
    """The signing secret, ``whsec_<base64>``; none: plain unsigned POSTs."""
    password_set: ReadOnlyFlag = UNSET
    events: Annotated[
        list[AlertKindName],
        Meta(
            min_length=1,
            max_length=5,
            description="The events to alert on: stall, dead_letter, restore, lease_lost, quota.",
        ),
    ] = msgspec.field(default_factory=lambda: ["stall", "dead_letter", "restore", "lease_lost", "quota"])
    relays: (
        Annotated[
            list[Name],
            Meta(min_length=1, max_length=ALERT_MAX_RELAYS, description="Only these relays. Null: every relay."),
        ]
        | None
    ) = None
    stall_after_s: Annotated[
        int,
        Meta(
            ge=1,
            le=ALERT_STALL_AFTER_MAX_S,
            description="A relay's stall (a status cause) must last this long before it is alerted on.",
        ),
    ] = 300
    period_s: Annotated[
        int,
        Meta(
            ge=1,
            le=ALERT_PERIOD_MAX_S,
            description="At most one alert per relay and event kind in this many seconds (a flapping relay sends one).",
        ),
    ] = 900
    timeout_ms: Annotated[int, Meta(ge=100, le=60_000)] = 10_000
