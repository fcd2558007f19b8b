"""The REST API from scripts (``outbox-relay api``), and the small HTTP client it and the Terraform
provider are built on.

    outbox-relay api tenants put acme --display-name "Acme"      (admin key)
    outbox-relay api tenants keys create acme                    (admin key; prints the new key once)
    outbox-relay api databases put shop -d '{"dsn": "postgresql://app@db:5432/shop"}'
    outbox-relay api targets put events -f target.json           (-f - reads standard input)
    outbox-relay api relays list --names
    outbox-relay api relays status shop-events
    outbox-relay api alerts put ops -d '{"url": "https://hooks.example.com/alerts"}'

Every command reads ``OUTBOX_RELAY_ENDPOINT`` (default ``http://127.0.0.1:8080``) and
``OUTBOX_RELAY_API_KEY`` (or ``--endpoint`` / ``--api-key``), prints the JSON the API answers on
standard output, and exits 0 on success, 1 when the API refuses (its problem detail on standard
error), 2 on a usage or connection error. Lists follow ``next_cursor`` to the last page.

Standard library only: the client works without the server's dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from outbox_relay.errors import ApiError as ApiError
from outbox_relay.errors import ApiUnreachable as ApiUnreachable

ENDPOINT_ENV = "OUTBOX_RELAY_ENDPOINT"
API_KEY_ENV = "OUTBOX_RELAY_API_KEY"
DEFAULT_ENDPOINT = "http://127.0.0.1:8080"
RESOURCES = ("databases", "targets", "relays", "alerts")


class ApiClient:
    """A blocking JSON client for the REST API: one method per HTTP verb, errors as :class:`ApiError`.

    ``get`` returns ``None`` on 404 (so callers can tell "gone" from "broken"); ``delete`` treats
    404 like 204 (deletes are idempotent).
    """

    def __init__(self, *, endpoint: str, api_key: str | None, timeout_s: float = 30.0) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must be an http(s) URL, not {endpoint!r}")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.endpoint = endpoint.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    @classmethod
    def from_env(cls, *, endpoint: str | None = None, api_key: str | None = None) -> ApiClient:
        return cls(
            endpoint=endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT,
            api_key=api_key or os.environ.get(API_KEY_ENV) or None,
        )

    def request(self, method: str, path: str, body: Any = None, *, query: dict[str, Any] | None = None) -> Any:
        """Send one request; the decoded JSON answer (``None`` for an empty one)."""
        url = self.endpoint + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise ApiError(exc.code, _problem_detail(exc.read(), exc.reason), method=method, path=path) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiUnreachable(f"{method} {url}: {reason}") from None
        if not raw:
            return None
        ctype = resp.headers.get("Content-Type", "")
        return json.loads(raw) if "json" in ctype else raw.decode()

    def get(self, path: str) -> Any:
        try:
            return self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body)

    def delete(self, path: str) -> None:
        try:
            self.request("DELETE", path)
        except ApiError as exc:
            if exc.status != 404:
                raise

    def list(self, path: str, *, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every item of a paged list, following ``next_cursor``."""
        cursor: str | None = None
        while True:
            page = self.request("GET", path, query={"limit": page_size, "cursor": cursor})
            if isinstance(page, list):  # unpaged lists (API keys)
                yield from page
                return
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return


def _problem_detail(raw: bytes, reason: str) -> str:
    try:
        doc = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace").strip() or str(reason)
    if isinstance(doc, dict) and doc.get("detail"):
        return str(doc["detail"])
    return str(reason)


def quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


# --- the command line ------------------------------------------------------------------------------


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``api`` subcommand to ``outbox-relay``'s subparsers."""
    api = sub.add_parser(
        "api",
        help="tenants, databases, targets, relays and alerts over the REST API (for scripts)",
        description="Tenants, databases, targets, relays and alerts over the REST API, for scripts. Prints JSON; "
        "exits 0 on success, 1 when the API refuses, 2 on usage or connection errors.",
    )
    build_parser(api)
    return api  # type: ignore[no-any-return]


