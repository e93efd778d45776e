"""Each shared policy rule passes on the program and FAILS on a deliberately broken resource.

A rule that cannot fail guards nothing, so every rule in policy.rules must have a breaker here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from policy.rules import (
    ISVC,
    RESOURCE_RULES,
    STACK_RULES,
    Res,
    Rule,
    Secret,
    reveal,
)
from tests.infra.harness import StackRun

Breaker = tuple[str, Callable[[dict[str, Any]], None]]


def _pod(p: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = p["spec"]["template"]["spec"]
    return pod


def _container(p: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = _pod(p)["containers"][0]
    return container


def _open_ssh(p: dict[str, Any]) -> None:
    p["ingress"].append(
        {"protocol": "tcp", "fromPort": 22, "toPort": 22, "cidrBlocks": ["0.0.0.0/0"]}
    )


def _plain_token(p: dict[str, Any]) -> None:
    p["authToken"] = reveal(p["authToken"])


def _untaint(p: dict[str, Any]) -> None:
    p["taints"] = []


def _root(p: dict[str, Any]) -> None:
    _pod(p)["securityContext"]["runAsNonRoot"] = False
    _container(p)["securityContext"]["runAsNonRoot"] = False


def _no_probe(p: dict[str, Any]) -> None:
    del _container(p)["livenessProbe"]


def _no_limits(p: dict[str, Any]) -> None:
    del _container(p)["resources"]["limits"]


def _writable_root(p: dict[str, Any]) -> None:
    _container(p)["securityContext"]["readOnlyRootFilesystem"] = False


def _no_toleration(p: dict[str, Any]) -> None:
    p["spec"]["predictor"]["tolerations"] = []


def _download_at_start(p: dict[str, Any]) -> None:
    p["spec"]["predictor"]["model"]["storageUri"] = "hf://meta-llama/Llama-3.1-8B-Instruct"


def _plain_env_secret(p: dict[str, Any]) -> None:
    _container(p)["env"].append({"name": "SWITCHYARD_STRIPE_API_KEY", "value": "sk_live_x"})


def _plain_secret_data(p: dict[str, Any]) -> None:
    p["stringData"] = {"SWITCHYARD_ADMIN_TOKEN": "plain"}


def _http_lb(p: dict[str, Any]) -> None:
    p["spec"]["ports"].append({"name": "http", "port": 80, "targetPort": "http"})


def _no_tag(p: dict[str, Any]) -> None:
    p["tags"] = {}


def _mutable_tags(p: dict[str, Any]) -> None:
    p["imageTagMutability"] = "MUTABLE"


def _no_audit(p: dict[str, Any]) -> None:
    p["enabledClusterLogTypes"] = ["api"]


def _unencrypted_efs(p: dict[str, Any]) -> None:
    p["encrypted"] = False


def _shared_name(p: dict[str, Any]) -> None:
    p["replicationGroupId"] = "switchyard"


# rule name -> (resource type to break, how)
BREAKERS: dict[str, list[Breaker]] = {
    "security-group-no-world-ingress": [("aws:ec2/securityGroup:SecurityGroup", _open_ssh)],
    "efs-encrypted-elastic": [("aws:efs/fileSystem:FileSystem", _unencrypted_efs)],
    "redis-encrypted-authenticated": [
        ("aws:elasticache/replicationGroup:ReplicationGroup", _plain_token)
    ],
    "gpu-nodes-tainted": [("aws:eks/nodeGroup:NodeGroup", _untaint)],
    "ecr-scan-immutable": [("aws:ecr/repository:Repository", _mutable_tags)],
    "eks-hardened": [("aws:eks/cluster:Cluster", _no_audit)],
    "physical-names-include-stack": [
        ("aws:elasticache/replicationGroup:ReplicationGroup", _shared_name)
    ],
    "aws-tagged-with-stack": [("aws:ec2/vpc:Vpc", _no_tag)],
    "containers-hardened": [
        ("kubernetes:apps/v1:Deployment", _root),
        ("kubernetes:apps/v1:Deployment", _no_probe),
        ("kubernetes:apps/v1:Deployment", _no_limits),
        ("kubernetes:batch/v1:Job", _writable_root),
    ],
    "inference-service-on-gpu": [(ISVC, _no_toleration), (ISVC, _download_at_start)],
    "load-balancer-tls-only": [("kubernetes:core/v1:Service", _http_lb)],
    "secrets-not-plaintext": [
        ("kubernetes:apps/v1:Deployment", _plain_env_secret),
        ("kubernetes:core/v1:Secret", _plain_secret_data),
    ],
}
CASES = [(name, typ, fn) for name, breakers in BREAKERS.items() for typ, fn in breakers]


def _rule(name: str) -> Rule:
    return next(r for r in RESOURCE_RULES if r.name == name)


def _target(run: StackRun, typ: str) -> Res:
    candidates = run.of_type(typ)
    if typ == "aws:eks/nodeGroup:NodeGroup":
        candidates = [r for r in candidates if "NVIDIA" in reveal(r.props)["amiType"]]
    if typ == "kubernetes:apps/v1:Deployment":
        candidates = [r for r in candidates if reveal(r.props)["metadata"]["name"] == "gateway"]
    if typ == "kubernetes:core/v1:Service":
        candidates = [r for r in candidates if reveal(r.props)["spec"]["type"] == "LoadBalancer"]
    if typ == "aws:ec2/securityGroup:SecurityGroup":
        candidates = [r for r in candidates if r.name.endswith("-efs")]
    assert candidates, typ
    return candidates[0]


def test_every_rule_has_a_breaker() -> None:
    assert set(BREAKERS) == {r.name for r in RESOURCE_RULES}


@pytest.mark.parametrize(
    ("rule_name", "typ", "breaker"), CASES, ids=[f"{c[0]}-{c[2].__name__}" for c in CASES]
)
def test_rule_passes_on_program_and_fails_on_broken_resource(
    staging: StackRun, rule_name: str, typ: str, breaker: Callable[[dict[str, Any]], None]
) -> None:
    rule = _rule(rule_name)
    good = _target(staging, typ)
    assert rule(good) == []
    props = copy.deepcopy(dict(good.props))
    # Break the plain view of secrets too, so the breaker edits real values.
    props = {k: (v if isinstance(v, Secret) else reveal(v)) for k, v in props.items()}
    breaker(props)
    assert rule(replace(good, props=props)) != []


def test_gpu_tolerations_must_match_a_tainted_node_group(staging: StackRun) -> None:
    (rule,) = [r for r in STACK_RULES if r.name == "gpu-tolerations-match-taints"]
    assert rule(staging.resources) == []
    untainted = []
    for r in staging.resources:
        if r.type == "aws:eks/nodeGroup:NodeGroup":
            props = copy.deepcopy(reveal(r.props))
            props["taints"] = []
            r = replace(r, props=props)
        untainted.append(r)
    assert rule(untainted) != []


def test_plaintext_secret_markers_are_only_demanded_where_visible(staging: StackRun) -> None:
    """In a policy pack the engine unwraps secrets: the marker check must not misfire there."""
    (redis,) = staging.of_type("aws:elasticache/replicationGroup:ReplicationGroup")
    unwrapped = replace(redis, props=reveal(redis.props), secrets_visible=False)
    assert _rule("redis-encrypted-authenticated")(unwrapped) == []
    assert _rule("redis-encrypted-authenticated")(replace(unwrapped, secrets_visible=True)) != []
