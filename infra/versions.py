"""Every version the platform pins, in one place, so an upgrade is one reviewed diff.

The test suite validates Kubernetes objects against the schemas of these exact releases
(`kubernetes-validate` for EKS_VERSION, vendored CRDs in tests/infra/schemas for KServe and the
Knative operator): bump both together.
"""

from __future__ import annotations

EKS_VERSION = "1.34"
"""EKS control plane and node version (standard support through 2026-12)."""

CERT_MANAGER_CHART = "v1.18.2"
"""KServe's webhooks need certificates; cert-manager issues them."""

KNATIVE_OPERATOR_CHART = "v1.21.4"
KNATIVE_SERVING = "1.21"
"""The operator installs Serving from a KnativeServing object whose feature flags we own."""

KSERVE_CHART = "v0.20.0"
"""KServe release whose CRDs are vendored in tests/infra/schemas."""

KEDA_CHART = "2.17.2"
"""KEDA drives Standard-mode models on vLLM's queue metric."""

NVIDIA_DEVICE_PLUGIN_CHART = "0.17.3"
"""Advertises nvidia.com/gpu on the GPU nodes (the EKS NVIDIA AMI ships drivers, not the plugin)."""

AWS_LB_CONTROLLER_CHART = "1.13.4"
"""Creates the NLB for the gateway Service with our security group and TLS certificate."""

EFS_CSI_ADDON: str | None = None
"""EKS add-on version for aws-efs-csi-driver; None lets EKS pick the default for EKS_VERSION."""
