"""Every Kubernetes object the program creates is valid for the cluster it will reach."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from policy.rules import reveal
from tests.infra.harness import StackRun
from tests.infra.k8s_schemas import SchemaError, validate

NOT_OBJECTS = ("kubernetes:helm.sh/v3:Release", "pulumi:providers:kubernetes")


def manifests(run: StackRun) -> list[dict[str, Any]]:
    out = []
    for r in run.resources:
        if r.type.startswith("kubernetes:") and r.type not in NOT_OBJECTS:
            manifest = reveal(r.props)
            manifest["metadata"].setdefault("name", r.name)  # Pulumi auto-names the rest
            out.append(manifest)
    return out


def test_every_kubernetes_object_matches_its_schema(run: StackRun) -> None:
    objects = manifests(run)
    kinds = {m["kind"] for m in objects}
    assert {"InferenceService", "ServingRuntime", "KnativeServing", "Deployment", "Job"} <= kinds
    for manifest in objects:
        validate(manifest)


def _first(run: StackRun, kind: str) -> dict[str, Any]:
    return copy.deepcopy(next(m for m in manifests(run) if m["kind"] == kind))


def test_misspelt_core_field_is_rejected(staging: StackRun) -> None:
    deployment = _first(staging, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    with pytest.raises(SchemaError, match="readinessProbes"):
        validate(deployment)


def test_misspelt_inference_service_field_is_rejected(staging: StackRun) -> None:
    isvc = _first(staging, "InferenceService")
    isvc["spec"]["predictor"]["canaryTrafficPercentage"] = 10
    with pytest.raises(SchemaError, match="canaryTrafficPercentage"):
        validate(isvc)


def test_wrongly_typed_inference_service_field_is_rejected(staging: StackRun) -> None:
    isvc = _first(staging, "InferenceService")
    isvc["spec"]["predictor"]["minReplicas"] = "one"
    with pytest.raises(SchemaError, match="minReplicas"):
        validate(isvc)


def test_custom_resource_metadata_is_checked_too(staging: StackRun) -> None:
    runtime = _first(staging, "ServingRuntime")
    runtime["metadata"]["annotations"] = {"replicas": 2}  # annotation values must be strings
    with pytest.raises(SchemaError, match="annotations"):
        validate(runtime)


def test_misspelt_knative_flag_section_is_rejected(staging: StackRun) -> None:
    knative = _first(staging, "KnativeServing")
    knative["spec"]["ingres"] = knative["spec"].pop("ingress")
    with pytest.raises(SchemaError, match="ingres"):
        validate(knative)
