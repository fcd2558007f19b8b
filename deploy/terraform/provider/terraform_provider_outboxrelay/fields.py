"""Terraform attributes derived from the API's own msgspec structs, and the mapping between a
Terraform state and an API document.

Deriving the schema from ``outbox_relay.domain`` keeps the provider in step with the API: a field
added there (a new relay policy knob, say) becomes an attribute here with its default, without a
change to the provider.

How optional attributes behave (the rule that keeps plans free of drift):

* An optional attribute left out of the configuration is ``null`` in the state and is left out of
  the request, so the server applies its default. Reading back a value equal to that default keeps
  ``null``; any other value is reported, so a change made behind Terraform's back shows up in the
  next plan, and removing an attribute from the configuration restores the default.
* Immutable optional attributes (``partitions``) are optional *and computed* instead: their state
  holds the effective value, so writing the default explicitly never plans a replacement.
* Nested objects (the relay ``policy``) are flattened into top-level attributes named after their
  fields: ``tf`` supports no single-nested blocks or object types.
* A nullable object (the relay ``filter``, a recursive expression; a database's adopted ``table``) is
  a string attribute holding its JSON (write it with ``jsonencode(...)``): read back, a document equal
  to the one in the state (once both are read as the API's type, so the defaults the service fills in
  count as written) keeps the state's text, so formatting, key order and defaults never show as drift.
* Fields the provider does not know (a newer server) are ignored on read and never sent.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
import msgspec.inspect as mi
from tf import types as tft
from tf.schema import Attribute

UNSET_KIND = ""
"""The kind of a resource that is not a tagged union."""

# Filled in by the service, or write-only: the resources declare these themselves (``rotation``, a
# password rotation in progress, is the service's own and no Terraform attribute).
SERVICE_FIELDS = frozenset({"name", "created_at", "updated_at", "password", "password_set", "rotation"})

_MISSING: Any = msgspec.NODEFAULT


@dataclasses.dataclass(frozen=True, kw_only=True)
class Field:
    """One Terraform attribute backed by one field of the API document."""

    name: str
    path: tuple[str, ...]
    """Where the value lives in the API document (``("policy", "batch_size")``)."""
    tf_type: tft.TfType
    required: bool
    defaults: dict[str, Any]
    """The server's default per kind (``UNSET_KIND`` for untagged resources); absent when required."""
    kinds: frozenset[str]
    """The kinds this field belongs to."""
    description: str | None = None
    requires_replace: bool = False
    encode: Callable[[Any], Any] = lambda v: v
    """State value -> API value."""
    decode: Callable[[Any], Any] = lambda v: v
    """API value -> state value."""
    same_as: Callable[[Any, Any], bool] | None = None
    """Whether a state value stands for the (decoded) value read back, although written differently:
    the state keeps its own text then (JSON attributes)."""

    @property
    def computed(self) -> bool:
        return self.requires_replace and not self.required

    def attribute(self) -> Attribute:
        default = tft.Unknown
        if self.computed and len({repr(v) for v in self.defaults.values()}) == 1:
            default = next(iter(self.defaults.values()))
        return Attribute(
            self.name,
            self.tf_type,
            description=self.description,
            required=self.required,
            optional=not self.required,
            computed=self.computed,
            requires_replace=self.requires_replace,
            default=default,
        )


