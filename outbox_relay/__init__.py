"""Outbox Relay: shared core of the control plane (``service``) and data plane (``workers``).

This package's ``__init__`` imports nothing heavy so that the tenant-side client
(``outbox_relay.client``) stays importable with only ``msgspec`` installed.
"""

__version__ = "0.1.0"
