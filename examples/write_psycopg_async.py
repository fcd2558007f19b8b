"""Write an order and its outbox message in one psycopg AsyncConnection transaction."""

import asyncio
import os

import psycopg

from outbox_relay.client import add

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/shop")


async def main() -> None:
    async with await psycopg.AsyncConnection.connect(DATABASE_URL) as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS orders (id bigint GENERATED ALWAYS AS IDENTITY, state text)")
        await conn.commit()
        async with conn.transaction():
            cursor = await conn.execute("INSERT INTO orders (state) VALUES ('paid') RETURNING id")
            [(order_id,)] = await cursor.fetchall()
            message_id = await add(conn, "orders", key=str(order_id), payload={"id": order_id, "state": "paid"})
        print(f"order {order_id}: outbox message {message_id}")


if __name__ == "__main__":
    asyncio.run(main())
