"""The provider's resources: one class per API resource, all built on :class:`ApiResource`.

Every resource is addressed by its name (the import id), created with a ``PUT`` that refuses to
adopt an existing object (import it instead), read back on every refresh (``404`` = gone), and
deleted idempotently.

Write-only passwords: the API never returns them, so the state keeps the value from the
configuration and a refresh never plans a change for it. The API's ``password_set`` flag still
catches the one drift that can be seen: a password cleared behind Terraform's back makes the next
plan set it again. A password *changed* behind Terraform's back cannot be seen.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec
from tf import types as tft
from tf.iface import (
    Config,
    CreateContext,
    DeleteContext,
    ImportContext,
    PlanContext,
    ReadContext,
    Resource,
    State,
    UpdateContext,
)
from tf.schema import Attribute, Schema
from tf.utils import Diagnostics

from outbox_relay import domain
from outbox_relay.cli_api import ApiClient, ApiError, ApiUnreachable, quote
from terraform_provider_outboxrelay.fields import UNSET_KIND, Field, fields_of, from_api, required_for, to_api

NAME_DESCRIPTION = (
    "The resource's name: 1-63 lower-case letters, digits, '.', '_' or '-'. Changing it replaces the resource."
)
PASSWORD_DESCRIPTION = (
    "Write-only: sent to the API, encrypted at rest there and never returned; kept in the Terraform state "
    "(mark your state as secret). Removing it clears the stored password."
)


class ApiResource(Resource):  # type: ignore[misc]  # tf ships no type hints
    """A tenant resource served at ``/v1/<collection>/<name>`` with an idempotent ``PUT``."""

    type_name: ClassVar[str]
    """The resource type without the provider prefix (``database``)."""
    collection: ClassVar[str]
    structs: ClassVar[dict[str, type[msgspec.Struct]]]
    """The API struct per kind; ``{UNSET_KIND: Struct}`` unless the resource is a tagged union."""
    fields: ClassVar[list[Field]]
    has_password: ClassVar[bool] = False
    local_attributes: ClassVar[list[Attribute]] = []
    """Attributes of the provider only (never sent); the state keeps the configured value."""
    description: ClassVar[str] = ""

    def __init__(self, provider: Any) -> None:
        self.provider = provider

    # --- schema --------------------------------------------------------------------------------

    @classmethod
    def get_name(cls) -> str:
        return cls.type_name

    @classmethod
    def get_schema(cls) -> Schema:
        attributes = [
            Attribute("name", tft.String(), description=NAME_DESCRIPTION, required=True, requires_replace=True),
            *cls.kind_attributes(),
            *(f.attribute() for f in cls.fields),
            *cls.local_attributes,
            Attribute("created_at", tft.String(), description="When the resource was created.", computed=True),
            Attribute("updated_at", tft.String(), description="When the resource last changed.", computed=True),
        ]
        if cls.has_password:
            attributes += [
                Attribute("password", tft.String(), description=PASSWORD_DESCRIPTION, optional=True, sensitive=True),
                Attribute("password_set", tft.Bool(), description="Whether the API holds a password.", computed=True),
            ]
        return Schema(version=0, attributes=attributes, description=cls.description)

    @classmethod
    def kind_attributes(cls) -> list[Attribute]:
        return []

    # --- hooks for subclasses --------------------------------------------------------------------

    def kind_of(self, state: dict[str, Any]) -> str:
        return UNSET_KIND

    def body(self, state: dict[str, Any]) -> dict[str, Any]:
        return to_api(self.fields, state, self.kind_of(state))

    def after_write(self, diags: Diagnostics, state: dict[str, Any]) -> None:
        """Runs after a successful create or update (provisioning, say)."""

    # --- plumbing --------------------------------------------------------------------------------

    @property
    def client(self) -> ApiClient:
        return client_of(self.provider)

    def path(self, name: str) -> str:
        return f"/v1/{self.collection}/{quote(name)}"

    def state_of(self, doc: dict[str, Any], prior: dict[str, Any] | None) -> dict[str, Any]:
        """The state for an API document, normalised against the state or plan it replaces."""
        prior = prior or {}
        kind = str(doc.get("kind", UNSET_KIND))
        state = {
            "name": doc["name"],
            **{a.name: doc.get(a.name) for a in self.kind_attributes()},
            **from_api(self.fields, doc, prior, kind),
            **{a.name: _known(prior.get(a.name)) for a in self.local_attributes},
            "created_at": doc.get("created_at"),
            "updated_at": doc.get("updated_at"),
        }
        if self.has_password:
            password_set = bool(doc.get("password_set"))
            state["password_set"] = password_set
            state["password"] = _known(prior.get("password")) if password_set else None
        return state

    def _fail(self, diags: Diagnostics, action: str, name: str, exc: Exception) -> None:
        detail = exc.detail if isinstance(exc, ApiError) else str(exc)
        status = f" ({exc.status})" if isinstance(exc, ApiError) else ""
        diags.add_error(f"Could not {action} {self.type_name} {name!r}{status}", detail)

    # --- lifecycle -------------------------------------------------------------------------------

    def create(self, ctx: CreateContext, planned: State) -> State | None:
        name = planned["name"]
        try:
            if self.client.get(self.path(name)) is not None:
                ctx.diagnostics.add_error(
                    f"{self.type_name} {name!r} already exists",
                    f"Terraform does not adopt existing objects; import it instead: terraform import <address> {name}",
                )
                return None
            body = self.body(planned)
            if self.has_password and planned.get("password") is not None:
                body["password"] = planned["password"]
            doc = self.client.put(self.path(name), body)
        except (ApiError, ApiUnreachable) as exc:
            self._fail(ctx.diagnostics, "create", name, exc)
            return None
        state = self.state_of(doc, planned)
        self.after_write(ctx.diagnostics, state)
        return state

    def read(self, ctx: ReadContext, current: State) -> State | None:
        name = current["name"]
        try:
            doc = self.client.get(self.path(name))
        except (ApiError, ApiUnreachable) as exc:
            self._fail(ctx.diagnostics, "read", name, exc)
            return current
        return None if doc is None else self.state_of(doc, current)

    def plan(self, ctx: PlanContext, current: State | None, planned: State) -> State | None:
        if current is None:
            return planned
        if ctx.changed_fields:
            planned["updated_at"] = tft.Unknown
        if self.has_password and "password" in ctx.changed_fields:
            planned["password_set"] = planned.get("password") is not None
        return planned

    def update(self, ctx: UpdateContext, current: State, planned: State) -> State | None:
        name = planned["name"]
        body = self.body(planned)
        if self.has_password and planned.get("password") != current.get("password"):
            body["password"] = planned.get("password")  # None clears it
        try:
            doc = self.client.put(self.path(name), body)
        except (ApiError, ApiUnreachable) as exc:
            self._fail(ctx.diagnostics, "update", name, exc)
            return current
        state = self.state_of(doc, planned)
        self.after_write(ctx.diagnostics, state)
        return state

    def delete(self, ctx: DeleteContext, current: State) -> None:
        try:
            self.client.delete(self.path(current["name"]))
        except (ApiError, ApiUnreachable) as exc:
            self._fail(ctx.diagnostics, "delete", current["name"], exc)

    def import_(self, ctx: ImportContext, id: str) -> State | None:
        try:
            doc = self.client.get(self.path(id))
        except (ApiError, ApiUnreachable) as exc:
            self._fail(ctx.diagnostics, "import", id, exc)
            return None
        if doc is None:
            ctx.diagnostics.add_error(f"{self.type_name} {id!r} does not exist", "Nothing to import.")
            return None
        return self.state_of(doc, None)


def client_of(provider: Any) -> ApiClient:
    client: ApiClient | None = provider.client
    if client is None:
        raise RuntimeError("the provider is not configured")
    return client


def _known(value: Any) -> Any:
    return None if value is tft.Unknown else value


# --- the resources ---------------------------------------------------------------------------------


class DatabaseResource(ApiResource):
    type_name = "database"
    collection = "databases"
    description = "A tenant PostgreSQL database whose outbox table a relay reads."
    structs: ClassVar[dict[str, type[msgspec.Struct]]] = {UNSET_KIND: domain.Database}
    fields = fields_of(
        structs,
        descriptions={
            "dsn": "postgresql://user@host:port/dbname?sslmode=... without the password (put it in `password`).",
            "schema": "Schema holding the outbox table (default `outbox_relay`).",
            "table": "JSON (jsonencode): adopt this existing outbox table instead of installing the relay's own, "
            'e.g. jsonencode({ name = "outbox", schema = "public" }) for Debezium\'s layout; `columns` maps id, '
            "topic, key, payload and headers. `provision` then adds its columns, index and trigger online.",
        },
    )
    has_password = True
    local_attributes: ClassVar[list[Attribute]] = [
        Attribute(
            "provision",
            tft.Bool(),
            description="Install (or upgrade) the outbox table in the database after every create and update.",
            optional=True,
        )
    ]

    def after_write(self, diags: Diagnostics, state: dict[str, Any]) -> None:
        if state.get("provision"):
            try:
                self.client.post(self.path(state["name"]) + "/provision")
            except (ApiError, ApiUnreachable) as exc:
                self._fail(diags, "provision", state["name"], exc)


class TargetResource(ApiResource):
    type_name = "target"
    collection = "targets"
    description = (
        "A broker that relays publish to: RabbitMQ, Redis Streams, Kafka, NATS JetStream or an HTTP webhook "
        "(`kind`). A webhook's `password` is its signing secret (`whsec_...`, or two separated by a space "
        "during a rotation)."
    )
    structs: ClassVar[dict[str, type[msgspec.Struct]]] = {
        "rabbitmq": domain.RabbitMQTarget,
        "redis_streams": domain.RedisStreamsTarget,
        "kafka": domain.KafkaTarget,
        "nats": domain.NatsTarget,
        "webhook": domain.WebhookTarget,
    }
    fields = fields_of(structs)
    has_password = True

    @classmethod
    def kind_attributes(cls) -> list[Attribute]:
        return [
            Attribute(
                "kind",
                tft.String(),
                description="`rabbitmq`, `redis_streams`, `kafka`, `nats` or `webhook`. "
                "Each kind takes its own attributes.",
                required=True,
            )
        ]

    def kind_of(self, state: dict[str, Any]) -> str:
        return str(state.get("kind") or UNSET_KIND)

    def body(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"kind": state["kind"], **super().body(state)}

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        kind = config.get("kind")
        if kind is None or kind is tft.Unknown:
            return
        if kind not in self.structs:
            diags.add_error(f"Unknown target kind {kind!r}", f"Use one of: {', '.join(self.structs)}.", path=["kind"])
            return
        for field in self.fields:
            value = config.get(field.name)
            if value is not None and kind not in field.kinds:
                diags.add_error(
                    f"{field.name} does not apply to {kind} targets",
                    f"It belongs to: {', '.join(sorted(field.kinds))}.",
                    path=[field.name],
                )
            elif value is None and required_for(field, kind, self.structs):
                diags.add_error(f"{kind} targets need {field.name}", "", path=[field.name])


class RelayResource(ApiResource):
    type_name = "relay"
    collection = "relays"
    description = (
        "Publishes one database's outbox to one target. The policy fields (batch_size, max_attempts, ...) "
        "are top-level attributes."
    )
    structs: ClassVar[dict[str, type[msgspec.Struct]]] = {UNSET_KIND: domain.Relay}
    fields = fields_of(
        structs,
        immutable=("database", "partitions"),
        descriptions={
            "database": "The database resource's name. Fixed once the relay exists: changing it replaces the relay.",
            "target": "The target resource's name.",
            "partitions": "How many partitions keys hash onto (default 16). Fixed: changing it replaces the relay.",
            "enabled": "Whether workers relay messages (default true).",
        },
    )


class AlertResource(ApiResource):
    type_name = "alert"
    collection = "alerts"
    description = (
        "An alert channel: a webhook the service POSTs an alert to when a relay stalls longer than "
        "`stall_after_s`, a dead letter appears, a restore is detected, leases keep being lost or a quota "
        "refuses a request; at most one per relay and event per `period_s`. With a `password` (a signing "
        "secret, `whsec_...`) the requests are signed the Standard Webhooks way; without, plain POSTs."
    )
    structs: ClassVar[dict[str, type[msgspec.Struct]]] = {UNSET_KIND: domain.Alert}
    fields = fields_of(structs)
    has_password = True


TENANT_FIELDS = [
    Field(
        name="display_name",
        path=("display_name",),
        tf_type=tft.String(),
        required=False,
        defaults={UNSET_KIND: ""},
        kinds=frozenset({UNSET_KIND}),
        description="A human-readable name.",
    )
]


class TenantResource(ApiResource):
    """Operator-only: the provider's ``api_key`` must be the admin key."""

    type_name = "tenant"
    collection = "tenants"
    description = "A tenant (operators only: configure the provider with the admin API key)."
    structs: ClassVar[dict[str, type[msgspec.Struct]]] = {}
    fields = TENANT_FIELDS


