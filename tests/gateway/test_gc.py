"""The gateway process keeps the garbage collector's pauses short and visible."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import catalog_for
from tests.support.platform import start_gateway, write_catalog
from tests.support.procs import Proc


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_gateway_process_freezes_its_start_up_heap_and_times_collections(
    tmp_path: Path, redis_url: str, simulators: dict[str, list[Proc]]
) -> None:
    catalog = write_catalog(tmp_path / "catalog.yaml", catalog_for(simulators))
    gw = start_gateway(tmp_path / "gw.log", redis_url, catalog)
    try:
        seen = samples(gw.url)
        # FastAPI, pydantic, the catalogue: tens of thousands of objects no collection walks.
        assert seen[("switchyard_gc_frozen_objects", ())] > 20_000
        # The start-up collection itself is the first full one timed.
        assert seen[("switchyard_gc_pause_seconds_count", (("generation", "2"),))] >= 1
    finally:
        gw.stop()


def test_gc_freeze_can_be_switched_off(
    tmp_path: Path, redis_url: str, simulators: dict[str, list[Proc]]
) -> None:
    catalog = write_catalog(tmp_path / "catalog.yaml", catalog_for(simulators))
    gw = start_gateway(tmp_path / "gw.log", redis_url, catalog, SWITCHYARD_GC_FREEZE="false")
    try:
        assert samples(gw.url)[("switchyard_gc_frozen_objects", ())] == 0
    finally:
        gw.stop()
