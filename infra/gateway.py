"""The gateway and billing worker: hardened Deployments behind a TLS Network Load Balancer."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s
import yaml

from infra.workloads import APP_UID, SCRATCH, container_security, labels, pod_security, system_pool

GATEWAY_PORT = 8000
BILLING_HEALTH_PORT = 9000
CATALOG_DIR = "/etc/switchyard"
CATALOG_PATH = f"{CATALOG_DIR}/catalog.yaml"
_LB = "service.beta.kubernetes.io/aws-load-balancer"
SECRET_NAME = "switchyard"  # noqa: S105 - the Kubernetes Secret object's name


@dataclass
class GatewayArgs:
    namespace: str
    image: pulumi.Input[str]
    catalog: dict[str, Any]
    """Rendered gateway catalogue (endpoints point at the predictors)."""
    redis_url: pulumi.Output[str]
    stripe_api_key: pulumi.Output[str]
    admin_token: pulumi.Output[str]
    replicas: int
    max_replicas: int
    hostname: str
    certificate_arn: str
    allowed_cidrs: tuple[str, ...]
    vpc_id: pulumi.Input[str]
    vpc_cidr: str
    hosted_zone_id: str | None
    provider: k8s.Provider
    depends_on: list[pulumi.Resource]
    """The load balancer controller must run before the Service asks it for an NLB."""
    tags: dict[str, str]


class Gateway(pulumi.ComponentResource):
    api_url: pulumi.Output[str]
    load_balancer_hostname: pulumi.Output[str]

    def __init__(
        self, name: str, args: GatewayArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("switchyard:infra:Gateway", name, None, opts)
        self._name = name
        self._args = args
        self._k8s = pulumi.ResourceOptions(parent=self, provider=args.provider)
        self.ns = k8s.core.v1.Namespace(
            f"{name}-ns",
            metadata={
                "name": args.namespace,
                "labels": {"pod-security.kubernetes.io/enforce": "restricted"},
            },
            opts=self._k8s,
        )
        catalog_yaml = yaml.safe_dump(args.catalog, sort_keys=False)
        self.catalog = k8s.core.v1.ConfigMap(
            f"{name}-catalog",
            metadata={"name": "catalog", "namespace": self.ns.metadata.name},
            data={"catalog.yaml": catalog_yaml},
            opts=self._k8s,
        )
        self.secret = k8s.core.v1.Secret(
            f"{name}-secrets",
            metadata={"name": SECRET_NAME, "namespace": self.ns.metadata.name},
            type="Opaque",
            string_data={
                "SWITCHYARD_REDIS_URL": pulumi.Output.secret(args.redis_url),
                "SWITCHYARD_STRIPE_API_KEY": pulumi.Output.secret(args.stripe_api_key),
                "SWITCHYARD_ADMIN_TOKEN": pulumi.Output.secret(args.admin_token),
            },
            opts=self._k8s,
        )
        # Pods roll when the catalogue changes: the hash is part of the pod template.
        self._catalog_hash = hashlib.sha256(catalog_yaml.encode()).hexdigest()[:16]
        self._create_gateway()
        self._create_billing()
        self._create_service()
        self.register_outputs(
            {"api_url": self.api_url, "load_balancer_hostname": self.load_balancer_hostname}
        )

    def _env(self) -> list[dict[str, Any]]:
        secret_env = [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": SECRET_NAME, "key": key}}}
            for key in (
                "SWITCHYARD_REDIS_URL",
                "SWITCHYARD_STRIPE_API_KEY",
                "SWITCHYARD_ADMIN_TOKEN",
            )
        ]
        return [{"name": "SWITCHYARD_CATALOG", "value": CATALOG_PATH}, *secret_env]

    def _pod(
        self, component: str, container: dict[str, Any], annotations: dict[str, str]
    ) -> dict[str, Any]:
        return {
            "metadata": {
                "labels": labels(component),
                "annotations": {"switchyard.dev/catalog-sha": self._catalog_hash, **annotations},
            },
            "spec": {
                "automountServiceAccountToken": False,
                "securityContext": pod_security(APP_UID),
                "nodeSelector": system_pool(),
                "terminationGracePeriodSeconds": 60,  # let streams in flight finish
                "topologySpreadConstraints": [
                    {
                        "maxSkew": 1,
                        "topologyKey": "topology.kubernetes.io/zone",
                        "whenUnsatisfiable": "ScheduleAnyway",
                        "labelSelector": {"matchLabels": {"app.kubernetes.io/name": component}},
                    }
                ],
                "containers": [
                    {
                        **container,
                        "image": self._args.image,
                        "env": self._env(),
                        "securityContext": container_security(),
                        "volumeMounts": [
                            {"name": "catalog", "mountPath": CATALOG_DIR, "readOnly": True},
                            {"name": "tmp", "mountPath": SCRATCH},
                        ],
                    }
                ],
                "volumes": [
                    {"name": "catalog", "configMap": {"name": "catalog"}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
                ],
            },
        }

    def _deployment(
        self, component: str, replicas: int, pod: dict[str, Any]
    ) -> k8s.apps.v1.Deployment:
        return k8s.apps.v1.Deployment(
            f"{self._name}-{component}",
            metadata={
                "name": component,
                "namespace": self.ns.metadata.name,
                "labels": labels(component),
            },
            spec={
                "replicas": replicas,
                "selector": {"matchLabels": {"app.kubernetes.io/name": component}},
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
                },
                "template": pod,
            },
            opts=pulumi.ResourceOptions(
                parent=self, provider=self._args.provider, depends_on=[self.secret, self.catalog]
            ),
        )

    def _create_gateway(self) -> None:
        a = self._args
        http = {"port": "http", "scheme": "HTTP"}
        container = {
            "name": "gateway",
            "command": ["switchyard", "gateway"],
            "ports": [{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
            "livenessProbe": {
                "httpGet": {**http, "path": "/healthz"},
                "periodSeconds": 10,
                "failureThreshold": 3,
            },
            "readinessProbe": {
                "httpGet": {**http, "path": "/readyz"},
                "periodSeconds": 5,
                "failureThreshold": 2,
            },
            "resources": {
                "requests": {"cpu": "500m", "memory": "512Mi"},
                "limits": {"cpu": "2", "memory": "1Gi"},
            },
        }
        pod = self._pod(
            "gateway",
            container,
            {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(GATEWAY_PORT),
                "prometheus.io/path": "/metrics",
            },
        )
        self.deployment = self._deployment("gateway", a.replicas, pod)
        selector = {"matchLabels": {"app.kubernetes.io/name": "gateway"}}
        # With one replica (staging) minAvailable=1 would block every node drain.
        budget = {"minAvailable": 1} if a.replicas >= 2 else {"maxUnavailable": 1}
        k8s.policy.v1.PodDisruptionBudget(
            f"{self._name}-gateway",
            metadata={"name": "gateway", "namespace": self.ns.metadata.name},
            spec={"selector": selector, **budget},
            opts=self._k8s,
        )
        k8s.autoscaling.v2.HorizontalPodAutoscaler(
            f"{self._name}-gateway",
            metadata={"name": "gateway", "namespace": self.ns.metadata.name},
            spec={
                "scaleTargetRef": {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": "gateway",
                },
                "minReplicas": a.replicas,
                "maxReplicas": a.max_replicas,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {
                            "name": "cpu",
                            "target": {"type": "Utilization", "averageUtilization": 70},
                        },
                    }
                ],
            },
            opts=pulumi.ResourceOptions(
                parent=self, provider=a.provider, depends_on=[self.deployment]
            ),
        )

    def _create_billing(self) -> None:
        # One worker: the Redis stream's consumer group gives at-least-once delivery and the
        # Stripe identifier makes it exactly-once billing, so a second replica buys nothing.
        health = {"httpGet": {"path": "/healthz", "port": "health"}, "periodSeconds": 15}
        container = {
            "name": "billing",
            "command": ["switchyard", "billing", "run"],
            "ports": [{"name": "health", "containerPort": BILLING_HEALTH_PORT, "protocol": "TCP"}],
            "livenessProbe": {**health, "failureThreshold": 4},
            "readinessProbe": {**health, "failureThreshold": 2},
            "resources": {
                "requests": {"cpu": "100m", "memory": "256Mi"},
                "limits": {"cpu": "1", "memory": "512Mi"},
            },
        }
        pod = self._pod(
            "billing",
            container,
            {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(BILLING_HEALTH_PORT),
                "prometheus.io/path": "/metrics",
            },
        )
        pod["spec"]["containers"][0]["env"].append(
            {"name": "SWITCHYARD_BILLING_HEALTH_PORT", "value": str(BILLING_HEALTH_PORT)}
        )
        self._deployment("billing", 1, pod)

    def _create_service(self) -> None:
        a = self._args
        # The one security group open to the internet, and only on 443 from allowedCidrs.
        lb_sg = aws.ec2.SecurityGroup(
            f"{self._name}-lb",
            description="Switchyard API load balancer: HTTPS from allowed clients",
            vpc_id=a.vpc_id,
            ingress=[
                aws.ec2.SecurityGroupIngressArgs(
                    description="HTTPS API",
                    protocol="tcp",
                    from_port=443,
                    to_port=443,
                    cidr_blocks=list(a.allowed_cidrs),
                )
            ],
            egress=[
                aws.ec2.SecurityGroupEgressArgs(
                    description="to gateway pods",
                    protocol="tcp",
                    from_port=GATEWAY_PORT,
                    to_port=GATEWAY_PORT,
                    cidr_blocks=[a.vpc_cidr],
                )
            ],
            tags=a.tags,
            opts=pulumi.ResourceOptions(parent=self),
        )
        svc = k8s.core.v1.Service(
            f"{self._name}-svc",
            metadata={
                "name": "gateway",
                "namespace": self.ns.metadata.name,
                "annotations": {
                    "service.beta.kubernetes.io/aws-load-balancer-type": "external",
                    "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type": "ip",
                    "service.beta.kubernetes.io/aws-load-balancer-scheme": "internet-facing",
                    "service.beta.kubernetes.io/aws-load-balancer-ssl-cert": a.certificate_arn,
                    "service.beta.kubernetes.io/aws-load-balancer-ssl-ports": "443",
                    "service.beta.kubernetes.io/aws-load-balancer-ssl-negotiation-policy": (
                        "ELBSecurityPolicy-TLS13-1-2-2021-06"
                    ),
                    "service.beta.kubernetes.io/aws-load-balancer-security-groups": lb_sg.id,
                    f"{_LB}-manage-backend-security-group-rules": "true",
                },
            },
            spec={
                "type": "LoadBalancer",
                "selector": {"app.kubernetes.io/name": "gateway"},
                "ports": [{"name": "https", "port": 443, "targetPort": "http", "protocol": "TCP"}],
                "loadBalancerSourceRanges": list(a.allowed_cidrs),
            },
            opts=pulumi.ResourceOptions(
                parent=self, provider=a.provider, depends_on=[*a.depends_on, self.deployment]
            ),
        )
        self.load_balancer_hostname = svc.status.load_balancer.ingress[0].hostname
        if a.hosted_zone_id:
            aws.route53.Record(
                f"{self._name}-dns",
                zone_id=a.hosted_zone_id,
                name=a.hostname,
                type="CNAME",
                ttl=60,
                records=[self.load_balancer_hostname],
                opts=pulumi.ResourceOptions(parent=self),
            )
        self.api_url = pulumi.Output.from_input(f"https://{a.hostname}/v1")
