"""The ``outboxrelay`` provider: where the API is and which key to use."""

from __future__ import annotations

import os
from typing import Any

from tf import types as tft
from tf.iface import Config, DataSource, Provider, Resource
from tf.schema import Attribute, Schema
from tf.utils import Diagnostics

from outbox_relay.cli_api import API_KEY_ENV, DEFAULT_ENDPOINT, ENDPOINT_ENV, ApiClient
from terraform_provider_outboxrelay import ADDRESS
from terraform_provider_outboxrelay.resources import RESOURCES


class OutboxRelayProvider(Provider):  # type: ignore[misc]  # tf ships no type hints
    """Configured once per Terraform run; resources reach the API through :attr:`client`."""

    def __init__(self) -> None:
        self.client: ApiClient | None = None

    def get_model_prefix(self) -> str:
        return "outboxrelay_"

    def full_name(self) -> str:
        return ADDRESS

    def get_provider_schema(self, diags: Diagnostics) -> Schema:
        return Schema(
            version=0,
            attributes=[
                Attribute(
                    "endpoint",
                    tft.String(),
                    description=f"The API's base URL (env `{ENDPOINT_ENV}`, default `{DEFAULT_ENDPOINT}`).",
                    optional=True,
                ),
                Attribute(
                    "api_key",
                    tft.String(),
                    description=f"A tenant API key, or the admin key for tenants and their keys (env `{API_KEY_ENV}`).",
                    optional=True,
                    sensitive=True,
                ),
                Attribute(
                    "timeout_s",
                    tft.Number(),
                    description="Seconds to wait for each API request (default 30).",
                    optional=True,
                ),
            ],
        )

    def validate_config(self, diags: Diagnostics, config: Config) -> None:
        endpoint = config.get("endpoint")
        if isinstance(endpoint, str) and not endpoint.startswith(("http://", "https://")):
            diags.add_error("endpoint must be an http:// or https:// URL", f"got {endpoint!r}", path=["endpoint"])

    def configure_provider(self, diags: Diagnostics, config: Config) -> None:
        values: dict[str, Any] = {}
        for key in ("endpoint", "api_key", "timeout_s"):
            value = config.get(key)
            if value is tft.Unknown:
                diags.add_error(f"provider {key} must be known before apply", "", path=[key])
                return
            values[key] = value
        endpoint = values["endpoint"] or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT
        api_key = values["api_key"] or os.environ.get(API_KEY_ENV)
        if not api_key:
            diags.add_error("No API key", f"Set the provider's api_key or {API_KEY_ENV}.", path=["api_key"])
            return
        try:
            self.client = ApiClient(endpoint=endpoint, api_key=api_key, timeout_s=values["timeout_s"] or 30.0)
        except ValueError as exc:
            diags.add_error("Invalid provider configuration", str(exc))

    def get_data_sources(self) -> list[type[DataSource]]:
        return []

    def get_resources(self) -> list[type[Resource]]:
        return list(RESOURCES)
