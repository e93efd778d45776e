"""KServe on Knative (plus KEDA) and one InferenceService per catalogue model.

Per model, the catalogue picks the mode (see config.ServingMode): Knative for KServe-managed
canaries, Standard for scaling on vLLM's queue. `render_*` functions are pure, so the tests and
the gateway ConfigMap see exactly what the cluster gets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from infra import versions
from infra.config import GPU_INSTANCES, Model, ServingMode
from infra.models import revisions, source_at
from infra.storage import MODELS_UID
from infra.workloads import (
    SCRATCH,
    SHM,
    container_security,
    gpu_placement,
    labels,
    pod_security,
    system_pool,
)

RUNTIME_NAME = "vllm"
VLLM_PORT = 8080
PROGRESS_DEADLINE = "3600s"
"""Knative's 10-minute default kills a 70B replica that is still loading weights."""

# Knative rejects pod specs using these unless the flags are on; KServe GPU pods need them all.
KNATIVE_FEATURES = {
    "kubernetes.podspec-nodeselector": "enabled",
    "kubernetes.podspec-tolerations": "enabled",
    "kubernetes.podspec-persistent-volume-claim": "enabled",
    "kubernetes.podspec-securitycontext": "enabled",
    "kubernetes.podspec-volumes-emptydir": "enabled",
}


def predictor_url(name: str, namespace: str) -> str:
    """In-cluster URL of an InferenceService predictor (both modes expose this Service)."""
    return f"http://{name}-predictor.{namespace}.svc.cluster.local"


def _resources(model: Model) -> dict[str, Any]:
    """Requests sized to one node: all of its GPUs' share of CPU and memory, minus headroom."""
    spec = model.spec
    inst = GPU_INSTANCES[spec.gpu.instance_type]
    share = spec.gpu.count / inst.gpus
    cpu = max(1, math.floor((inst.vcpus - 1) * share))
    mem = max(4, math.floor((inst.memory_gib - 4) * share))
    gpus = str(spec.gpu.count)
    return {
        "requests": {"cpu": str(cpu), "memory": f"{mem}Gi", "nvidia.com/gpu": gpus},
        "limits": {"cpu": str(cpu), "memory": f"{mem}Gi", "nvidia.com/gpu": gpus},
    }


def _model_container(model: Model, revision: str, runtime: str) -> dict[str, Any]:
    spec = model.spec
    assert spec.source is not None
    env = {
        "SWITCHYARD_MODEL_SOURCE": source_at(spec.source, revision),
        "SWITCHYARD_MODEL_REVISION": revision,
        "SWITCHYARD_SERVED_NAME": spec.upstream_name,
        "SWITCHYARD_MAX_MODEL_LEN": str(spec.max_model_len),
        "SWITCHYARD_TENSOR_PARALLEL_SIZE": str(spec.gpu.count),
    }
    probe = {"httpGet": {"path": "/health", "port": VLLM_PORT}, "periodSeconds": 10}
    return {
        "modelFormat": {"name": "vLLM"},
        "runtime": runtime,
        # Mounted read-only at /mnt/models; the runtime's entrypoint finds the revision in it.
        "storageUri": f"pvc://models/{spec.name}",
        "args": list(spec.vllm_args),
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "resources": _resources(model),
        "readinessProbe": {**probe, "failureThreshold": 3},
        # Generous: weights load for minutes; the progress deadline bounds a stuck rollout.
        "livenessProbe": {**probe, "initialDelaySeconds": 900, "failureThreshold": 6},
        "securityContext": container_security(),
        # Read-only root: vLLM's compile caches go to /tmp, NCCL needs a real /dev/shm.
        "volumeMounts": [
            {"name": "tmp", "mountPath": SCRATCH},
            {"name": "shm", "mountPath": SHM},
        ],
    }


