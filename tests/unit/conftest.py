"""Unit-test fixtures: one stage on a real LMDB in a temporary folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.config import StoreConfig
from sidecar.store import Store


@pytest.fixture
def store_config(tmp_path: Path) -> StoreConfig:
    """A 256 MiB map: enough for a unit test, small enough for many tmp dirs.

    A module that needs another store (a bigger map, no fsync) overrides this
    fixture; ``store`` then opens that one.
    """
    return StoreConfig(data_dir=tmp_path / "data", map_size_bytes=1 << 28)


@pytest.fixture
def store(store_config: StoreConfig) -> Iterator[Store]:
    """An open ``Store`` built from ``store_config``, closed after the test."""
    s = Store(store_config)
    s.open()
    yield s
    s.close()
