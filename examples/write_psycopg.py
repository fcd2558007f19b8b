"""Write an order and its outbox message in one psycopg (sync) transaction."""

import os

import psycopg

from outbox_relay.client import add

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/shop")


def main() -> None:
    with psycopg.connect(DATABASE_URL) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS orders (id bigint GENERATED ALWAYS AS IDENTITY, state text)")
        conn.commit()
        with conn.transaction():
            [(order_id,)] = conn.execute("INSERT INTO orders (state) VALUES ('paid') RETURNING id").fetchall()
            message_id = add(conn, "orders", key=str(order_id), payload={"id": order_id, "state": "paid"})
        print(f"order {order_id}: outbox message {message_id}")


if __name__ == "__main__":
    main()