class TenantApiKeyResource(Resource):  # type: ignore[misc]
    """Operator-only: an API key of a tenant. The key is known only to the Terraform run that made it."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return "tenant_api_key"

    @classmethod
    def get_schema(cls) -> Schema:
        return Schema(
            version=0,
            description="An API key for a tenant (operators only). Import id: `<tenant>/<key id>`; "
            "an imported key's secret is unknown.",
            attributes=[
                Attribute(
                    "tenant", tft.String(), description="The tenant's name.", required=True, requires_replace=True
                ),
                Attribute(
                    "description",
                    tft.String(),
                    description="What the key is for.",
                    optional=True,
                    requires_replace=True,
                ),
                Attribute("key_id", tft.String(), description="The key's id.", computed=True),
                Attribute("prefix", tft.String(), description="The key's first characters.", computed=True),
                Attribute("key", tft.String(), description="The key itself.", computed=True, sensitive=True),
                Attribute("created_at", tft.String(), description="When the key was issued.", computed=True),
            ],
        )

    @property
    def client(self) -> ApiClient:
        return client_of(self.provider)

    def _keys_path(self, tenant: str) -> str:
        return f"/v1/tenants/{quote(tenant)}/api-keys"

    def create(self, ctx: CreateContext, planned: State) -> State | None:
        try:
            new = self.client.post(
                self._keys_path(planned["tenant"]), {"description": planned.get("description") or ""}
            )
        except (ApiError, ApiUnreachable) as exc:
            ctx.diagnostics.add_error(f"Could not create an API key for tenant {planned['tenant']!r}", str(exc))
            return None
        return self._state(new, planned["tenant"], planned.get("description"), new["key"])

    def _state(self, doc: dict[str, Any], tenant: str, description: Any, key: Any) -> State:
        if description is None and doc["description"] != "":
            description = doc["description"]
        return {
            "tenant": tenant,
            "description": description,
            "key_id": doc["id"],
            "prefix": doc["prefix"],
            "key": key,
            "created_at": doc["created_at"],
        }

    def _find(self, tenant: str, key_id: str) -> dict[str, Any] | None:
        keys = self.client.get(self._keys_path(tenant))
        return next((k for k in keys or [] if k["id"] == key_id), None)

    def read(self, ctx: ReadContext, current: State) -> State | None:
        try:
            doc = self._find(current["tenant"], current["key_id"])
        except (ApiError, ApiUnreachable) as exc:
            ctx.diagnostics.add_error(f"Could not read API key {current['key_id']}", str(exc))
            return current
        if doc is None:
            return None
        return self._state(doc, current["tenant"], current.get("description"), _known(current.get("key")))

    def update(self, ctx: UpdateContext, current: State, planned: State) -> State | None:
        return planned  # every attribute forces a replacement

    def delete(self, ctx: DeleteContext, current: State) -> None:
        try:
            self.client.delete(f"{self._keys_path(current['tenant'])}/{quote(current['key_id'])}")
        except (ApiError, ApiUnreachable) as exc:
            ctx.diagnostics.add_error(f"Could not revoke API key {current['key_id']}", str(exc))

    def import_(self, ctx: ImportContext, id: str) -> State | None:
        tenant, _, key_id = id.partition("/")
        if not key_id:
            ctx.diagnostics.add_error("Import id must be <tenant>/<key id>", f"got {id!r}")
            return None
        try:
            doc = self._find(tenant, key_id)
        except (ApiError, ApiUnreachable) as exc:
            ctx.diagnostics.add_error(f"Could not import API key {id}", str(exc))
            return None
        if doc is None:
            ctx.diagnostics.add_error(f"API key {id} does not exist", "Nothing to import.")
            return None
        return self._state(doc, tenant, None, None)


RESOURCES: list[type[Resource]] = [
    DatabaseResource,
    TargetResource,
    RelayResource,
    AlertResource,
    TenantResource,
    TenantApiKeyResource,
]
