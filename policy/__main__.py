"""Policy pack: `pulumi preview --policy-pack policy` enforces policy/rules.py on a real stack."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # The CLI runs this directory as a script; import the shared rules as `policy.rules`.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pulumi_policy import (
    EnforcementLevel,
    Policy,
    PolicyPack,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

from policy.rules import RESOURCE_RULES, STACK_RULES, Res, Rule, StackRule


def _res(resource_type: str, name: str, urn: str, props: Any) -> Res:
    # The engine passes secrets unwrapped, so only the structural half of each rule applies.
    return Res(type=resource_type, name=name, props=dict(props), urn=urn, secrets_visible=False)


def _resource_policy(rule: Rule) -> ResourceValidationPolicy:
    def validate(args: ResourceValidationArgs, report: ReportViolation) -> None:
        for problem in rule(_res(args.resource_type, args.name, args.urn, args.props)):
            report(problem, args.urn)

    return ResourceValidationPolicy(
        name=rule.name,
        description=rule.description,
        validate=validate,
        enforcement_level=EnforcementLevel.MANDATORY,
    )


def _stack_policy(rule: StackRule) -> StackValidationPolicy:
    def validate(args: StackValidationArgs, report: ReportViolation) -> None:
        resources = [_res(r.resource_type, r.name, r.urn, r.props) for r in args.resources]
        for problem in rule(resources):
            report(problem, None)

    return StackValidationPolicy(
        name=rule.name,
        description=rule.description,
        validate=validate,
        enforcement_level=EnforcementLevel.MANDATORY,
    )


def policies() -> list[Policy]:
    out: list[Policy] = [_resource_policy(r) for r in RESOURCE_RULES]
    out += [_stack_policy(r) for r in STACK_RULES]
    return out


if __name__ == "__main__":
    PolicyPack(name="switchyard", enforcement_level=EnforcementLevel.MANDATORY, policies=policies())