def fields_of(
    structs: dict[str, type[msgspec.Struct]],
    *,
    immutable: Iterable[str] = (),
    descriptions: dict[str, str] | None = None,
) -> list[Field]:
    """The attributes of one resource: the union of the fields of its structs, one struct per kind.

    ``structs`` maps kind -> struct (``{UNSET_KIND: Relay}`` for an untagged resource).
    """
    descriptions = descriptions or {}
    immutable = set(immutable)
    merged: dict[str, Field] = {}
    for kind, struct in structs.items():
        flat = _struct_fields(struct, kind, prefix=())
        names = [f.name for f in flat]
        if clash := {n for n in names if names.count(n) > 1}:
            raise TypeError(f"{struct.__name__}: nested fields clash with top-level ones once flattened: {clash}")
        for field in flat:
            field = dataclasses.replace(
                field,
                requires_replace=field.name in immutable,
                description=descriptions.get(field.name, field.description),
            )
            seen = merged.get(field.name)
            if seen is None:
                merged[field.name] = field
                continue
            if seen.tf_type.tf_type() != field.tf_type.tf_type() or seen.path != field.path:
                raise TypeError(f"field {field.name!r} differs between kinds")
            merged[field.name] = dataclasses.replace(
                seen,
                required=seen.required and field.required,
                defaults={**seen.defaults, **field.defaults},
                kinds=seen.kinds | field.kinds,
            )
    # A field required by some kinds only is optional in the schema; validation checks it per kind.
    out = []
    for field in merged.values():
        all_kinds = set(structs)
        if field.required and field.kinds != all_kinds:
            field = dataclasses.replace(field, required=False)
        out.append(field)
    return out


def required_for(field: Field, kind: str, structs: dict[str, type[msgspec.Struct]]) -> bool:
    struct = structs.get(kind)
    if struct is None or kind not in field.kinds:
        return False
    info = {f.name: f for f in mi.type_info(struct).fields}  # type: ignore[attr-defined]
    top = info.get(field.path[0])
    return bool(top is not None and len(field.path) == 1 and top.required)


def _struct_fields(struct: type[msgspec.Struct], kind: str, prefix: tuple[str, ...]) -> list[Field]:
    info = mi.type_info(struct)
    out: list[Field] = []
    for f in info.fields:  # type: ignore[attr-defined]
        if not prefix and f.name in SERVICE_FIELDS:
            continue
        typ, description = _unwrap(f.type)
        nullable = False
        if isinstance(typ, mi.UnionType):
            members = [t for t in typ.types if not isinstance(t, mi.NoneType)]
            nullable = len(members) < len(typ.types)
            if len(members) != 1:
                raise TypeError(f"{struct.__name__}.{f.name}: unions are not supported")
            typ, inner = _unwrap(members[0])
            description = description or inner
        if isinstance(typ, mi.StructType):
            if nullable:
                out.append(_json_field(f, kind, prefix, description, typ.cls))
                continue
            out.extend(_struct_fields(typ.cls, kind, (*prefix, f.encode_name)))
            continue
        default = f.default if f.default is not _MISSING else _MISSING
        if default is _MISSING and f.default_factory is not _MISSING:
            default = f.default_factory()
        tf_type, encode, decode = _tf_type(typ, f"{struct.__name__}.{f.name}")
        field = Field(
            name=f.name,
            path=(*prefix, f.encode_name),
            tf_type=tf_type,
            required=f.required and not prefix,
            defaults={} if f.required else {kind: decode(default) if default is not None else None},
            kinds=frozenset({kind}),
            description=description,
            encode=encode,
            decode=decode,
        )
        out.append(field)
    return out


