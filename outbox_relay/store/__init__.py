"""Control DB access. The only modules (with ``outbox_relay.tenant.db``) that import asyncpg."""
