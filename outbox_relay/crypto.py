"""Secrets at rest: Fernet (AES-128-CBC + HMAC) with key rotation through MultiFernet.

cryptography's Fernet is used rather than hand-rolled AEAD: authenticated, versioned tokens,
and ``MultiFernet`` decrypts with every configured key while encrypting with the first.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from outbox_relay.errors import ConfigError, OutboxRelayError


class SecretBox:
    def __init__(self, keys: tuple[str, ...]) -> None:
        if not keys:
            raise ConfigError(
                "no secret key: set OUTBOX_RELAY_SECRET_KEYS (generate one with `outbox-relay generate-key`)"
            )
        try:
            self._fernet = MultiFernet([Fernet(k.encode()) for k in keys])
        except ValueError as exc:
            raise ConfigError(f"OUTBOX_RELAY_SECRET_KEYS: {exc}") from None

    def encrypt(self, plaintext: str) -> bytes:
        return self._fernet.encrypt(plaintext.encode())

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(bytes(token)).decode()
        except InvalidToken:
            raise OutboxRelayError("stored secret cannot be decrypted with the configured keys") from None


def generate_key() -> str:
    return Fernet.generate_key().decode()
