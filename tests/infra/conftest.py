"""Run the Pulumi program once per stack file and share the result across the infra tests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.infra.harness import STACK_FILES, StackRun, run_program, stack_config, stack_name

_RUNS: dict[Path, StackRun] = {}


def get_run(path: Path) -> StackRun:
    """The mocked run of one stack file, computed on first use (the program is deterministic)."""
    if path not in _RUNS:
        _RUNS[path] = run_program(stack_name(path), stack_config(path))
    return _RUNS[path]


@pytest.fixture(params=STACK_FILES, ids=[stack_name(p) for p in STACK_FILES])
def run(request: pytest.FixtureRequest) -> StackRun:
    return get_run(request.param)


@pytest.fixture
def staging() -> StackRun:
    return get_run(Path(__file__).resolve().parents[2] / "stacks" / "Pulumi.staging.yaml")


@pytest.fixture
def prod() -> StackRun:
    return get_run(Path(__file__).resolve().parents[2] / "stacks" / "Pulumi.prod.yaml")


# pulumi_aws deprecates resources we do not use at import time of their module (e.g.
# ec2.EncryptionControl); that is the provider's business, not a defect in our program.
_THIRD_PARTY_DEPRECATIONS = pytest.mark.filterwarnings("ignore::DeprecationWarning:pulumi_aws")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(item.path).resolve().parents:
            item.add_marker(_THIRD_PARTY_DEPRECATIONS)


@pytest.fixture(autouse=True)
def _fresh_loop_state() -> None:
    """Pulumi's runtime takes the thread's current event loop, created on first use. A test
    elsewhere that ran asyncio.run() leaves the thread marked as having had its loop unset,
    after which none is created; put back the state of a fresh process."""
    local = asyncio.get_event_loop_policy()._local  # type: ignore[attr-defined]
    if local._loop is None:
        local._set_called = False
