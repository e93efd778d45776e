"""Stack config -> one frozen, validated `Settings` object, read once by `__main__`.

Every value a stack file may set is checked here, before any resource exists, so a typo fails
`pulumi preview` with a message that lists what is allowed instead of failing half-way through
`pulumi up`. Components receive typed values and never read config themselves.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import pulumi
from pulumi.runtime.config import is_config_secret

from app.catalog import CatalogError, ModelSpec, parse_catalog
from infra.versions import EKS_VERSION

NAMESPACE = "switchyard"


class Tier(StrEnum):
    """What the environment is for; production turns the availability rules on."""

    staging = "staging"
    production = "production"


class CapacityType(StrEnum):
    ON_DEMAND = "ON_DEMAND"
    SPOT = "SPOT"


class ServingMode(StrEnum):
    """Per-model KServe mode: the two cannot be mixed within one InferenceService.

    knative: Serverless mode, `canaryTrafficPercent` rollouts, KPA scaling on in-flight requests.
    standard: RawDeployment + KEDA on `vllm:num_requests_waiting`; canaries split by the gateway.
    """

    knative = "knative"
    standard = "standard"


@dataclass(frozen=True)
class GpuInstance:
    """What an EC2 GPU instance offers; pod requests are sized to fit on one node."""

    gpu_type: str
    gpus: int
    vcpus: int
    memory_gib: int


# Instance types a GPU node group may use. Unknown types are rejected rather than guessed at,
# because a wrong memory figure makes every model pod unschedulable.
GPU_INSTANCES: Mapping[str, GpuInstance] = {
    "g6.xlarge": GpuInstance("nvidia-l4", 1, 4, 16),
    "g6.2xlarge": GpuInstance("nvidia-l4", 1, 8, 32),
    "g6.4xlarge": GpuInstance("nvidia-l4", 1, 16, 64),
    "g6.12xlarge": GpuInstance("nvidia-l4", 4, 48, 192),
    "g5.xlarge": GpuInstance("nvidia-a10g", 1, 4, 16),
    "g5.2xlarge": GpuInstance("nvidia-a10g", 1, 8, 32),
    "g5.12xlarge": GpuInstance("nvidia-a10g", 4, 48, 192),
    "g6e.xlarge": GpuInstance("nvidia-l40s", 1, 4, 32),
    "g6e.12xlarge": GpuInstance("nvidia-l40s", 4, 48, 384),
    "p4d.24xlarge": GpuInstance("nvidia-a100", 8, 96, 1152),
    "p5.48xlarge": GpuInstance("nvidia-h100", 8, 192, 2048),
}


@dataclass(frozen=True)
class NodeScaling:
    min: int
    max: int
    desired: int


@dataclass(frozen=True)
class NetworkSettings:
    cidr: str
    az_count: int
    single_nat_gateway: bool
    """One NAT for all AZs saves money in staging; production keeps one per AZ."""


@dataclass(frozen=True)
class GpuNodeGroup:
    """One EKS node group per GPU type found in the catalogue."""

    gpu_type: str
    instance_type: str
    scaling: NodeScaling
    capacity_type: CapacityType


@dataclass(frozen=True)
class ClusterSettings:
    version: str
    endpoint_public_access: bool
    public_access_cidrs: tuple[str, ...]
    system_instance_types: tuple[str, ...]
    system_scaling: NodeScaling
    gpu_node_groups: tuple[GpuNodeGroup, ...]


@dataclass(frozen=True)
class CacheSettings:
    node_type: str
    nodes: int
    """Primary + replicas; >= 2 gives automatic failover."""
    snapshot_retention_days: int

    @property
    def multi_az(self) -> bool:
        return self.nodes >= 2


@dataclass(frozen=True)
class GatewaySettings:
    hostname: str
    certificate_arn: str
    replicas: int
    max_replicas: int
    allowed_cidrs: tuple[str, ...]
    hosted_zone_id: str | None


@dataclass(frozen=True)
class ImageSettings:
    tag: str
    context_root: str
    """Directory holding images/gateway and images/vllm, relative to the project root."""


@dataclass(frozen=True)
class Model:
    """A catalogue entry plus the infra-only choices derived from it."""

    spec: ModelSpec
    mode: ServingMode


@dataclass(frozen=True)
class Secrets:
    """Only ever Outputs marked secret: they never appear in plain text in state or logs."""

    stripe_api_key: pulumi.Output[str]
    admin_token: pulumi.Output[str]
    hf_token: pulumi.Output[str] | None
    """Optional: only gated Hugging Face models need it."""


@dataclass(frozen=True)
class Settings:
    project: str
    stack: str
    tier: Tier
    network: NetworkSettings
    cluster: ClusterSettings
    cache: CacheSettings
    gateway: GatewaySettings
    images: ImageSettings
    models: tuple[Model, ...]
    catalog: Mapping[str, Any]
    """The validated catalogue as plain data, for the gateway's ConfigMap."""
    prometheus_url: str
    secrets: Secrets

    @property
    def prefix(self) -> str:
        """Prefix of every physical name: two stacks in one account never collide."""
        return f"{self.project}-{self.stack}"


