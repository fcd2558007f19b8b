"""Outbox Relay: shared core of the control plane (``service``) and data plane (``workers``).

This package's ``__init__`` imports nothing heavy so that the tenant-side client
(``outbox_relay.client``) stays importable with only ``msgspec`` installed, and quick to import:
``__version__`` is looked up when asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    __version__: str


def __getattr__(name: str) -> str:
    """``__version__`` from the installed metadata, so ``pyproject.toml`` is the one place it is written
    (importlib.metadata costs tens of milliseconds of imports: only paid by those who ask)."""
    if name == "__version__":
        from importlib.metadata import version

        return version("outbox-relay")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
