"""The policy pack wires every shared rule, and its validators report on a broken resource."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import yaml
from pulumi_policy import (
    EnforcementLevel,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationPolicy,
)

from policy.rules import RESOURCE_RULES, STACK_RULES, reveal
from tests.infra.harness import ROOT, StackRun

pack = importlib.import_module("policy.__main__")


def _args(resource_type: str, name: str, props: dict[str, object]) -> ResourceValidationArgs:
    return ResourceValidationArgs(
        resource_type=resource_type,
        props=props,
        urn=f"urn:pulumi:staging::switchyard::{resource_type}::{name}",
        name=name,
        opts=None,  # type: ignore[arg-type]
        provider=None,
    )


def test_pack_project_points_at_the_shared_virtualenv() -> None:
    meta = yaml.safe_load((ROOT / "policy" / "PulumiPolicy.yaml").read_text())
    assert meta["runtime"]["name"] == "python"
    assert (ROOT / "policy" / Path(meta["runtime"]["options"]["virtualenv"])).resolve() == (
        ROOT / ".venv"
    )


def test_pack_has_one_mandatory_policy_per_shared_rule() -> None:
    policies = pack.policies()
    names = [p.name for p in policies]
    assert names == [r.name for r in RESOURCE_RULES] + [r.name for r in STACK_RULES]
    assert all(p.enforcement_level == EnforcementLevel.MANDATORY for p in policies)
    assert sum(isinstance(p, StackValidationPolicy) for p in policies) == len(STACK_RULES)


def test_pack_reports_violations_and_stays_quiet_on_compliant_resources(staging: StackRun) -> None:
    (policy,) = [
        p
        for p in pack.policies()
        if isinstance(p, ResourceValidationPolicy) and p.name == "efs-encrypted-elastic"
    ]
    (efs,) = staging.of_type("aws:efs/fileSystem:FileSystem")
    reports: list[str] = []

    def report(message: str, urn: str | None = None) -> None:
        reports.append(message)

    good = reveal(efs.props)
    policy.validate(_args(efs.type, efs.name, good), report)
    assert reports == []
    broken = copy.deepcopy(good)
    broken["encrypted"] = False
    policy.validate(_args(efs.type, efs.name, broken), report)
    assert any("encrypted" in r for r in reports)
