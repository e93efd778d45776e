"""EKS: control plane, a CPU system node group, one tainted GPU node group per GPU type, IRSA.

Add-ons that need AWS permissions get them through IRSA roles scoped to one service account,
so the node role stays minimal (nodes can pull images and join, nothing else).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from infra import versions
from infra.config import ClusterSettings, GpuNodeGroup

GPU_TAINT_KEY = "nvidia.com/gpu"
GPU_TYPE_LABEL = "switchyard.dev/gpu-type"
POOL_LABEL = "switchyard.dev/pool"

_AWS_MANAGED = "arn:aws:iam::aws:policy"


def assume_role_policy(service: str) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Service": service},
                    "Action": "sts:AssumeRole",
                }
            ],
        }
    )


@dataclass
class ClusterArgs:
    name: str
    """Physical cluster name; includes the stack so two stacks never collide."""
    settings: ClusterSettings
    vpc_id: pulumi.Input[str]
    private_subnet_ids: list[pulumi.Input[str]]
    tags: dict[str, str]


class Cluster(pulumi.ComponentResource):
    """The EKS cluster and the Kubernetes provider every in-cluster object is created with."""

    cluster_name: pulumi.Output[str]
    kubeconfig: pulumi.Output[str]
    node_security_group_id: pulumi.Output[str]
    oidc_provider_arn: pulumi.Output[str]
    oidc_issuer: pulumi.Output[str]
    provider: k8s.Provider

    def __init__(
        self, name: str, args: ClusterArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("switchyard:infra:Cluster", name, None, opts)
        self._name = name
        self._args = args
        self.eks = self._create_control_plane()
        self.cluster_name = self.eks.name
        # Managed node groups join the cluster security group; EFS and Redis admit exactly it.
        self.node_security_group_id = self.eks.vpc_config.cluster_security_group_id
        self._create_oidc_provider()
        self.node_role = self._create_node_role()
        self.node_groups = [self._create_system_nodes()]
        self.gpu_node_groups = [self._create_gpu_nodes(g) for g in args.settings.gpu_node_groups]
        self.node_groups += self.gpu_node_groups
        self._create_core_addons()
        self.kubeconfig = pulumi.Output.secret(
            pulumi.Output.all(
                self.eks.name, self.eks.endpoint, self.eks.certificate_authority.data
            ).apply(lambda a: _kubeconfig(str(a[0]), str(a[1]), str(a[2])))
        )
        self.provider = k8s.Provider(
            f"{name}-k8s",
            kubeconfig=self.kubeconfig,
            enable_server_side_apply=True,
            opts=pulumi.ResourceOptions(parent=self, depends_on=self.node_groups),
        )
        self._create_device_plugin()
        self._create_lb_controller()
        self.register_outputs(
            {
                "cluster_name": self.cluster_name,
                "kubeconfig": self.kubeconfig,
                "oidc_provider_arn": self.oidc_provider_arn,
            }
        )

    def _create_control_plane(self) -> aws.eks.Cluster:
        a, s, child = self._args, self._args.settings, pulumi.ResourceOptions(parent=self)
        role = aws.iam.Role(
            f"{self._name}-control-plane",
            assume_role_policy=assume_role_policy("eks.amazonaws.com"),
            tags=a.tags,
            opts=child,
        )
        attach = aws.iam.RolePolicyAttachment(
            f"{self._name}-control-plane",
            role=role.name,
            policy_arn=f"{_AWS_MANAGED}/AmazonEKSClusterPolicy",
            opts=child,
        )
        # Kubernetes Secrets (Stripe key, Redis token) are envelope-encrypted with our own key.
        key = aws.kms.Key(
            f"{self._name}-secrets",
            description=f"{a.name} Kubernetes secrets envelope encryption",
            enable_key_rotation=True,
            deletion_window_in_days=30,
            tags=a.tags,
            opts=child,
        )
        return aws.eks.Cluster(
            f"{self._name}-eks",
            name=a.name,
            version=s.version,
            role_arn=role.arn,
            vpc_config=aws.eks.ClusterVpcConfigArgs(
                subnet_ids=a.private_subnet_ids,
                endpoint_private_access=True,
                endpoint_public_access=s.endpoint_public_access,
                public_access_cidrs=list(s.public_access_cidrs)
                if s.endpoint_public_access
                else None,
            ),
            access_config=aws.eks.ClusterAccessConfigArgs(
                authentication_mode="API",
                bootstrap_cluster_creator_admin_permissions=True,
            ),
            encryption_config=aws.eks.ClusterEncryptionConfigArgs(
                resources=["secrets"],
                provider=aws.eks.ClusterEncryptionConfigProviderArgs(key_arn=key.arn),
            ),
            enabled_cluster_log_types=["api", "audit", "authenticator"],
            tags=a.tags,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[attach]),
        )

    def _create_oidc_provider(self) -> None:
        issuer = self.eks.identities[0].oidcs[0].issuer
        provider = aws.iam.OpenIdConnectProvider(
            f"{self._name}-oidc",
            url=issuer,
            client_id_lists=["sts.amazonaws.com"],
            tags=self._args.tags,
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.oidc_provider_arn = provider.arn
        self.oidc_issuer = issuer

    def irsa_role(
        self,
        name: str,
        namespace: str,
        service_account: str,
        policy_arns: list[pulumi.Input[str]],
    ) -> aws.iam.Role:
        """A role only `system:serviceaccount:<namespace>:<service_account>` can assume."""
        trust = pulumi.Output.all(self.oidc_provider_arn, self.oidc_issuer).apply(
            lambda a: _irsa_trust(str(a[0]), str(a[1]), namespace, service_account)
        )
        role = aws.iam.Role(
            f"{self._name}-{name}",
            assume_role_policy=trust,
            tags=self._args.tags,
            opts=pulumi.ResourceOptions(parent=self),
        )
        for i, arn in enumerate(policy_arns):
            aws.iam.RolePolicyAttachment(
                f"{self._name}-{name}-{i}",
                role=role.name,
                policy_arn=arn,
                opts=pulumi.ResourceOptions(parent=self),
            )
        return role

    def _create_node_role(self) -> aws.iam.Role:
        child = pulumi.ResourceOptions(parent=self)
        role = aws.iam.Role(
            f"{self._name}-node",
            assume_role_policy=assume_role_policy("ec2.amazonaws.com"),
            tags=self._args.tags,
            opts=child,
        )
        # Join the cluster and pull from ECR; the CNI's permissions live in its IRSA role.
        for i, policy in enumerate(
            ["AmazonEKSWorkerNodePolicy", "AmazonEC2ContainerRegistryReadOnly"]
        ):
            aws.iam.RolePolicyAttachment(
                f"{self._name}-node-{i}",
                role=role.name,
                policy_arn=f"{_AWS_MANAGED}/{policy}",
                opts=child,
            )
        return role

    def _node_group(self, suffix: str, **kwargs: Any) -> aws.eks.NodeGroup:
        return aws.eks.NodeGroup(
            f"{self._name}-{suffix}",
            cluster_name=self.eks.name,
            node_role_arn=self.node_role.arn,
            subnet_ids=self._args.private_subnet_ids,
            version=self._args.settings.version,
            update_config=aws.eks.NodeGroupUpdateConfigArgs(max_unavailable=1),
            tags=self._args.tags,
            opts=pulumi.ResourceOptions(
                parent=self,
                # The autoscaler owns desired size after creation; don't fight it on every up.
                ignore_changes=["scalingConfig.desiredSize"],
            ),
            **kwargs,
        )

    def _create_system_nodes(self) -> aws.eks.NodeGroup:
        s = self._args.settings
        return self._node_group(
            "system",
            ami_type="AL2023_x86_64_STANDARD",
            instance_types=list(s.system_instance_types),
            capacity_type="ON_DEMAND",  # the gateway and controllers must not be reclaimed
            scaling_config=aws.eks.NodeGroupScalingConfigArgs(
                min_size=s.system_scaling.min,
                max_size=s.system_scaling.max,
                desired_size=s.system_scaling.desired,
            ),
            labels={POOL_LABEL: "system"},
        )

    def _create_gpu_nodes(self, group: GpuNodeGroup) -> aws.eks.NodeGroup:
        # The taint keeps every pod without a matching toleration (gateway, controllers) off
        # the expensive nodes; the label lets each model pick its GPU type.
        return self._node_group(
            f"gpu-{group.gpu_type}",
            ami_type="AL2023_x86_64_NVIDIA",
            instance_types=[group.instance_type],
            capacity_type=group.capacity_type.value,
            disk_size=200,  # vLLM images are ~10 GB and the layer cache must not evict them
            scaling_config=aws.eks.NodeGroupScalingConfigArgs(
                min_size=group.scaling.min,
                max_size=group.scaling.max,
                desired_size=group.scaling.desired,
            ),
            labels={POOL_LABEL: "gpu", GPU_TYPE_LABEL: group.gpu_type},
            taints=[
                aws.eks.NodeGroupTaintArgs(key=GPU_TAINT_KEY, value="true", effect="NO_SCHEDULE")
            ],
        )

    def _create_core_addons(self) -> None:
        cni_role = self.irsa_role(
            "vpc-cni", "kube-system", "aws-node", [f"{_AWS_MANAGED}/AmazonEKS_CNI_Policy"]
        )
        for addon, role in (("vpc-cni", cni_role), ("coredns", None), ("kube-proxy", None)):
            aws.eks.Addon(
                f"{self._name}-{addon}",
                cluster_name=self.eks.name,
                addon_name=addon,
                service_account_role_arn=role.arn if role else None,
                resolve_conflicts_on_update="OVERWRITE",
                tags=self._args.tags,
                opts=pulumi.ResourceOptions(
                    parent=self, depends_on=[] if addon == "vpc-cni" else self.node_groups
                ),
            )

    def _create_device_plugin(self) -> None:
        k8s.helm.v3.Release(
            f"{self._name}-nvidia-device-plugin",
            name="nvidia-device-plugin",
            chart="nvidia-device-plugin",
            version=versions.NVIDIA_DEVICE_PLUGIN_CHART,
            namespace="kube-system",
            repository_opts=k8s.helm.v3.RepositoryOptsArgs(
                repo="https://nvidia.github.io/k8s-device-plugin"
            ),
            values={
                "nodeSelector": {POOL_LABEL: "gpu"},
                "tolerations": [
                    {"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}
                ],
            },
            opts=pulumi.ResourceOptions(parent=self, provider=self.provider),
        )

    def _create_lb_controller(self) -> None:
        policy = aws.iam.Policy(
            f"{self._name}-lb-controller",
            description="AWS Load Balancer Controller: manage NLBs for Services it is asked to",
            policy=json.dumps(_LB_CONTROLLER_POLICY),
            tags=self._args.tags,
            opts=pulumi.ResourceOptions(parent=self),
        )
        role = self.irsa_role(
            "lb-controller", "kube-system", "aws-load-balancer-controller", [policy.arn]
        )
        self.lb_controller = k8s.helm.v3.Release(
            f"{self._name}-lb-controller",
            name="aws-load-balancer-controller",
            chart="aws-load-balancer-controller",
            version=versions.AWS_LB_CONTROLLER_CHART,
            namespace="kube-system",
            repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo="https://aws.github.io/eks-charts"),
            values={
                "clusterName": self.eks.name,
                "vpcId": self._args.vpc_id,
                "replicaCount": 2,
                "nodeSelector": {POOL_LABEL: "system"},
                "serviceAccount": {
                    "name": "aws-load-balancer-controller",
                    "annotations": {"eks.amazonaws.com/role-arn": role.arn},
                },
            },
            opts=pulumi.ResourceOptions(parent=self, provider=self.provider),
        )


def _irsa_trust(provider_arn: str, issuer: str, namespace: str, service_account: str) -> str:
    host = issuer.removeprefix("https://")
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Federated": provider_arn},
                    "Action": "sts:AssumeRoleWithWebIdentity",
                    "Condition": {
                        "StringEquals": {
                            f"{host}:sub": f"system:serviceaccount:{namespace}:{service_account}",
                            f"{host}:aud": "sts.amazonaws.com",
                        }
                    },
                }
            ],
        }
    )


def _kubeconfig(name: str, endpoint: str, ca_data: str) -> str:
    """Token via `aws eks get-token`: nothing long-lived is stored in the kubeconfig."""
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": name,
                    "cluster": {"server": endpoint, "certificate-authority-data": ca_data},
                }
            ],
            "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
            "current-context": name,
            "users": [
                {
                    "name": name,
                    "user": {
                        "exec": {
                            "apiVersion": "client.authentication.k8s.io/v1beta1",
                            "command": "aws",
                            "args": ["eks", "get-token", "--cluster-name", name],
                        }
                    },
                }
            ],
        }
    )


# Condensed from the controller's published policy: read-only discovery, and writes only on
# load balancers / security groups the controller tagged itself (elbv2.k8s.aws/cluster).
_LB_CONTROLLER_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": [
                "ec2:Describe*",
                "elasticloadbalancing:Describe*",
                "acm:DescribeCertificate",
                "acm:ListCertificates",
            ],
            "Resource": "*",
        },
        {
            "Effect": "Allow",
            "Action": ["ec2:CreateSecurityGroup", "ec2:CreateTags"],
            "Resource": "*",
            "Condition": {"Null": {"aws:RequestTag/elbv2.k8s.aws/cluster": "false"}},
        },
        {
            "Effect": "Allow",
            "Action": [
                "ec2:AuthorizeSecurityGroupIngress",
                "ec2:RevokeSecurityGroupIngress",
                "ec2:DeleteSecurityGroup",
            ],
            "Resource": "*",
        },
        {
            "Effect": "Allow",
            "Action": [
                "elasticloadbalancing:CreateLoadBalancer",
                "elasticloadbalancing:CreateTargetGroup",
                "elasticloadbalancing:AddTags",
            ],
            "Resource": "*",
            "Condition": {"Null": {"aws:RequestTag/elbv2.k8s.aws/cluster": "false"}},
        },
        {
            "Effect": "Allow",
            "Action": [
                "elasticloadbalancing:CreateListener",
                "elasticloadbalancing:DeleteListener",
                "elasticloadbalancing:ModifyListener",
                "elasticloadbalancing:ModifyLoadBalancerAttributes",
                "elasticloadbalancing:SetSecurityGroups",
                "elasticloadbalancing:SetSubnets",
                "elasticloadbalancing:DeleteLoadBalancer",
                "elasticloadbalancing:ModifyTargetGroup",
                "elasticloadbalancing:ModifyTargetGroupAttributes",
                "elasticloadbalancing:DeleteTargetGroup",
                "elasticloadbalancing:RegisterTargets",
                "elasticloadbalancing:DeregisterTargets",
            ],
            "Resource": "*",
            "Condition": {"Null": {"aws:ResourceTag/elbv2.k8s.aws/cluster": "false"}},
        },
    ],
}
