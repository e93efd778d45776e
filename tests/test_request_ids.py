"""Request ids never repeat: within a process, and across processes (forked ones included)."""

from __future__ import annotations

import multiprocessing
import os
import re

import pytest

from app.request_ids import new_request_id


def test_ids_within_a_process_are_distinct_and_well_formed() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"req_[0-9a-f]{32,}", i) for i in ids)


def _child_ids(queue: multiprocessing.Queue[list[str]]) -> None:
    queue.put([new_request_id() for _ in range(100)])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork with threads (3.12+)
def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    """Without reseeding after fork, parent and child would count from the same state."""
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[list[str]] = ctx.Queue()
    child = ctx.Process(target=_child_ids, args=(queue,))
    child.start()
    theirs = queue.get(timeout=30)
    child.join(30)
    ours = [new_request_id() for _ in range(100)]
    assert not set(theirs) & set(ours)
    assert theirs[0][:24] != ours[0][:24]  # a fresh random prefix
    assert os.getpid() != child.pid
