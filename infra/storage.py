"""Model weights on EFS: pulled once, read by every replica through a ReadWriteMany PVC."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from infra import versions

EFS_CSI_POLICY = "arn:aws:iam::aws:policy/service-role/AmazonEFSCSIDriverPolicy"
MODELS_UID = 1000
"""POSIX identity the access point forces on every client: the pull Jobs and vLLM run as it."""


@dataclass
class ModelStorageArgs:
    vpc_id: pulumi.Input[str]
    private_subnet_ids: list[pulumi.Input[str]]
    node_security_group_id: pulumi.Input[str]
    cluster_name: pulumi.Input[str]
    csi_role_arn: pulumi.Input[str]
    """IRSA role for the EFS CSI controller (from Cluster.irsa_role)."""
    namespace: str
    provider: k8s.Provider
    tags: dict[str, str]
    pvc_size: str = "2Ti"  # EFS ignores it; Kubernetes requires one


class ModelStorage(pulumi.ComponentResource):
    file_system_id: pulumi.Output[str]
    pvc_name: pulumi.Output[str]

    def __init__(
        self, name: str, args: ModelStorageArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("switchyard:infra:ModelStorage", name, None, opts)
        self._name = name
        self._args = args
        self.efs = self._create_file_system()
        self.file_system_id = self.efs.id
        addon = aws.eks.Addon(
            f"{name}-efs-csi",
            cluster_name=args.cluster_name,
            addon_name="aws-efs-csi-driver",
            addon_version=versions.EFS_CSI_ADDON,
            service_account_role_arn=args.csi_role_arn,
            resolve_conflicts_on_update="OVERWRITE",
            tags=args.tags,
            opts=pulumi.ResourceOptions(parent=self),
        )
        self._create_claim(addon)
        self.register_outputs({"file_system_id": self.file_system_id, "pvc_name": self.pvc_name})

    def _create_file_system(self) -> aws.efs.FileSystem:
        a, child = self._args, pulumi.ResourceOptions(parent=self)
        efs = aws.efs.FileSystem(
            f"{self._name}-efs",
            encrypted=True,
            # Elastic: up to 1.5 GiB/s per client without burst credits that a rollout of many
            # replicas would drain (Bursting gives 50 MiB/s per TiB stored).
            throughput_mode="elastic",
            performance_mode="generalPurpose",
            lifecycle_policies=[
                aws.efs.FileSystemLifecyclePolicyArgs(transition_to_ia="AFTER_30_DAYS"),
                aws.efs.FileSystemLifecyclePolicyArgs(
                    transition_to_primary_storage_class="AFTER_1_ACCESS"
                ),
            ],
            tags={**a.tags, "Name": f"{self._name}-models"},
            opts=child,
        )
        sg = aws.ec2.SecurityGroup(
            f"{self._name}-efs",
            description="NFS from the EKS nodes only",
            vpc_id=a.vpc_id,
            ingress=[
                aws.ec2.SecurityGroupIngressArgs(
                    description="NFS from cluster nodes",
                    protocol="tcp",
                    from_port=2049,
                    to_port=2049,
                    security_groups=[a.node_security_group_id],
                )
            ],
            tags=a.tags,
            opts=child,
        )
        for i, subnet in enumerate(a.private_subnet_ids):
            aws.efs.MountTarget(
                f"{self._name}-mt-{i}",
                file_system_id=efs.id,
                subnet_id=subnet,
                security_groups=[sg.id],
                opts=child,
            )
        # Refuse unencrypted NFS clients: the CSI driver mounts with TLS (efs-utils).
        aws.efs.FileSystemPolicy(
            f"{self._name}-efs-tls",
            file_system_id=efs.id,
            policy=efs.arn.apply(_require_tls_policy),
            opts=child,
        )
        return efs

    def _create_claim(self, addon: aws.eks.Addon) -> None:
        a = self._args
        k8s_opts = pulumi.ResourceOptions(parent=self, provider=a.provider)
        ns = k8s.core.v1.Namespace(
            f"{self._name}-ns",
            metadata=k8s.meta.v1.ObjectMetaArgs(
                name=a.namespace,
                labels={"pod-security.kubernetes.io/enforce": "baseline"},
            ),
            opts=k8s_opts,
        )
        sc = k8s.storage.v1.StorageClass(
            f"{self._name}-sc",
            metadata=k8s.meta.v1.ObjectMetaArgs(name="switchyard-models-efs"),
            provisioner="efs.csi.aws.com",
            parameters={
                "provisioningMode": "efs-ap",
                "fileSystemId": self.efs.id,
                "directoryPerms": "750",
                "uid": str(MODELS_UID),
                "gid": str(MODELS_UID),
                "basePath": "/switchyard",
            },
            mount_options=["tls"],
            reclaim_policy="Retain",  # weights outlive a mistaken `pulumi destroy` of the PVC
            volume_binding_mode="Immediate",
            opts=pulumi.ResourceOptions(parent=self, provider=a.provider, depends_on=[addon]),
        )
        pvc = k8s.core.v1.PersistentVolumeClaim(
            f"{self._name}-pvc",
            metadata=k8s.meta.v1.ObjectMetaArgs(name="models", namespace=ns.metadata.name),
            spec=k8s.core.v1.PersistentVolumeClaimSpecArgs(
                access_modes=["ReadWriteMany"],
                storage_class_name=sc.metadata.name,
                resources=k8s.core.v1.VolumeResourceRequirementsArgs(
                    requests={"storage": a.pvc_size}
                ),
            ),
            opts=k8s_opts,
        )
        self.namespace = ns.metadata.name
        self.pvc_name = pvc.metadata.name


def _require_tls_policy(arn: str) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "DenyInsecureTransport",
                    "Effect": "Deny",
                    "Principal": {"AWS": "*"},
                    "Action": "*",
                    "Resource": arn,
                    "Condition": {"Bool": {"aws:SecureTransport": "false"}},
                }
            ],
        }
    )
