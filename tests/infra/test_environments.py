"""Staging and prod differ only where their stack files say so, and cannot collide."""

from __future__ import annotations

from typing import Any

from policy.rules import NAMED_TYPES, reveal
from tests.infra.harness import StackRun


def _props(run: StackRun, typ: str) -> list[dict[str, Any]]:
    return [reveal(r.props) for r in run.of_type(typ)]


def _physical_names(run: StackRun) -> set[str]:
    names = set()
    for typ, key in NAMED_TYPES.items():
        names |= {p[key] for p in _props(run, typ)}
    return names


def test_physical_names_cannot_collide_between_stacks(staging: StackRun, prod: StackRun) -> None:
    assert _physical_names(staging)
    assert _physical_names(staging).isdisjoint(_physical_names(prod))
    assert {r.urn for r in staging.resources}.isdisjoint({r.urn for r in prod.resources})


def test_same_components_in_both_stacks(staging: StackRun, prod: StackRun) -> None:
    def components(run: StackRun) -> set[str]:
        return {r.type for r in run.resources if r.type.startswith("switchyard:infra:")}

    assert (
        components(staging)
        == components(prod)
        == {
            f"switchyard:infra:{c}"
            for c in (
                "Network",
                "Cluster",
                "ModelStorage",
                "Cache",
                "Serving",
                "ModelJobs",
                "Gateway",
                "Images",
            )
        }
    )


def test_prod_spans_three_azs_with_a_nat_each_staging_two_with_one(
    staging: StackRun, prod: StackRun
) -> None:
    def azs(run: StackRun) -> int:
        return len(_props(run, "aws:ec2/subnet:Subnet")) // 2

    assert (azs(staging), azs(prod)) == (2, 3)
    assert len(_props(staging, "aws:ec2/natGateway:NatGateway")) == 1
    assert len(_props(prod, "aws:ec2/natGateway:NatGateway")) == 3


def test_gpus_are_spot_in_staging_and_on_demand_in_prod(staging: StackRun, prod: StackRun) -> None:
    def capacity(run: StackRun) -> set[str]:
        return {
            g["capacityType"]
            for g in _props(run, "aws:eks/nodeGroup:NodeGroup")
            if "NVIDIA" in g["amiType"]
        }

    assert capacity(staging) == {"SPOT"}
    assert capacity(prod) == {"ON_DEMAND"}


def test_redis_is_multi_az_with_failover_only_in_prod(staging: StackRun, prod: StackRun) -> None:
    (s,) = _props(staging, "aws:elasticache/replicationGroup:ReplicationGroup")
    (p,) = _props(prod, "aws:elasticache/replicationGroup:ReplicationGroup")
    assert (s["numCacheClusters"], s["multiAzEnabled"], s["automaticFailoverEnabled"]) == (
        1,
        False,
        False,
    )
    assert p["numCacheClusters"] >= 2 and p["multiAzEnabled"] and p["automaticFailoverEnabled"]


def test_prod_gateway_survives_a_node_loss(staging: StackRun, prod: StackRun) -> None:
    def gateway(run: StackRun) -> tuple[int, dict[str, Any]]:
        (dep,) = [
            d
            for d in _props(run, "kubernetes:apps/v1:Deployment")
            if d["metadata"]["name"] == "gateway"
        ]
        (pdb,) = _props(run, "kubernetes:policy/v1:PodDisruptionBudget")
        return dep["spec"]["replicas"], pdb["spec"]

    replicas, pdb = gateway(prod)
    assert replicas >= 2 and pdb.get("minAvailable") == 1
    replicas, pdb = gateway(staging)
    assert replicas == 1 and pdb.get("maxUnavailable") == 1  # a drain must not hang staging


def test_prod_restricts_the_kubernetes_api_endpoint(staging: StackRun, prod: StackRun) -> None:
    (cluster,) = _props(prod, "aws:eks/cluster:Cluster")
    assert "0.0.0.0/0" not in cluster["vpcConfig"]["publicAccessCidrs"]
    (cluster,) = _props(staging, "aws:eks/cluster:Cluster")
    assert cluster["vpcConfig"]["endpointPrivateAccess"] is True


def test_prod_keeps_images_when_the_stack_is_destroyed(staging: StackRun, prod: StackRun) -> None:
    assert {r["forceDelete"] for r in _props(prod, "aws:ecr/repository:Repository")} == {False}
    assert {r["forceDelete"] for r in _props(staging, "aws:ecr/repository:Repository")} == {True}