class ConfigError(ValueError):
    """A stack config value is unusable; the message names the key and what is allowed."""


_STACK_RE = re.compile(r"^[a-z][a-z0-9-]{1,18}[a-z0-9]$")
_ARN_CERT_RE = re.compile(r"^arn:aws[a-z-]*:acm:[a-z0-9-]+:\d{12}:certificate/[0-9a-f-]{36}$")
_HOST_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_SECRET_KEYS = ("stripeApiKey", "adminToken")


def _obj(cfg: pulumi.Config, key: str) -> Mapping[str, Any]:
    value = cfg.get_object(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{NAMESPACE}:{key}: expected a mapping, got {type(value).__name__}")
    return value


def _known_keys(where: str, data: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _int(where: str, data: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{where}.{key}: expected an integer in [{lo}, {hi}], got {value!r}")
    return value


def _bool(where: str, data: Mapping[str, Any], key: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{key}: expected true or false, got {value!r}")
    return value


def _choice(where: str, value: Any, allowed: Sequence[str]) -> str:
    names = sorted(str(a) for a in allowed)
    if value not in names:
        raise ConfigError(f"{where}: {value!r} is not one of {names}")
    return str(value)


def _cidrs(where: str, values: Any) -> tuple[str, ...]:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: expected a non-empty list of CIDR blocks")
    for v in values:
        try:
            ipaddress.ip_network(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {v!r} is not a CIDR block like 10.0.0.0/16") from None
    return tuple(values)


def _scaling(where: str, data: Any, default: NodeScaling) -> NodeScaling:
    if data is None:
        return default
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping with min, max, desired")
    _known_keys(where, data, ("min", "max", "desired"))
    lo = _int(where, data, "min", default.min, 0, 1000)
    hi = _int(where, data, "max", default.max, 1, 1000)
    desired = _int(where, data, "desired", max(lo, min(default.desired, hi)), 0, 1000)
    if not lo <= desired <= hi:
        raise ConfigError(f"{where}: need min <= desired <= max, got {lo} <= {desired} <= {hi}")
    return NodeScaling(lo, hi, desired)


def _network(cfg: pulumi.Config, tier: Tier) -> NetworkSettings:
    where = f"{NAMESPACE}:network"
    data = _obj(cfg, "network")
    _known_keys(where, data, ("cidr", "azCount", "singleNatGateway"))
    cidr = data.get("cidr", "10.0.0.0/16")
    try:
        net = ipaddress.ip_network(cidr)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.cidr: {cidr!r} is not a CIDR block") from None
    if net.version != 4 or net.prefixlen > 16:
        raise ConfigError(
            f"{where}.cidr: need an IPv4 /16 or larger (8 subnets of /20), got {cidr}"
        )
    az_count = _int(where, data, "azCount", 3, 2, 3)
    single_nat = _bool(where, data, "singleNatGateway", tier is Tier.staging)
    if tier is Tier.production and (az_count < 3 or single_nat):
        raise ConfigError(f"{where}: production needs azCount 3 and one NAT gateway per AZ")
    return NetworkSettings(cidr=str(net), az_count=az_count, single_nat_gateway=single_nat)


def _models(
    catalog_data: Any, aliases_data: Any = None
) -> tuple[tuple[Model, ...], Mapping[str, Any]]:
    if not isinstance(catalog_data, list) or not catalog_data:
        raise ConfigError(f"{NAMESPACE}:models: expected a non-empty list of catalogue entries")
    if aliases_data is not None and not isinstance(aliases_data, list):
        raise ConfigError(f"{NAMESPACE}:aliases: expected a list of aliases")
    try:
        catalog = parse_catalog(
            {"models": catalog_data, "aliases": aliases_data or []}, where=f"{NAMESPACE}:models"
        )
    except CatalogError as exc:
        raise ConfigError(str(exc)) from None
    models = []
    for spec in catalog.models:
        where = f"{NAMESPACE}:models[{spec.name}]"
        mode = ServingMode(spec.serving_mode)
        if spec.source is None:
            raise ConfigError(f"{where}.source: required in a stack (hf://, s3:// or /dir)")
        if spec.endpoints:
            raise ConfigError(f"{where}.endpoints: set by infra from the InferenceService; remove")
        inst = GPU_INSTANCES.get(spec.gpu.instance_type)
        if inst is None:
            raise ConfigError(
                f"{where}.gpu.instance_type: {spec.gpu.instance_type!r} is not one of "
                f"{sorted(GPU_INSTANCES)}"
            )
        if inst.gpu_type != spec.gpu.type:
            raise ConfigError(
                f"{where}.gpu: {spec.gpu.instance_type} carries {inst.gpu_type}, "
                f"not {spec.gpu.type}"
            )
        if spec.gpu.count > inst.gpus:
            raise ConfigError(
                f"{where}.gpu.count: {spec.gpu.count} > {inst.gpus} GPU(s) "
                f"on {spec.gpu.instance_type}"
            )
        if mode is ServingMode.standard and spec.replicas.min < 1:
            raise ConfigError(f"{where}.replicas.min: standard mode cannot scale to zero; use >= 1")
        models.append(Model(spec=spec, mode=mode))
    data = catalog.model_dump(mode="json", exclude_none=True)
    return tuple(models), data


def _cluster(cfg: pulumi.Config, tier: Tier, models: Sequence[Model]) -> ClusterSettings:
    where = f"{NAMESPACE}:cluster"
    data = _obj(cfg, "cluster")
    _known_keys(
        where,
        data,
        (
            "endpointPublicAccess",
            "publicAccessCidrs",
            "systemInstanceTypes",
            "systemNodes",
            "gpuCapacityType",
            "gpuNodes",
        ),
    )
    public = _bool(where, data, "endpointPublicAccess", True)
    public_cidrs = _cidrs(
        f"{where}.publicAccessCidrs", data.get("publicAccessCidrs", ["0.0.0.0/0"])
    )
    if public and tier is Tier.production and "0.0.0.0/0" in public_cidrs:
        raise ConfigError(f"{where}.publicAccessCidrs: production must restrict the API endpoint")
    system_types = data.get("systemInstanceTypes", ["m6i.large"])
    if not isinstance(system_types, list) or not all(isinstance(t, str) for t in system_types):
        raise ConfigError(f"{where}.systemInstanceTypes: expected a list of EC2 instance types")
    system = _scaling(f"{where}.systemNodes", data.get("systemNodes"), NodeScaling(2, 4, 2))
    capacity = CapacityType(
        _choice(
            f"{where}.gpuCapacityType",
            data.get("gpuCapacityType", "ON_DEMAND"),
            list(CapacityType),
        )
    )
    if tier is Tier.production and capacity is not CapacityType.ON_DEMAND:
        raise ConfigError(f"{where}.gpuCapacityType: production serves from ON_DEMAND capacity")
    gpu_nodes = data.get("gpuNodes") or {}
    if not isinstance(gpu_nodes, Mapping):
        raise ConfigError(f"{where}.gpuNodes: expected a mapping of GPU type -> min/max/desired")
    by_type: dict[str, str] = {}
    for m in models:
        prev = by_type.setdefault(m.spec.gpu.type, m.spec.gpu.instance_type)
        if prev != m.spec.gpu.instance_type:
            raise ConfigError(
                f"{NAMESPACE}:models[{m.spec.name}].gpu.instance_type: GPU type {m.spec.gpu.type} "
                f"already uses {prev}; one node group (one instance type) per GPU type"
            )
    _known_keys(f"{where}.gpuNodes", gpu_nodes, sorted(by_type))
    groups = []
    for gpu_type, instance_type in sorted(by_type.items()):
        # A rollout runs old and new pods side by side, so the default max leaves room for it.
        demand = sum(
            m.spec.replicas.max * m.spec.gpu.count for m in models if m.spec.gpu.type == gpu_type
        )
        per_node = GPU_INSTANCES[instance_type].gpus
        default_max = max(1, -(-2 * demand // per_node))
        scaling = _scaling(
            f"{where}.gpuNodes.{gpu_type}",
            gpu_nodes.get(gpu_type),
            NodeScaling(0, default_max, 1),
        )
        groups.append(GpuNodeGroup(gpu_type, instance_type, scaling, capacity))
    return ClusterSettings(
        version=EKS_VERSION,
        endpoint_public_access=public,
        public_access_cidrs=public_cidrs,
        system_instance_types=tuple(system_types),
        system_scaling=system,
        gpu_node_groups=tuple(groups),
    )


def _cache(cfg: pulumi.Config, tier: Tier) -> CacheSettings:
    where = f"{NAMESPACE}:cache"
    data = _obj(cfg, "cache")
    _known_keys(where, data, ("nodeType", "nodes", "snapshotRetentionDays"))
    node_type = data.get("nodeType", "cache.t4g.small")
    if not isinstance(node_type, str) or not node_type.startswith("cache."):
        raise ConfigError(
            f"{where}.nodeType: expected an ElastiCache node type like cache.r7g.large"
        )
    nodes = _int(where, data, "nodes", 1, 1, 6)
    if tier is Tier.production and nodes < 2:
        raise ConfigError(f"{where}.nodes: production needs >= 2 (multi-AZ automatic failover)")
    retention = _int(where, data, "snapshotRetentionDays", 0, 0, 35)
    return CacheSettings(node_type=node_type, nodes=nodes, snapshot_retention_days=retention)


def _gateway(cfg: pulumi.Config, tier: Tier) -> GatewaySettings:
    where = f"{NAMESPACE}:gateway"
    data = _obj(cfg, "gateway")
    _known_keys(
        where,
        data,
        ("hostname", "certificateArn", "replicas", "maxReplicas", "allowedCidrs", "hostedZoneId"),
    )
    hostname = data.get("hostname")
    if not isinstance(hostname, str) or not _HOST_RE.match(hostname):
        raise ConfigError(f"{where}.hostname: required, a DNS name like api.example.com")
    cert = data.get("certificateArn")
    if not isinstance(cert, str) or not _ARN_CERT_RE.match(cert):
        raise ConfigError(
            f"{where}.certificateArn: required, an ACM certificate ARN "
            "(arn:aws:acm:REGION:ACCOUNT:certificate/UUID) covering the hostname"
        )
    replicas = _int(where, data, "replicas", 2, 1, 100)
    if tier is Tier.production and replicas < 2:
        raise ConfigError(f"{where}.replicas: production needs >= 2 so a node loss is no outage")
    max_replicas = _int(where, data, "maxReplicas", max(replicas, 4), replicas, 200)
    allowed = _cidrs(f"{where}.allowedCidrs", data.get("allowedCidrs", ["0.0.0.0/0"]))
    zone = data.get("hostedZoneId")
    if zone is not None and not (isinstance(zone, str) and re.match(r"^Z[A-Z0-9]{4,32}$", zone)):
        raise ConfigError(f"{where}.hostedZoneId: expected a Route 53 zone id like Z123ABC")
    return GatewaySettings(hostname, cert, replicas, max_replicas, allowed, zone)


def _images(cfg: pulumi.Config) -> ImageSettings:
    where = f"{NAMESPACE}:images"
    data = _obj(cfg, "images")
    _known_keys(where, data, ("tag", "contextRoot"))
    tag = data.get("tag", "0.1.0")
    if not isinstance(tag, str) or not _TAG_RE.match(tag) or tag == "latest":
        raise ConfigError(f"{where}.tag: a fixed image tag (not 'latest'), e.g. a release or SHA")
    return ImageSettings(tag=tag, context_root=str(data.get("contextRoot", "images")))


def _secrets(cfg: pulumi.Config) -> Secrets:
    """Refuse secrets stored in plain text: they would sit in git and in every preview."""
    for key in _SECRET_KEYS:
        full = f"{NAMESPACE}:{key}"
        if cfg.get(key) is None:
            raise ConfigError(f"{full}: required; set it with `pulumi config set --secret {key}`")
        if not is_config_secret(full):
            raise ConfigError(
                f"{full}: stored in plain text; remove it and run "
                f"`pulumi config set --secret {key}`"
            )
    hf_token = None
    if cfg.get("hfToken") is not None:
        if not is_config_secret(f"{NAMESPACE}:hfToken"):
            raise ConfigError(
                f"{NAMESPACE}:hfToken: stored in plain text; "
                "use `pulumi config set --secret hfToken`"
            )
        hf_token = cfg.require_secret("hfToken")
    return Secrets(
        stripe_api_key=cfg.require_secret("stripeApiKey"),
        admin_token=cfg.require_secret("adminToken"),
        hf_token=hf_token,
    )


def load() -> Settings:
    """Read and validate the whole stack config; raise ConfigError on the first bad value."""
    cfg = pulumi.Config(NAMESPACE)
    project, stack = pulumi.get_project(), pulumi.get_stack()
    if not _STACK_RE.match(stack):
        raise ConfigError(
            f"stack name {stack!r}: 3-20 lowercase letters, digits and '-' (it prefixes AWS names)"
        )
    tier = Tier(_choice(f"{NAMESPACE}:tier", cfg.get("tier") or "staging", list(Tier)))
    models, catalog = _models(cfg.get_object("models"), cfg.get_object("aliases"))
    prometheus = cfg.get("prometheusUrl") or "http://prometheus-server.monitoring.svc.cluster.local"
    if not prometheus.startswith(("http://", "https://")):
        raise ConfigError(f"{NAMESPACE}:prometheusUrl: expected an http(s) URL")
    return Settings(
        project=project,
        stack=stack,
        tier=tier,
        network=_network(cfg, tier),
        cluster=_cluster(cfg, tier, models),
        cache=_cache(cfg, tier),
        gateway=_gateway(cfg, tier),
        images=_images(cfg),
        models=models,
        catalog=catalog,
        prometheus_url=prometheus,
        secrets=_secrets(cfg),
    )
