"""Pod-level defaults every Switchyard workload shares: restricted security, labels, GPU rules.

Kept as plain dicts (the Kubernetes wire format) so serving objects, which are custom resources,
and core objects use literally the same values.
"""

from __future__ import annotations

from typing import Any

from infra.cluster import GPU_TAINT_KEY, GPU_TYPE_LABEL, POOL_LABEL

APP_UID = 10001
"""Non-root user of the gateway image."""

# Container paths backed by emptyDir volumes (the root filesystem is read-only), not host dirs.
SCRATCH = "/tmp"  # noqa: S108
SHM = "/dev/shm"  # noqa: S108


def labels(component: str, **extra: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": component,
        "app.kubernetes.io/part-of": "switchyard",
        "app.kubernetes.io/managed-by": "pulumi",
        **extra,
    }


def pod_security(uid: int) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security(read_only_root: bool = True) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": read_only_root,
        "capabilities": {"drop": ["ALL"]},
    }


def system_pool() -> dict[str, str]:
    return {POOL_LABEL: "system"}


def gpu_placement(gpu_type: str) -> dict[str, Any]:
    """nodeSelector + toleration pair: the pod may land on the tainted node group of its type."""
    return {
        "nodeSelector": {GPU_TYPE_LABEL: gpu_type},
        "tolerations": [{"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
    }
