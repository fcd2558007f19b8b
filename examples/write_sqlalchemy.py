"""Write an order (an ORM object) and its outbox message in one SQLAlchemy Session transaction."""

import os

from sqlalchemy import BigInteger, Identity, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from outbox_relay.client import add

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/shop")


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    state: Mapped[str]


def main() -> None:
    engine = create_engine(DATABASE_URL.replace("postgresql://", "postgresql+psycopg://"))
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():  # commits at the end of the block
        order = Order(state="paid")
        session.add(order)
        session.flush()  # the order's id
        order_id = order.id
        message_id = add(session, "orders", key=str(order_id), payload={"id": order_id, "state": order.state})
    print(f"order {order_id}: outbox message {message_id}")
    engine.dispose()


if __name__ == "__main__":
    main()
