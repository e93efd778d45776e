"""Load generation against any OpenAI-compatible URL (``switchyard bench`` and bench/*.py).

One job per module: workload.py (what to send: lengths, keys), load.py (when to send: open
and closed loop), request.py (one request and its timings), stats.py (what was measured),
report.py (JSON, Markdown, PNG), progress.py (live display), command.py (the CLI), and
client.py (the small closed-loop API the older bench scripts use).
"""
