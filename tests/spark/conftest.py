"""One local[2] Spark session for the whole test session, and the synthetic fleet it reads."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from spark_helpers import FLEET_SIZE

pytest.importorskip("pyspark")
pytest.importorskip("sqlglot")




def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # every test in this folder is a Spark test (make spark-test; `make unit` leaves them out); the
    # hook sees the whole session's items, so only this folder's are marked
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.spark)


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from kvscope.analyzer.spark import spark_session

    session = spark_session("local[2]")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kvscope.trace.synth_fleet import build_fleet

    root = tmp_path_factory.mktemp("fleet")
    build_fleet(root, FLEET_SIZE)
    return root
