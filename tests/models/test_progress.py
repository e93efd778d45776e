"""Progress: a bar redrawn in place on a terminal, a few plain lines in a log."""

from __future__ import annotations

import io

from app.models.progress import Progress


def test_plain_progress_prints_a_line_per_ten_percent_and_no_control_characters() -> None:
    out = io.StringIO()
    p = Progress(total=1000, done=0, stream=out, bar=False)
    for _ in range(100):
        p.add(10)
    p.line("verified model.safetensors")
    p.close()
    lines = out.getvalue().splitlines()
    assert [ln.split()[1] for ln in lines[:-1]] == [f"{n}%" for n in range(10, 101, 10)]
    assert lines[-1] == "verified model.safetensors"
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_bar_redraws_one_line_and_keeps_messages_above_it() -> None:
    out = io.StringIO()
    p = Progress(total=100, done=40, stream=out, bar=True)
    p.add(10)
    p.line("resuming model.safetensors at 40 B")
    p.close()
    text = out.getvalue()
    assert text.count("\n") == 2  # the message, and the final newline after the bar
    assert "\r\x1b[K 50% |" in text and "resuming model.safetensors at 40 B\n" in text
    assert "50 B/100 B" in text
