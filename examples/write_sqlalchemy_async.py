"""Write an order (an ORM object) and its outbox message in one SQLAlchemy AsyncSession transaction."""

import asyncio
import os

from sqlalchemy import BigInteger, Identity
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from outbox_relay.client import add

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/shop")


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    state: Mapped[str]


async def main() -> None:
    engine = create_async_engine(DATABASE_URL.replace("postgresql://", "postgresql+asyncpg://"))
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with sessions() as session, session.begin():  # commits at the end of the block
        order = Order(state="paid")
        session.add(order)
        await session.flush()  # the order's id
        message_id = await add(session, "orders", key=str(order.id), payload={"id": order.id, "state": order.state})
    print(f"order {order.id}: outbox message {message_id}")
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