def build_parser(api: argparse.ArgumentParser) -> None:
    api.add_argument("--endpoint", help=f"API base URL (env {ENDPOINT_ENV}, default {DEFAULT_ENDPOINT})")
    api.add_argument("--api-key", help=f"API key: a tenant's, or the admin key for tenants (env {API_KEY_ENV})")
    kinds = api.add_subparsers(dest="resource", required=True, metavar="RESOURCE")

    tenants = kinds.add_parser("tenants", help="tenants (admin key)")
    tverbs = tenants.add_subparsers(dest="verb", required=True, metavar="VERB")
    _list_parser(tverbs)
    tverbs.add_parser("get", help="read one").add_argument("name")
    put = tverbs.add_parser("put", help="create or update")
    put.add_argument("name")
    put.add_argument("--display-name", default=None)
    tverbs.add_parser("delete", help="delete with everything it owns").add_argument("name")
    keys = tverbs.add_parser("keys", help="the tenant's API keys")
    kverbs = keys.add_subparsers(dest="key_verb", required=True, metavar="VERB")
    kverbs.add_parser("list", help="list (no secrets)").add_argument("name")
    create = kverbs.add_parser("create", help="issue a key (printed once)")
    create.add_argument("name")
    create.add_argument("--description", default="")
    create.add_argument("--key-only", action="store_true", help="print only the key")
    revoke = kverbs.add_parser("revoke", help="revoke a key")
    revoke.add_argument("name")
    revoke.add_argument("key_id")

    for resource in RESOURCES:
        kind = kinds.add_parser(resource, help=f"the tenant's {resource}")
        verbs = kind.add_subparsers(dest="verb", required=True, metavar="VERB")
        _list_parser(verbs)
        verbs.add_parser("get", help="read one").add_argument("name")
        put = verbs.add_parser("put", help="create or replace from JSON")
        put.add_argument("name")
        body = put.add_mutually_exclusive_group(required=True)
        body.add_argument("-d", "--data", help="the resource as JSON")
        body.add_argument("-f", "--file", help="a JSON file ('-' for standard input)")
        verbs.add_parser("delete", help="delete (idempotent)").add_argument("name")
        if resource == "databases":
            verbs.add_parser("provision", help="install the outbox into the database").add_argument("name")
            verbs.add_parser("schema-sql", help="print the outbox DDL").add_argument("name")
        if resource == "relays":
            verbs.add_parser("status", help="cursor, lease and errors per partition").add_argument("name")


def _list_parser(verbs: Any) -> None:
    ls = verbs.add_parser("list", help="list all (every page)")
    ls.add_argument("--names", action="store_true", help="print only the names, one a line")


def run(args: argparse.Namespace) -> int:
    """Carry out a parsed ``outbox-relay api ...`` command; the process exit code."""
    try:
        client = ApiClient.from_env(endpoint=args.endpoint, api_key=args.api_key)
    except ValueError as exc:
        print(f"outbox-relay api: {exc}", file=sys.stderr)
        return 2
    try:
        result = _dispatch(client, args)
    except ApiError as exc:
        print(f"outbox-relay api: {exc.status} {exc.detail}", file=sys.stderr)
        return 1
    except ApiUnreachable as exc:
        print(f"outbox-relay api: cannot reach the API: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # unreadable or invalid --file / --data
        print(f"outbox-relay api: {exc}", file=sys.stderr)
        return 2
    if result is _NOTHING:
        return 0
    if isinstance(result, str):
        sys.stdout.write(result if result.endswith("\n") else result + "\n")
    else:
        json.dump(result, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="outbox-relay api", description="The REST API from scripts.")
    build_parser(parser)
    return run(parser.parse_args(argv))


_NOTHING = object()


def _dispatch(client: ApiClient, args: argparse.Namespace) -> Any:
    base = f"/v1/{args.resource}"
    verb = args.verb
    if verb == "list":
        items = list(client.list(base + "/"))
        return "\n".join(i["name"] for i in items) if args.names else items
    path = f"{base}/{quote(args.name)}"
    if verb == "get":
        found = client.get(path)
        if found is None:
            raise ApiError(404, f"{args.resource[:-1]} {args.name!r} not found", method="GET", path=path)
        return found
    if verb == "delete":
        client.delete(path)
        return _NOTHING
    if args.resource == "tenants":
        if verb == "put":
            current = client.get(path)
            body: dict[str, Any] = {}
            if args.display_name is not None:
                body["display_name"] = args.display_name
            elif current is not None:
                body["display_name"] = current["display_name"]
            return client.put(path, body)
        if verb == "keys":
            keys = f"{path}/api-keys"
            if args.key_verb == "list":
                return client.request("GET", keys)
            if args.key_verb == "create":
                new = client.post(keys, {"description": args.description})
                return new["key"] if args.key_only else new
            client.request("DELETE", f"{keys}/{quote(args.key_id)}")
            return _NOTHING
    if verb == "put":
        return client.put(path, _read_body(args))
    if verb == "provision":
        return client.post(f"{path}/provision")
    if verb == "schema-sql":
        return client.request("GET", f"{path}/schema.sql")
    if verb == "status":
        return client.request("GET", f"{path}/status")
    raise ValueError(f"unknown command {verb!r}")  # pragma: no cover - argparse keeps us out


def _read_body(args: argparse.Namespace) -> Any:
    if args.data is not None:
        text, where = args.data, "--data"
    elif args.file == "-":
        text, where = sys.stdin.read(), "standard input"
    else:
        with open(args.file, encoding="utf-8") as f:
            text, where = f.read(), args.file
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{where} is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError(f"{where} must be a JSON object")
    return body


if __name__ == "__main__":
    sys.exit(main())
