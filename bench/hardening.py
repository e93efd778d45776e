"""Run the hardening suite (tests/hardening/, whatever test files it holds) and write its
results table: bench/results/hardening.json and bench/results/hardening.md.

Each test's outcome and duration come from pytest's JUnit XML; the numbers a test wants in
the table come from ``record_property(name, value)`` (value: a number, a string, or a
dict/list of them), e.g. requests sent and their statuses, faults injected, inputs a fuzzer
tried, billed vs served tokens, timing statistics. New tests are picked up without editing
this script.

    .venv/bin/python bench/hardening.py [-k EXPR] [extra pytest options]

Exit status: pytest's (0 when every test passed or was an expected failure).
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.overhead import RESULTS, machine  # noqa: E402

SUITE = "tests/hardening"


def parse_value(raw: str) -> Any:
    """record_property values reach the XML as ``str(value)``: JSON or a Python literal."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(raw)
        except (ValueError, SyntaxError):
            continue
    return raw


def outcome(case: ET.Element) -> str:
    for child in case:
        if child.tag in ("failure", "error"):
            return "failed" if child.tag == "failure" else "error"
        if child.tag == "skipped":
            kind = child.get("type", "")
            return "xfailed" if "xfail" in kind else "skipped"
    if any(p.get("name") == "xpass" for p in case.iter("property")):
        return "xpassed"
    return "passed"


def read_junit(path: Path) -> list[dict[str, Any]]:
    tests = []
    root = ET.parse(path).getroot()  # noqa: S314 (pytest's own output, written just now)
    for case in root.iter("testcase"):
        classname = case.get("classname", "")
        module = classname.split(".")[-1] if classname else "?"
        properties = {
            p.get("name", ""): parse_value(p.get("value", "")) for p in case.iter("property")
        }
        tests.append(
            {
                "file": f"{module}.py",
                "test": case.get("name", ""),
                "outcome": outcome(case),
                "seconds": round(float(case.get("time", "0")), 2),
                "properties": properties,
            }
        )
    return tests


def _fmt(value: Any, nested: bool = False) -> str:
    if isinstance(value, dict):
        text = ", ".join(f"{k}: {_fmt(v, True)}" for k, v in value.items())
        return f"{{{text}}}" if nested else text
    if isinstance(value, list):
        text = "; ".join(_fmt(v, True) for v in value)
        return f"[{text}]" if nested else text
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _tried(tests: list[dict[str, Any]]) -> int:
    """Generated inputs (hypothesis, schemathesis), as the hardening conftest records them."""
    return sum(int(t["properties"].get("inputs_tried", 0)) for t in tests)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Hardening results",
        "",
        f"`{result['command']}` — {result['finished']}, {result['seconds']:.0f} s, "
        f"{result['machine']['cpus']} CPUs, Python {result['machine']['python']}.",
        "",
        "| Test file | Tests | Passed | Failed | Skipped / xfail | Inputs tried | Seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_file: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for test in result["tests"]:
        by_file[test["file"]].append(test)
    for name, tests in sorted(by_file.items()):
        counts = Counter(t["outcome"] for t in tests)
        lines.append(
            f"| `{name}` | {len(tests)} | {counts['passed']} | "
            f"{counts['failed'] + counts['error'] + counts['xpassed']} | "
            f"{counts['skipped'] + counts['xfailed']} | {_tried(tests) or ''} | "
            f"{sum(t['seconds'] for t in tests):.1f} |"
        )
    totals = result["totals"]
    lines += [
        f"| **all** | {sum(totals.values())} | {totals.get('passed', 0)} | "
        f"{totals.get('failed', 0) + totals.get('error', 0) + totals.get('xpassed', 0)} | "
        f"{totals.get('skipped', 0) + totals.get('xfailed', 0)} | {_tried(result['tests'])} | "
        f"{result['seconds']:.1f} |",
        "",
        "## Numbers the tests recorded",
        "",
        "| Test | Outcome | Recorded |",
        "| --- | --- | --- |",
    ]
    for test in result["tests"]:
        recorded = {k: v for k, v in test["properties"].items() if k != "xpass"}
        if recorded:
            numbers = "<br>".join(f"**{k}**: {_fmt(v)}" for k, v in recorded.items())
            lines.append(f"| `{test['file']}::{test['test']}` | {test['outcome']} | {numbers} |")
    not_passed = [t for t in result["tests"] if t["outcome"] not in ("passed", "skipped")]
    if not_passed:
        lines += ["", "## Not passed", ""]
        lines += [f"- `{t['file']}::{t['test']}`: {t['outcome']}" for t in not_passed]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="keyword", help="only tests matching this expression")
    args, extra = parser.parse_known_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            SUITE,
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "junit_family=xunit1",  # the family that carries record_property
            f"--junitxml={junit}",
            *(["-k", args.keyword] if args.keyword else []),
            *extra,
        ]
        status = subprocess.call(command, cwd=REPO)
        if not junit.exists():
            print("hardening: pytest wrote no results", file=sys.stderr)
            return status or 1
        tests = read_junit(junit)
    shown = " ".join([".venv/bin/python bench/hardening.py", *(argv or sys.argv[1:])]).strip()
    result = {
        "command": shown,
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": round(time.monotonic() - started, 1),
        "machine": machine(),
        "pytest_exit_status": status,
        "totals": dict(Counter(t["outcome"] for t in tests)),
        "tests": tests,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hardening.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "hardening.md").write_text(markdown(result))
    print(f"hardening: {result['totals']} -> bench/results/hardening.json, hardening.md")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
