from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from tests.helpers import TenantClient, make_tenant


@pytest.fixture
async def tenant(client: AsyncTestClient[Any]) -> TenantClient:
    return await make_tenant(client)
