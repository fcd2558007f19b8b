"""Write an order and its outbox messages in one asyncpg transaction."""

import asyncio
import os

import asyncpg

from outbox_relay.client import Message, add, add_many

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/shop")


async def main() -> None:
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS orders (id bigint GENERATED ALWAYS AS IDENTITY, state text)")
        async with conn.transaction():
            order_id = await conn.fetchval("INSERT INTO orders (state) VALUES ('paid') RETURNING id")
            message_id = await add(
                conn, "orders", key=str(order_id), payload={"id": order_id, "state": "paid"}, headers={"source": "shop"}
            )
            # add returns the message id (a UUID): what consumers see as outbox-id and dedupe on;
            # a batch goes in one statement, and its ids come back in order
            more = await add_many(
                conn,
                [
                    Message("invoices", str(order_id), {"order": order_id, "cents": 1299}),
                    Message("emails", None, "Thanks for your order!", {"template": "receipt"}),
                ],
            )
        print(f"order {order_id}: outbox messages {message_id}, {more[0]}, {more[1]}")
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
