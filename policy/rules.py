"""Production rules for Switchyard stacks, shared by the policy pack and the unit tests.

Each rule reads a resource's engine inputs (camelCase, the wire format that both
`pulumi preview --policy-pack policy` and the test mocks see) and returns violations as
strings; an empty list means compliant. The module is pure Python on purpose: the policy pack
and pytest import it without any Pulumi runtime.

Secret values: under the test mocks inputs keep Pulumi's secret marker (wrapped as `Secret`,
`Res.secrets_visible=True`), so the rules can demand it. The policy engine hands packs secrets
already unwrapped, so there the same rules check only structure (env vars by reference etc.).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

GPU_TAINT_KEY = "nvidia.com/gpu"
GPU_TYPE_LABEL = "switchyard.dev/gpu-type"
PROGRESS_DEADLINE = "serving.knative.dev/progress-deadline"
WORLD = ("0.0.0.0/0", "::/0")
_SECRETISH = re.compile(r"(KEY|TOKEN|PASSWORD|SECRET|CREDENTIAL|REDIS_URL)", re.IGNORECASE)


@dataclass(frozen=True)
class Secret:
    """A value the engine will encrypt (Pulumi secret)."""

    value: Any


@dataclass(frozen=True)
class Res:
    """One resource as a rule sees it."""

    type: str
    name: str
    props: Mapping[str, Any]
    urn: str = ""
    secrets_visible: bool = False

    @property
    def stack(self) -> str:
        """Stack name from the URN (urn:pulumi:STACK::PROJECT::TYPE::NAME)."""
        parts = self.urn.split("::")
        return parts[0].rsplit(":", 1)[-1] if len(parts) > 1 else ""


Check = Callable[[Res], list[str]]
StackCheck = Callable[[Sequence[Res]], list[str]]


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    check: Check
    types: tuple[str, ...] = field(default=())
    """Resource types the rule applies to; empty means all."""

    def __call__(self, res: Res) -> list[str]:
        if self.types and res.type not in self.types:
            return []
        return self.check(res)


@dataclass(frozen=True)
class StackRule:
    name: str
    description: str
    check: StackCheck

    def __call__(self, resources: Sequence[Res]) -> list[str]:
        return self.check(resources)


def reveal(value: Any) -> Any:
    """The value with every Secret marker removed (for structural checks)."""
    if isinstance(value, Secret):
        return reveal(value.value)
    if isinstance(value, Mapping):
        return {k: reveal(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [reveal(v) for v in value]
    return value


def _get(obj: Any, *path: str | int, default: Any = None) -> Any:
    cur = reveal(obj)
    for key in path:
        if isinstance(key, int):
            if not isinstance(cur, list) or len(cur) <= key:
                return default
        elif not isinstance(cur, Mapping) or key not in cur:
            return default
        cur = cur[key]
    return cur


# ---------------------------------------------------------------- AWS


SG_TYPES = (
    "aws:ec2/securityGroup:SecurityGroup",
    "aws:ec2/securityGroupRule:SecurityGroupRule",
    "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule",
)


def _world_ingress(rules: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    for r in rules:
        cidrs = [*(r.get("cidrBlocks") or []), *(r.get("ipv6CidrBlocks") or [])]
        for key in ("cidrIpv4", "cidrIpv6"):
            if r.get(key):
                cidrs.append(r[key])
        if not any(c in WORLD for c in cidrs):
            continue
        port_lo, port_hi = r.get("fromPort"), r.get("toPort")
        proto = str(r.get("protocol") or r.get("ipProtocol") or "")
        if proto in ("tcp", "6") and port_lo == 443 and port_hi == 443:
            continue
        yield f"ingress from the internet on {proto or '?'} {port_lo}-{port_hi} (only tcp 443)"


def sg_no_world_ingress(res: Res) -> list[str]:
    p = reveal(res.props)
    if res.type == "aws:ec2/securityGroup:SecurityGroup":
        rules = p.get("ingress") or []
    elif res.type == "aws:ec2/securityGroupRule:SecurityGroupRule":
        rules = [p] if p.get("type") == "ingress" else []
    else:
        rules = [p]
    return list(_world_ingress(rules))


def efs_encrypted(res: Res) -> list[str]:
    p = reveal(res.props)
    out = []
    if p.get("encrypted") is not True:
        out.append("EFS file system must be encrypted at rest (encrypted: true)")
    if p.get("throughputMode") != "elastic":
        out.append("EFS throughput must be elastic: bursting credits run out during rollouts")
    return out


def redis_encrypted(res: Res) -> list[str]:
    p = res.props
    out = []
    if _get(p, "transitEncryptionEnabled") is not True:
        out.append("ElastiCache must use TLS in transit (transitEncryptionEnabled: true)")
    if _get(p, "atRestEncryptionEnabled") is not True:
        out.append("ElastiCache must encrypt at rest (atRestEncryptionEnabled: true)")
    token = p.get("authToken")
    if not reveal(token):
        out.append("ElastiCache must require an auth token (authToken)")
    elif res.secrets_visible and not isinstance(token, Secret):
        out.append("ElastiCache authToken must be a Pulumi secret")
    return out


def gpu_node_group_tainted(res: Res) -> list[str]:
    p = reveal(res.props)
    is_gpu = "NVIDIA" in str(p.get("amiType", "")) or GPU_TYPE_LABEL in (p.get("labels") or {})
    if not is_gpu:
        return []
    taints = p.get("taints") or []
    if not any(t.get("key") == GPU_TAINT_KEY and t.get("effect") == "NO_SCHEDULE" for t in taints):
        return [f"GPU node group must carry taint {GPU_TAINT_KEY}:NoSchedule"]
    if GPU_TYPE_LABEL not in (p.get("labels") or {}):
        return [f"GPU node group must carry label {GPU_TYPE_LABEL}"]
    return []


def ecr_hardened(res: Res) -> list[str]:
    p = reveal(res.props)
    out = []
    if _get(p, "imageScanningConfiguration", "scanOnPush") is not True:
        out.append("ECR repository must scan on push")
    if p.get("imageTagMutability") != "IMMUTABLE":
        out.append("ECR tags must be immutable so a rollback returns the same image")
    return out


def eks_hardened(res: Res) -> list[str]:
    p = reveal(res.props)
    out = []
    if not re.fullmatch(r"1\.\d+", str(p.get("version", ""))):
        out.append("EKS version must be pinned (e.g. '1.34')")
    if "secrets" not in (_get(p, "encryptionConfig", "resources") or []):
        out.append("EKS must envelope-encrypt Kubernetes secrets with KMS")
    if "audit" not in (p.get("enabledClusterLogTypes") or []):
        out.append("EKS audit logging must be enabled")
    world_api = _get(p, "vpcConfig", "endpointPublicAccess") and "0.0.0.0/0" in (
        _get(p, "vpcConfig", "publicAccessCidrs") or ["0.0.0.0/0"]
    )
    if world_api and _get(p, "tags", "switchyard:tier") == "production":
        out.append("production EKS API endpoint must not be open to 0.0.0.0/0")
    return out


NAMED_TYPES = {
    "aws:eks/cluster:Cluster": "name",
    "aws:elasticache/replicationGroup:ReplicationGroup": "replicationGroupId",
    "aws:ecr/repository:Repository": "name",
}


def physical_name_has_stack(res: Res) -> list[str]:
    """Account-wide names must contain the stack name, or two stacks would fight over them."""
    key = NAMED_TYPES.get(res.type)
    if key is None:
        return []
    value = str(reveal(res.props).get(key) or "")
    if not res.stack or res.stack not in value:
        return [f"{key} {value!r} must contain the stack name {res.stack!r}"]
    return []


TAGGED_TYPES = (
    "aws:ec2/vpc:Vpc",
    "aws:ec2/subnet:Subnet",
    "aws:ec2/securityGroup:SecurityGroup",
    "aws:eks/cluster:Cluster",
    "aws:eks/nodeGroup:NodeGroup",
    "aws:efs/fileSystem:FileSystem",
    "aws:elasticache/replicationGroup:ReplicationGroup",
    "aws:ecr/repository:Repository",
    "aws:kms/key:Key",
    "aws:iam/role:Role",
)


def tagged_with_stack(res: Res) -> list[str]:
    tags = reveal(res.props).get("tags") or {}
    if not tags.get("switchyard:stack"):
        return ["AWS resource must carry the switchyard:stack tag (cost and ownership)"]
    return []


# ---------------------------------------------------------------- Kubernetes


ISVC = "kubernetes:serving.kserve.io/v1beta1:InferenceService"
RUNTIME = "kubernetes:serving.kserve.io/v1alpha1:ServingRuntime"
WORKLOADS = (
    "kubernetes:apps/v1:Deployment",
    "kubernetes:apps/v1:StatefulSet",
    "kubernetes:apps/v1:DaemonSet",
    "kubernetes:batch/v1:Job",
)


def pod_specs(res: Res) -> list[tuple[str, dict[str, Any], list[dict[str, Any]], bool]]:
    """(where, pod-level spec, containers, long_running) for every pod the resource runs."""
    p = reveal(res.props)
    if res.type in WORKLOADS:
        spec = _get(p, "spec", "template", "spec") or {}
        return [("pod", spec, spec.get("containers") or [], res.type != "kubernetes:batch/v1:Job")]
    if res.type == ISVC:
        pred = _get(p, "spec", "predictor") or {}
        containers = [pred["model"]] if "model" in pred else []
        containers += pred.get("containers") or []
        return [("predictor", pred, containers, True)]
    if res.type == RUNTIME:
        spec = p.get("spec") or {}
        # Probes come from the InferenceService that uses the runtime, not the template.
        return [("runtime", spec, spec.get("containers") or [], False)]
    return []


def containers_hardened(res: Res) -> list[str]:
    out = []
    for where, pod, containers, long_running in pod_specs(res):
        pod_nonroot = _get(pod, "securityContext", "runAsNonRoot") is True
        if not containers:
            out.append(f"{where}: no containers")
        for c in containers:
            name = c.get("name", "model")
            sc = c.get("securityContext") or {}
            if not (pod_nonroot or sc.get("runAsNonRoot") is True):
                out.append(f"{where}/{name}: must run as non-root (runAsNonRoot: true)")
            if sc.get("allowPrivilegeEscalation") is not False:
                out.append(f"{where}/{name}: allowPrivilegeEscalation must be false")
            if "ALL" not in (_get(sc, "capabilities", "drop") or []):
                out.append(f"{where}/{name}: must drop ALL capabilities")
            if sc.get("readOnlyRootFilesystem") is not True:
                out.append(f"{where}/{name}: root filesystem must be read-only")
            limits = _get(c, "resources", "limits") or {}
            if not {"cpu", "memory"} <= set(limits):
                out.append(f"{where}/{name}: needs cpu and memory limits")
            if long_running:
                for probe in ("livenessProbe", "readinessProbe"):
                    if not c.get(probe):
                        out.append(f"{where}/{name}: needs a {probe}")
    return out


def tolerates_gpu(pod: Mapping[str, Any]) -> bool:
    return any(
        t.get("key") == GPU_TAINT_KEY
        and t.get("effect") == "NoSchedule"
        and t.get("operator", "Equal") in ("Exists", "Equal")
        for t in pod.get("tolerations") or []
    )


def inference_service_on_gpu(res: Res) -> list[str]:
    p = reveal(res.props)
    pred = _get(p, "spec", "predictor") or {}
    model = pred.get("model") or {}
    annotations = _get(p, "metadata", "annotations") or {}
    out = []
    if not tolerates_gpu(pred):
        out.append(f"predictor must tolerate {GPU_TAINT_KEY}:NoSchedule")
    if not (pred.get("nodeSelector") or {}).get(GPU_TYPE_LABEL):
        out.append(f"predictor must select its GPU type with nodeSelector {GPU_TYPE_LABEL}")
    try:
        gpus = int(str(_get(model, "resources", "limits", "nvidia.com/gpu", default="0")))
    except ValueError:
        gpus = 0
    if gpus < 1:
        out.append("model container must request nvidia.com/gpu in its limits")
    if not str(model.get("storageUri", "")).startswith("pvc://"):
        out.append("model must load from the shared volume (storageUri: pvc://...)")
    mode = annotations.get("serving.kserve.io/deploymentMode", "Serverless")
    if mode in ("Serverless", "Knative") and PROGRESS_DEADLINE not in annotations:
        out.append(f"Knative predictor needs {PROGRESS_DEADLINE} (default 10m is too short)")
    if "canaryTrafficPercent" in pred and mode not in ("Serverless", "Knative"):
        out.append("canaryTrafficPercent only works in Serverless/Knative mode")
    return out


def load_balancer_tls_only(res: Res) -> list[str]:
    p = reveal(res.props)
    if _get(p, "spec", "type") != "LoadBalancer":
        return []
    out = []
    annotations = _get(p, "metadata", "annotations") or {}
    if not annotations.get("service.beta.kubernetes.io/aws-load-balancer-ssl-cert"):
        out.append("public load balancer must terminate TLS (aws-load-balancer-ssl-cert)")
    ports = [port.get("port") for port in _get(p, "spec", "ports") or []]
    if ports != [443]:
        out.append(f"public load balancer must expose only 443, exposes {ports}")
    return out


def _env_entries(res: Res) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for where, _, containers, _ in pod_specs(res):
        for c in containers:
            for e in c.get("env") or []:
                yield f"{where}/{c.get('name', 'model')}", e


def secrets_not_plaintext(res: Res) -> list[str]:
    out = []
    for where, e in _env_entries(res):
        if _SECRETISH.search(str(e.get("name", ""))) and "value" in e:
            out.append(f"{where}: env {e['name']} must come from a Secret (valueFrom)")
    if res.secrets_visible:
        if res.type == "kubernetes:core/v1:Secret":
            for key in ("data", "stringData"):
                values = res.props.get(key) or {}
                if isinstance(values, Secret):
                    continue  # the whole map is secret
                for k, v in values.items():
                    if not isinstance(v, Secret):
                        out.append(f"Secret {key}.{k} must be a Pulumi secret")
        if res.type == "kubernetes:core/v1:ConfigMap":
            for k, v in (reveal(res.props).get("data") or {}).items():
                if re.search(r"(sk_live|sk_test|rediss://:)", str(v)):
                    out.append(f"ConfigMap data.{k} holds a credential")
    return out


RESOURCE_RULES: tuple[Rule, ...] = (
    Rule(
        "security-group-no-world-ingress",
        "No security group admits 0.0.0.0/0 or ::/0 except tcp 443 (the API load balancer).",
        sg_no_world_ingress,
        SG_TYPES,
    ),
    Rule(
        "efs-encrypted-elastic",
        "EFS is encrypted at rest and uses Elastic throughput.",
        efs_encrypted,
        ("aws:efs/fileSystem:FileSystem",),
    ),
    Rule(
        "redis-encrypted-authenticated",
        "ElastiCache uses TLS, encryption at rest and a secret auth token.",
        redis_encrypted,
        ("aws:elasticache/replicationGroup:ReplicationGroup",),
    ),
    Rule(
        "gpu-nodes-tainted",
        "GPU node groups carry the nvidia.com/gpu NoSchedule taint and a GPU type label.",
        gpu_node_group_tainted,
        ("aws:eks/nodeGroup:NodeGroup",),
    ),
    Rule(
        "ecr-scan-immutable",
        "ECR repositories scan on push and have immutable tags.",
        ecr_hardened,
        ("aws:ecr/repository:Repository",),
    ),
    Rule(
        "eks-hardened",
        "EKS is version-pinned, encrypts secrets, logs audit events.",
        eks_hardened,
        ("aws:eks/cluster:Cluster",),
    ),
    Rule(
        "physical-names-include-stack",
        "Account-wide physical names contain the stack name so stacks cannot collide.",
        physical_name_has_stack,
        tuple(NAMED_TYPES),
    ),
    Rule(
        "aws-tagged-with-stack",
        "AWS resources carry the switchyard:stack tag.",
        tagged_with_stack,
        TAGGED_TYPES,
    ),
    Rule(
        "containers-hardened",
        "Containers run non-root, read-only, without privilege escalation, with limits and probes.",
        containers_hardened,
        (*WORKLOADS, ISVC, RUNTIME),
    ),
    Rule(
        "inference-service-on-gpu",
        "Each InferenceService runs on its GPU node group, loads from the shared volume, "
        "and has a progress deadline fit for large models.",
        inference_service_on_gpu,
        (ISVC,),
    ),
    Rule(
        "load-balancer-tls-only",
        "The public load balancer terminates TLS and exposes only 443.",
        load_balancer_tls_only,
        ("kubernetes:core/v1:Service",),
    ),
    Rule(
        "secrets-not-plaintext",
        "Credentials reach pods by Secret reference and are Pulumi secrets in state.",
        secrets_not_plaintext,
        (*WORKLOADS, ISVC, RUNTIME, "kubernetes:core/v1:Secret", "kubernetes:core/v1:ConfigMap"),
    ),
)


def gpu_tolerations_match_taints(resources: Sequence[Res]) -> list[str]:
    """Every GPU type a predictor selects has a node group that is labelled and tainted for it."""
    tainted: set[str] = set()
    for r in resources:
        if r.type == "aws:eks/nodeGroup:NodeGroup" and not gpu_node_group_tainted(r):
            gpu_type = (reveal(r.props).get("labels") or {}).get(GPU_TYPE_LABEL)
            if gpu_type:
                tainted.add(gpu_type)
    out = []
    for r in resources:
        if r.type != ISVC:
            continue
        pred = _get(r.props, "spec", "predictor") or {}
        wanted = (pred.get("nodeSelector") or {}).get(GPU_TYPE_LABEL)
        if wanted not in tainted:
            out.append(f"{r.name}: no tainted GPU node group labelled {GPU_TYPE_LABEL}={wanted}")
    return out


STACK_RULES: tuple[StackRule, ...] = (
    StackRule(
        "gpu-tolerations-match-taints",
        "Each InferenceService's GPU type has a tainted, labelled node group.",
        gpu_tolerations_match_taints,
    ),
)


def violations(resources: Sequence[Res]) -> dict[str, list[str]]:
    """All violations, keyed by '<rule> <resource name>' (or '<rule>' for stack rules)."""
    found: dict[str, list[str]] = {}
    for res in resources:
        for rule in RESOURCE_RULES:
            problems = rule(res)
            if problems:
                found[f"{rule.name} {res.name}"] = problems
    for stack_rule in STACK_RULES:
        problems = stack_rule(resources)
        if problems:
            found[stack_rule.name] = problems
    return found
