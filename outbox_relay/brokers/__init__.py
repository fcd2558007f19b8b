"""Broker adapters behind one seam (:class:`outbox_relay.brokers.base.Publisher`)."""
