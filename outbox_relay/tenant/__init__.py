"""The tenant side: the outbox schema installed into a tenant's own PostgreSQL."""
