"""Redis for keys, limits and usage: ElastiCache with TLS, encryption at rest and an auth token."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws
import pulumi_random as random

from infra.config import CacheSettings

REDIS_PORT = 6379


@dataclass
class CacheArgs:
    replication_group_id: str
    """Physical id (<= 40 chars); includes the stack so two stacks never collide."""
    settings: CacheSettings
    vpc_id: pulumi.Input[str]
    private_subnet_ids: list[pulumi.Input[str]]
    client_security_group_id: pulumi.Input[str]
    """Only members of this group (the EKS nodes) may connect."""
    tags: dict[str, str]


class Cache(pulumi.ComponentResource):
    endpoint: pulumi.Output[str]
    url: pulumi.Output[str]
    """rediss://:token@host:6379/0, secret: what the gateway's SWITCHYARD_REDIS_URL takes."""

    def __init__(
        self, name: str, args: CacheArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("switchyard:infra:Cache", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        s = args.settings
        # ElastiCache tokens: 16-128 printable chars without '@', '"' or '/': alphanumerics only.
        token = random.RandomPassword(f"{name}-auth-token", length=64, special=False, opts=child)
        auth_token: pulumi.Output[str] = pulumi.Output.secret(token.result)
        subnets = aws.elasticache.SubnetGroup(
            f"{name}-subnets",
            description="Switchyard Redis: private subnets",
            subnet_ids=args.private_subnet_ids,
            tags=args.tags,
            opts=child,
        )
        sg = aws.ec2.SecurityGroup(
            f"{name}-sg",
            description="Redis from the EKS nodes only",
            vpc_id=args.vpc_id,
            ingress=[
                aws.ec2.SecurityGroupIngressArgs(
                    description="Redis TLS from cluster nodes",
                    protocol="tcp",
                    from_port=REDIS_PORT,
                    to_port=REDIS_PORT,
                    security_groups=[args.client_security_group_id],
                )
            ],
            tags=args.tags,
            opts=child,
        )
        self.group = aws.elasticache.ReplicationGroup(
            f"{name}-redis",
            replication_group_id=args.replication_group_id,
            description="Switchyard API keys, rate limits and usage stream",
            engine="redis",
            engine_version="7.1",
            node_type=s.node_type,
            num_cache_clusters=s.nodes,
            # Failover needs a replica in another AZ; a single staging node has neither.
            automatic_failover_enabled=s.multi_az,
            multi_az_enabled=s.multi_az,
            port=REDIS_PORT,
            subnet_group_name=subnets.name,
            security_group_ids=[sg.id],
            transit_encryption_enabled=True,
            transit_encryption_mode="required",
            at_rest_encryption_enabled=True,
            auth_token=auth_token,
            auth_token_update_strategy="ROTATE",  # noqa: S106 - a strategy name, not a token
            snapshot_retention_limit=s.snapshot_retention_days,
            apply_immediately=not s.multi_az,
            tags=args.tags,
            opts=pulumi.ResourceOptions(parent=self, additional_secret_outputs=["authToken"]),
        )
        self.endpoint = self.group.primary_endpoint_address
        self.url = pulumi.Output.secret(
            pulumi.Output.format("rediss://:{0}@{1}:{2}/0", auth_token, self.endpoint, REDIS_PORT)
        )
        self.register_outputs({"endpoint": self.endpoint})