def _predictor(model: Model, revision: str, min_r: int, max_r: int) -> dict[str, Any]:
    return {
        "minReplicas": min_r,
        "maxReplicas": max_r,
        "timeout": 600,  # long generations stream for minutes
        "securityContext": pod_security(MODELS_UID),
        **gpu_placement(model.spec.gpu.type),
        "model": _model_container(model, revision, RUNTIME_NAME),
        "volumes": [
            {"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
        ],
    }


def render_inference_services(
    model: Model, namespace: str, prometheus_url: str
) -> list[dict[str, Any]]:
    """The InferenceService objects (name, metadata, spec) that serve one catalogue model."""
    spec = model.spec
    base_annotations = {
        "serving.knative.dev/progress-deadline": PROGRESS_DEADLINE,
        "pulumi.com/waitFor": "condition=Ready",
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(VLLM_PORT),
        "prometheus.io/path": "/metrics",
    }
    meta_labels = labels("inference", **{"switchyard.dev/model": spec.name})
    if model.mode is ServingMode.knative:
        revision = spec.canary.revision if spec.canary else spec.revision
        predictor = _predictor(model, revision, spec.replicas.min, spec.replicas.max)
        predictor["scaleMetric"] = spec.autoscaling.metric
        predictor["scaleTarget"] = spec.autoscaling.target
        annotations = {
            **base_annotations,
            "serving.kserve.io/deploymentMode": "Serverless",
            "autoscaling.knative.dev/class": "kpa.autoscaling.knative.dev",
            "autoscaling.knative.dev/metric": spec.autoscaling.metric,
            "autoscaling.knative.dev/target": str(spec.autoscaling.target),
            "autoscaling.knative.dev/min-scale": str(spec.replicas.min),
            "autoscaling.knative.dev/max-scale": str(spec.replicas.max),
        }
        if spec.canary is not None:
            # The spec above is the new revision; Knative keeps the previous one for the rest.
            predictor["canaryTrafficPercent"] = spec.canary.traffic_percent
            annotations["serving.kserve.io/enable-tag-routing"] = "true"
        return [
            {
                "name": spec.name,
                "revision": revision,
                "metadata": {"name": spec.name, "namespace": namespace, "labels": meta_labels},
                "annotations": annotations,
                "spec": {"predictor": predictor},
            }
        ]
    objs = []
    queue_target = spec.queue_target
    variants = [(spec.name, spec.revision, spec.replicas.min, spec.replicas.max)]
    if spec.canary is not None:
        # No canaryTrafficPercent in Standard mode: a second service, split by the gateway.
        share = max(1, math.ceil(spec.replicas.max * spec.canary.traffic_percent / 100))
        variants.append((f"{spec.name}-canary", spec.canary.revision, 1, share))
    for name, revision, min_r, max_r in variants:
        predictor = _predictor(model, revision, min_r, max_r)
        query = (
            f'sum(vllm:num_requests_waiting{{namespace="{namespace}",pod=~"{name}-predictor-.*"}})'
        )
        predictor["autoScaling"] = {
            "metrics": [
                {
                    "type": "External",
                    "external": {
                        "metric": {
                            "backend": "prometheus",
                            "serverAddress": prometheus_url,
                            "query": query,
                        },
                        "target": {"type": "AverageValue", "averageValue": str(queue_target)},
                    },
                }
            ]
        }
        objs.append(
            {
                "name": name,
                "revision": revision,
                "metadata": {"name": name, "namespace": namespace, "labels": meta_labels},
                "annotations": {
                    **base_annotations,
                    "serving.kserve.io/deploymentMode": "RawDeployment",
                    "serving.kserve.io/autoscalerClass": "keda",
                },
                "spec": {"predictor": predictor},
            }
        )
    return objs


def render_gateway_catalog(
    catalog: Mapping[str, Any], models: tuple[Model, ...], namespace: str
) -> dict[str, Any]:
    """The gateway's catalogue: the stack's, with each model pointed at its predictor.

    Knative models drop `canary` (KServe already splits their traffic; splitting again in the
    gateway would compound the percentages). Standard-mode canaries keep it, with the canary
    service's URL under `canary.endpoints`, because there the gateway does the split.
    """
    by_name = {m.spec.name: m for m in models}
    out = []
    for entry in catalog["models"]:
        entry = dict(entry)
        model = by_name[entry["name"]]
        entry["endpoints"] = [predictor_url(entry["name"], namespace)]
        if "canary" in entry:
            if model.mode is ServingMode.knative:
                del entry["canary"]
            else:
                entry["canary"] = {
                    **entry["canary"],
                    "endpoints": [predictor_url(f"{entry['name']}-canary", namespace)],
                }
        out.append(entry)
    # Aliases (weighted splits, guarded canaries) are the gateway's own: passed as they are.
    return {"models": out, "aliases": list(catalog.get("aliases", []))}


@dataclass
class ServingArgs:
    models: tuple[Model, ...]
    namespace: pulumi.Input[str]
    namespace_name: str
    """The same namespace as a plain string, for URLs and Prometheus queries."""
    vllm_image: pulumi.Input[str]
    prometheus_url: str
    pull_jobs: Mapping[tuple[str, str], pulumi.Resource]
    provider: k8s.Provider
    ha: bool
    """Run two replicas of the serving control plane (production)."""


class Serving(pulumi.ComponentResource):
    def __init__(
        self, name: str, args: ServingArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("switchyard:infra:Serving", name, None, opts)
        self._name = name
        self._args = args
        platform = self._create_platform()
        runtime = self._create_runtime(platform)
        self.inference_services: dict[str, k8s.apiextensions.CustomResource] = {}
        for model in args.models:
            for obj in render_inference_services(model, args.namespace_name, args.prometheus_url):
                self.inference_services[obj["name"]] = self._create_isvc(model, obj, runtime)
        self.register_outputs({"inference_services": list(self.inference_services)})

    def _release(
        self, suffix: str, chart: str, version: str, namespace: str, **kwargs: Any
    ) -> k8s.helm.v3.Release:
        depends_on = kwargs.pop("depends_on", [])
        return k8s.helm.v3.Release(
            f"{self._name}-{suffix}",
            name=suffix,
            chart=chart,
            version=version,
            namespace=namespace,
            create_namespace=True,
            atomic=True,
            opts=pulumi.ResourceOptions(
                parent=self, provider=self._args.provider, depends_on=depends_on
            ),
            **kwargs,
        )

    def _create_platform(self) -> list[pulumi.Resource]:
        a = self._args
        on_system = {"nodeSelector": system_pool()}
        cert_manager = self._release(
            "cert-manager",
            "cert-manager",
            versions.CERT_MANAGER_CHART,
            "cert-manager",
            repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo="https://charts.jetstack.io"),
            values={"crds": {"enabled": True}, **on_system},
        )
        operator = self._release(
            "knative-operator",
            "knative-operator",
            versions.KNATIVE_OPERATOR_CHART,
            "knative-operator",
            repository_opts=k8s.helm.v3.RepositoryOptsArgs(
                repo="https://knative.github.io/operator"
            ),
        )
        knative_ns = k8s.core.v1.Namespace(
            f"{self._name}-knative-serving",
            metadata={"name": "knative-serving"},
            opts=pulumi.ResourceOptions(parent=self, provider=a.provider),
        )
        knative = k8s.apiextensions.CustomResource(
            f"{self._name}-knative-serving",
            api_version="operator.knative.dev/v1beta1",
            kind="KnativeServing",
            metadata={
                "name": "knative-serving",
                "namespace": knative_ns.metadata.name,
                "annotations": {"pulumi.com/waitFor": "condition=Ready"},
            },
            spec={
                "version": versions.KNATIVE_SERVING,
                "high-availability": {"replicas": 2 if a.ha else 1},
                # Kourier stays cluster-internal: the only way in from outside is the gateway.
                "ingress": {"kourier": {"enabled": True, "service-type": "ClusterIP"}},
                "config": {
                    "network": {"ingress-class": "kourier.ingress.networking.knative.dev"},
                    "features": dict(KNATIVE_FEATURES),
                    "deployment": {"progress-deadline": PROGRESS_DEADLINE},
                    "domain": {"svc.cluster.local": ""},
                },
            },
            opts=pulumi.ResourceOptions(parent=self, provider=a.provider, depends_on=[operator]),
        )
        keda = self._release(
            "keda",
            "keda",
            versions.KEDA_CHART,
            "keda",
            repository_opts=k8s.helm.v3.RepositoryOptsArgs(
                repo="https://kedacore.github.io/charts"
            ),
            values=on_system,
        )
        crds = self._release(
            "kserve-crd",
            "oci://ghcr.io/kserve/charts/kserve-crd",
            versions.KSERVE_CHART,
            "kserve",
        )
        kserve = self._release(
            "kserve",
            "oci://ghcr.io/kserve/charts/kserve",
            versions.KSERVE_CHART,
            "kserve",
            values={
                "kserve": {
                    "controller": {"deploymentMode": "Serverless", **on_system},
                    "storage": {"enableModelcar": False},
                }
            },
            depends_on=[crds, cert_manager, knative, keda],
        )
        return [kserve]

    def _create_runtime(self, platform: list[pulumi.Resource]) -> k8s.apiextensions.CustomResource:
        a = self._args
        return k8s.apiextensions.CustomResource(
            f"{self._name}-runtime",
            api_version="serving.kserve.io/v1alpha1",
            kind="ServingRuntime",
            metadata={"name": RUNTIME_NAME, "namespace": a.namespace, "labels": labels("vllm")},
            spec={
                "supportedModelFormats": [{"name": "vLLM", "autoSelect": True}],
                "annotations": {
                    "prometheus.kserve.io/port": str(VLLM_PORT),
                    "prometheus.kserve.io/path": "/metrics",
                },
                "containers": [
                    {
                        "name": "kserve-container",
                        "image": a.vllm_image,
                        "args": [f"--port={VLLM_PORT}", "--served-model-name={{.Name}}"],
                        "env": [
                            {"name": "SWITCHYARD_MODEL_ROOT", "value": "/mnt/models"},
                            {"name": "HF_HUB_OFFLINE", "value": "1"},
                            {"name": "HOME", "value": SCRATCH},
                        ],
                        "ports": [{"containerPort": VLLM_PORT, "protocol": "TCP"}],
                        "resources": {
                            "requests": {"cpu": "1", "memory": "4Gi"},
                            "limits": {"cpu": "1", "memory": "4Gi"},
                        },
                        "securityContext": container_security(),
                    }
                ],
            },
            opts=pulumi.ResourceOptions(parent=self, provider=a.provider, depends_on=platform),
        )

    def _create_isvc(
        self, model: Model, obj: dict[str, Any], runtime: pulumi.Resource
    ) -> k8s.apiextensions.CustomResource:
        a = self._args
        jobs = [a.pull_jobs[(model.spec.name, rev)] for rev in revisions(model)]
        metadata = {**obj["metadata"], "namespace": a.namespace, "annotations": obj["annotations"]}
        return k8s.apiextensions.CustomResource(
            f"{self._name}-{obj['name']}",
            api_version="serving.kserve.io/v1beta1",
            kind="InferenceService",
            metadata=metadata,
            spec=obj["spec"],
            opts=pulumi.ResourceOptions(
                parent=self,
                provider=a.provider,
                depends_on=[runtime, *jobs],
                # Includes weight loading and CUDA graph capture on a cold GPU node.
                custom_timeouts=pulumi.CustomTimeouts(create="60m", update="60m"),
            ),
        )
