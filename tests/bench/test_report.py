"""``switchyard bench`` writes result.json, result.md and PNG plots, and shows its progress."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import pytest

from app.bench import progress
from app.bench.load import Live
from app.bench.progress import choose, display
from app.cli import main as cli
from tests.bench.conftest import base_url
from tests.support.procs import Proc


def test_bench_writes_json_markdown_and_plots(
    simulators: dict[str, list[Proc]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = cli(
        [
            "bench",
            "--url", base_url(simulators["chat-small"][0]),
            "--rate", "80",
            "--requests", "60",
            "--stream",
            "--prompt-tokens", "lognormal:40:20",
            "--max-tokens", "uniform:4:12",
            "--key", "k1", "--key", "k2",
            "--warmup", "2",
            "--progress", "none",
            "--output-dir", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    doc = json.loads((out / "result.json").read_text())
    assert doc["plan"]["mode"] == "open"
    assert doc["plan"]["workload"]["prompt_tokens"] == "lognormal:40:20"
    assert doc["summary"]["ok"] == 60
    assert sum(row["ok"] for row in doc["timeline"]) == 60
    for part in ("latency_ms", "ttft_ms", "itl_ms"):
        assert set(doc["summary"][part]) >= {"p50", "p90", "p99"}
    md = (out / "result.md").read_text()
    assert "| end-to-end latency |" in md
    assert "| time to first token |" in md
    assert "| k1 | 30 | 30 | 0 |" in md
    for png in ("latency.png", "timeline.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| throughput (req/s) |" in capsys.readouterr().out


def test_bench_exits_non_zero_when_nothing_succeeds(tmp_path: Path) -> None:
    from app.local.procs import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    args = ["bench", "--url", url, "--requests", "3", "--warmup", "0", "--progress", "none"]
    assert cli([*args, "--json"]) == 1


def test_progress_is_rich_on_a_terminal_and_plain_lines_otherwise() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert choose("auto", Tty()) == "rich"
    assert choose("auto", io.StringIO()) == "plain"
    assert display("none", Live()) is None


def test_plain_progress_prints_the_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.01)
    out = io.StringIO()
    live = Live(started=time.perf_counter(), total=10, done=5, ok=4, rate_limited=1)
    show = display("plain", live, out)
    assert show is not None

    async def briefly() -> None:
        task = asyncio.create_task(show())
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(briefly())
    assert "bench:  50.0%  ok 4  429 1  errors 0  dropped 0" in out.getvalue()