def json_text(value: Any) -> str | None:
    """An API document as the state's JSON text (compact, keys sorted: as ``jsonencode`` writes it)."""
    return None if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def json_value(text: Any) -> Any:
    """The state's JSON text as the API document (a text that is not JSON is sent as it is: the API
    refuses it with a message)."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def same_json(state: Any, read_back: Any) -> bool:
    """Whether the state's JSON text is the document read back (compared as canonical text: Python's
    ``True == 1`` must not hide a change)."""
    if not isinstance(state, str) or not isinstance(read_back, str):
        return False
    try:
        return json_text(json.loads(state)) == read_back
    except ValueError:
        return False


def same_document(struct: type[msgspec.Struct]) -> Callable[[Any, Any], bool]:
    """:func:`same_json`, or the same once both are read as ``struct``: the service fills in the
    defaults of a document's left-out fields (an adopted ``table``'s ``schema`` and ``columns``), and
    a configuration that leaves them out is not a change."""

    def same_as(state: Any, read_back: Any) -> bool:
        if same_json(state, read_back):
            return True
        if not isinstance(state, str) or not isinstance(read_back, str):
            return False
        try:  # compared as canonical text again: Python's ``True == 1`` must not hide a change
            ours, theirs = (msgspec.to_builtins(msgspec.json.decode(t, type=struct)) for t in (state, read_back))
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False
        return json_text(ours) == json_text(theirs)

    return same_as


def _json_field(
    f: Any, kind: str, prefix: tuple[str, ...], description: str | None, struct: type[msgspec.Struct]
) -> Field:
    return Field(
        name=f.name,
        path=(*prefix, f.encode_name),
        tf_type=tft.String(),
        required=False,
        defaults={kind: None},
        kinds=frozenset({kind}),
        description=f"JSON (jsonencode): {description}" if description else "JSON (jsonencode).",
        encode=json_value,
        decode=json_text,
        same_as=same_document(struct),
    )


def _unwrap(typ: Any) -> tuple[Any, str | None]:
    description = None
    while isinstance(typ, mi.Metadata):
        description = description or (typ.extra_json_schema or {}).get("description")
        typ = typ.type
    return typ, description


def _ident(v: Any) -> Any:
    return v


def _tf_type(typ: Any, where: str) -> tuple[tft.TfType, Callable[[Any], Any], Callable[[Any], Any]]:
    if isinstance(typ, mi.BoolType):
        return tft.Bool(), _ident, _ident
    if isinstance(typ, (mi.IntType, mi.FloatType)):
        return tft.Number(), _ident, _ident
    if isinstance(typ, mi.StrType):
        return tft.String(), _ident, _ident
    if isinstance(typ, mi.LiteralType):
        if all(isinstance(v, str) for v in typ.values):
            return tft.String(), _ident, _ident
        # Mixed literals (Kafka ``acks``: "all" or 1) travel as strings in Terraform.
        by_text = {str(v): v for v in typ.values}
        return tft.String(), lambda v: by_text.get(v, v), lambda v: None if v is None else str(v)
    if isinstance(typ, mi.ListType):
        item, _, _ = _tf_type(_unwrap(typ.item_type)[0], where)
        return tft.List(item), _ident, _ident
    if isinstance(typ, mi.DictType):
        value, _, _ = _tf_type(_unwrap(typ.value_type)[0], where)
        return tft.Map(value), _ident, _ident
    raise TypeError(f"{where}: no Terraform type for {typ!r}")


# --- state <-> API document ------------------------------------------------------------------------


def to_api(fields: Iterable[Field], state: dict[str, Any], kind: str = UNSET_KIND) -> dict[str, Any]:
    """The request body for ``state``: every known value of the kind's fields; ``null`` ones left out."""
    body: dict[str, Any] = {}
    for field in fields:
        value = state.get(field.name)
        if value is None or value is tft.Unknown or kind not in field.kinds:
            continue
        node = body
        for step in field.path[:-1]:
            node = node.setdefault(step, {})
        node[field.path[-1]] = field.encode(value)
    return body


def from_api(
    fields: Iterable[Field], doc: dict[str, Any], prior: dict[str, Any] | None, kind: str = UNSET_KIND
) -> dict[str, Any]:
    """The state for an API document; ``prior`` (the state or plan it replaces) decides whether a
    value equal to the server's default is reported (it was written) or stays ``null`` (it was not).
    """
    state: dict[str, Any] = {}
    for field in fields:
        present, value = _lookup(doc, field.path)
        value = field.decode(value) if present else None
        before = (prior or {}).get(field.name)
        if field.same_as is not None and field.same_as(before, value):
            value = before
        if (
            not field.required
            and not field.computed
            and before in (None, tft.Unknown)
            and kind in field.defaults
            and same(value, field.defaults[kind])
        ):
            value = None
        state[field.name] = value
    return state


def same(a: Any, b: Any) -> bool:
    """Equal as Terraform sees it (``1 == 1.0``, ``True`` is not ``1``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def _lookup(doc: dict[str, Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    node: Any = doc
    for step in path:
        if not isinstance(node, dict) or step not in node:
            return False, None
        node = node[step]
    return True, node
