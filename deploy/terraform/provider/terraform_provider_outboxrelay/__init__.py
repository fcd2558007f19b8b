"""A Terraform provider for Outbox Relay, written with ``tf`` (plugin protocol 6).

Resources: ``outboxrelay_database``, ``outboxrelay_target``, ``outboxrelay_relay``, ``outboxrelay_alert``, and
for operators
``outboxrelay_tenant`` and ``outboxrelay_tenant_api_key``.
"""

HOSTNAME = "registry.terraform.io"
NAMESPACE = "outbox-relay"
TYPE = "outboxrelay"
ADDRESS = f"{HOSTNAME}/{NAMESPACE}/{TYPE}"
VERSION = "0.1.0"
EXECUTABLE = f"terraform-provider-{TYPE}"
