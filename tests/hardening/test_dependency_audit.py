"""pip-audit on requirements.lock: no locked dependency has a known vulnerability.

The lock pins every dependency and extra (a pip constraints file), so the audit needs neither
pip nor a resolver (``--no-deps --disable-pip``). It asks PyPI's vulnerability data (the
per-release JSON API; PyPA advisories). When that cannot be reached — no network, or a mirror
that only serves packages — a canary release with a well-known advisory comes back clean; then
the test is skipped, saying why, instead of passing on an audit that saw nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import REPO

LOCK = REPO / "requirements.lock"
# A release with a long-published advisory (CVE-2018-18074, PYSEC-2018-28): an audit that
# does not report it is not seeing the vulnerability data.
CANARY = "requests==2.19.1"
# Advisories accepted on purpose, each with its reason (pip-audit --ignore-vuln).
IGNORED: dict[str, str] = {}


def audit(requirements: Path, cache: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "pip_audit",
        "--requirement",
        str(requirements),
        "--no-deps",
        "--disable-pip",
        "--format",
        "json",
        "--progress-spinner",
        "off",
        "--timeout",
        "20",
        "--cache-dir",
        str(cache),
    ]
    for vuln in IGNORED:
        command += ["--ignore-vuln", vuln]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.skip(
            "pip-audit could not query PyPI's vulnerability data "
            f"(exit {done.returncode}): {done.stderr.strip()[-500:]}"
        )
    return report


def vulnerable(report: dict[str, Any]) -> dict[str, list[str]]:
    return {
        f"{dep['name']}=={dep['version']}": [
            f"{v['id']} (fixed in {', '.join(v['fix_versions']) or 'no release yet'})"
            for v in dep["vulns"]
        ]
        for dep in report["dependencies"]
        if dep.get("vulns")
    }


def skipped(report: dict[str, Any]) -> dict[str, str]:
    return {d["name"]: d["skip_reason"] for d in report["dependencies"] if "skip_reason" in d}


@pytest.fixture(scope="module")
def vulnerability_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory for pip-audit, once the vulnerability data has proved reachable."""
    cache = tmp_path_factory.mktemp("pip-audit-cache")
    canary = tmp_path_factory.mktemp("canary") / "requirements.txt"
    canary.write_text(CANARY + "\n")
    report = audit(canary, cache)
    if not vulnerable(report):
        reasons = {dep.get("skip_reason", "no advisory reported") for dep in report["dependencies"]}
        pytest.skip(
            "PyPI's vulnerability data is unreachable from here: the canary "
            f"{CANARY}, which has a published advisory, came back clean ({'; '.join(reasons)})"
        )
    return cache


@pytest.fixture(scope="module")
def lock_report(vulnerability_data: Path) -> dict[str, Any]:
    return audit(LOCK, vulnerability_data)


def test_every_ignored_advisory_says_why() -> None:
    assert all(reason.strip() for reason in IGNORED.values())


def test_an_advisory_in_a_report_is_found() -> None:
    """The reading of pip-audit's JSON report, checked even where PyPI is unreachable."""
    report = {
        "dependencies": [
            {
                "name": "requests",
                "version": "2.19.1",
                "vulns": [{"id": "PYSEC-2018-28", "fix_versions": ["2.20.0"], "aliases": []}],
            },
            {"name": "idna", "version": "3.20", "vulns": []},
            {"name": "private-pkg", "skip_reason": "Dependency not found on PyPI"},
        ],
        "fixes": [],
    }
    assert vulnerable(report) == {"requests==2.19.1": ["PYSEC-2018-28 (fixed in 2.20.0)"]}
    assert skipped(report) == {"private-pkg": "Dependency not found on PyPI"}


def test_no_locked_dependency_has_a_known_vulnerability(lock_report: dict[str, Any]) -> None:
    assert vulnerable(lock_report) == {}


def test_every_locked_dependency_was_audited(lock_report: dict[str, Any]) -> None:
    assert skipped(lock_report) == {}
