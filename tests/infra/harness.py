"""Run the real Pulumi program (infra/__main__.py) under mocks and capture what it declares.

Every registered resource is recorded with its inputs exactly as the engine would receive them,
secret markers included (as `policy.rules.Secret`), so tests can apply the shared policy rules
and check that no secret travels in plain text.
"""

from __future__ import annotations

import json
import runpy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import rpc
from pulumi.runtime.config import set_all_config

from policy.rules import Res, Secret

ROOT = Path(__file__).resolve().parents[2]
STACK_FILES = sorted((ROOT / "stacks").glob("Pulumi.*.yaml"))
PROGRAM = ROOT / "infra" / "__main__.py"
PROJECT = "switchyard"

# Values the tests feed as secret config; finding one outside a secret marker is a leak.
SECRET_CONFIG = {
    "switchyard:stripeApiKey": "sk_test_SENTINEL_stripe_4f1c9b",
    "switchyard:adminToken": "SENTINEL-admin-token-8d2e77",
}
RANDOM_PASSWORD = "SENTINELrandompassword0123456789abcdef0123456789abcdef0123456789"
ECR_PASSWORD = "SENTINEL-ecr-registry-token-5a0c"
SENTINELS = (*SECRET_CONFIG.values(), RANDOM_PASSWORD, ECR_PASSWORD)


def stack_name(path: Path) -> str:
    return path.name.removeprefix("Pulumi.").removesuffix(".yaml")


def stack_config(path: Path) -> dict[str, str]:
    """Config as the CLI hands it to a program: every value a string, objects as JSON."""
    data = yaml.safe_load(path.read_text())["config"]
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}


def _to_rule_value(value: Any) -> Any:
    if rpc.is_rpc_secret(value):
        return Secret(_to_rule_value(rpc.unwrap_rpc_secret(value)))
    if isinstance(value, Mapping):
        return {k: _to_rule_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_rule_value(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    if rpc.is_rpc_secret(value):
        return _plain(rpc.unwrap_rpc_secret(value))
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@dataclass
class Registered:
    res: Res
    custom: bool
    parent: str
    dependencies: list[str]
    provider: str
    """Provider reference, "<provider urn>::<id>"; empty for the default provider."""


class _Mocks(pulumi_mocks.Mocks):
    """Plays the cloud: returns the outputs later resources read (ids, ARNs, endpoints)."""

    def new_resource(
        self, args: pulumi_mocks.MockResourceArgs
    ) -> tuple[str | None, dict[str, Any]]:
        state = _plain(args.inputs)
        name, typ = args.name, args.typ
        rid = f"{name}-id"
        state.setdefault("arn", f"arn:aws:mock:us-east-1:123456789012:{name}")
        if typ == "aws:eks/cluster:Cluster":
            state.update(
                endpoint=f"https://{name}.eks.example",
                certificateAuthority={"data": "Y2E="},
                identities=[{"oidcs": [{"issuer": f"https://oidc.eks.example/id/{name}"}]}],
                vpcConfig={**state.get("vpcConfig", {}), "clusterSecurityGroupId": "sg-cluster"},
            )
        elif typ == "aws:ecr/repository:Repository":
            state.update(
                repositoryUrl=f"123456789012.dkr.ecr.us-east-1.amazonaws.com/{state['name']}",
                registryId="123456789012",
            )
        elif typ == "aws:elasticache/replicationGroup:ReplicationGroup":
            state["primaryEndpointAddress"] = f"master.{state['replicationGroupId']}.cache.example"
        elif typ == "random:index/randomPassword:RandomPassword":
            state["result"] = RANDOM_PASSWORD
        elif typ == "docker-build:index:Image":
            state["digest"] = "sha256:" + "ab" * 32
            state["ref"] = f"{name}@sha256:" + "ab" * 32
        elif typ == "kubernetes:core/v1:Service":
            state["status"] = {"loadBalancer": {"ingress": [{"hostname": f"{name}.elb.example"}]}}
        elif typ.startswith("kubernetes:") and isinstance(state.get("metadata"), dict):
            state["metadata"].setdefault("name", name)
        state.setdefault("name", name)
        return rid, state

    def call(self, args: pulumi_mocks.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        if args.token == "aws:index/getAvailabilityZones:getAvailabilityZones":
            names = ["us-east-1a", "us-east-1b", "us-east-1c", "us-east-1d"]
            return {"names": names, "zoneIds": names, "id": "us-east-1"}, []
        if args.token == "aws:ecr/getAuthorizationToken:getAuthorizationToken":
            return {"userName": "AWS", "password": ECR_PASSWORD, "proxyEndpoint": "ecr"}, []
        raise AssertionError(f"unexpected invoke {args.token}: mock it in tests/infra/harness.py")


class _Monitor(pulumi_mocks.MockMonitor):
    """Also records type, parent, dependencies and secret-marked inputs of each resource."""

    def __init__(self, mocks: pulumi_mocks.Mocks) -> None:
        super().__init__(mocks)
        self.registered: list[Registered] = []

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)  # type: ignore[no-untyped-call]
        if request.type != "pulumi:pulumi:Stack":
            inputs = rpc.deserialize_properties(request.object)
            self.registered.append(
                Registered(
                    res=Res(
                        type=request.type,
                        name=request.name,
                        props=_to_rule_value(inputs),
                        urn=response.urn,
                        secrets_visible=True,
                    ),
                    custom=bool(request.custom),
                    parent=request.parent,
                    dependencies=list(request.dependencies),
                    provider=request.provider,
                )
            )
        return response


@dataclass
class StackRun:
    stack: str
    registered: list[Registered]
    outputs: dict[str, Any]
    secret_outputs: set[str] = field(default_factory=set)

    @property
    def resources(self) -> list[Res]:
        return [r.res for r in self.registered]

    def of_type(self, typ: str) -> list[Res]:
        return [r.res for r in self.registered if r.res.type == typ]

    def by_urn(self) -> dict[str, Registered]:
        return {r.res.urn: r for r in self.registered}


def run_program(
    stack: str,
    config: Mapping[str, str],
    secret_keys: Mapping[str, str] | None = None,
) -> StackRun:
    """Run infra/__main__.py for `stack` with `config` (+ secret config) under mocks."""
    secrets = dict(SECRET_CONFIG if secret_keys is None else secret_keys)
    monitor = _Monitor(_Mocks())
    pulumi.runtime.set_mocks(
        monitor.mocks, project=PROJECT, stack=stack, preview=False, monitor=monitor
    )
    set_all_config({**config, **secrets}, list(secrets))
    outputs: dict[str, Any] = {}
    secret_outputs: set[str] = set()

    async def collect() -> None:
        stack_res = pulumi.runtime.settings.get_root_resource()
        assert stack_res is not None
        for key, value in getattr(stack_res, "outputs", {}).items():
            out = pulumi.Output.from_input(value)
            outputs[key] = await out.future()
            if await out.is_secret():
                secret_outputs.add(key)

    @pulumi.runtime.test  # type: ignore[untyped-decorator]
    def program() -> pulumi.Output[None]:
        runpy.run_path(str(PROGRAM), run_name="__main__")
        return pulumi.Output.from_input(None)

    program()
    pulumi.runtime.sync_await._sync_await(collect())
    return StackRun(stack, monitor.registered, outputs, secret_outputs)
