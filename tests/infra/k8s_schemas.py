"""Offline, strict validation of Kubernetes objects against the schemas the cluster enforces.

Core objects: `kubernetes-validate`'s strict OpenAPI schemas for the EKS version we pin.
Custom resources: the CRDs of the KServe / Knative operator releases we pin, vendored in
schemas/ (see schemas/SOURCES.md). CRD schemas allow unknown fields (the API server prunes
them silently), so `strict_crd_schema` closes every object that lists its properties, the way
`kubectl apply --validate=strict` rejects them.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from infra.versions import EKS_VERSION

SCHEMAS = Path(__file__).resolve().parent / "schemas"
CRD_FILES = {
    ("serving.kserve.io", "InferenceService"): "serving.kserve.io_inferenceservices.yaml.gz",
    ("serving.kserve.io", "ServingRuntime"): "serving.kserve.io_servingruntimes.yaml.gz",
    ("operator.knative.dev", "KnativeServing"): "operator.knative.dev_knativeservings.yaml.gz",
}
K8S_VERSION = f"{EKS_VERSION}.0"


class SchemaError(AssertionError):
    """The object does not match its schema; the message says where."""


def strict_crd_schema(schema: Any) -> Any:
    """Copy of an OpenAPI v3 CRD schema where unlisted fields are errors."""
    if isinstance(schema, list):
        return [strict_crd_schema(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: strict_crd_schema(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(group: str, version: str, kind: str) -> jsonschema.protocols.Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the ISVC CRD is 2 MB of YAML
    with gzip.open(SCHEMAS / CRD_FILES[(group, kind)]) as f:
        crd = yaml.load(f.read(), Loader=loader)  # noqa: S506 - a safe loader
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = strict_crd_schema(v["schema"]["openAPIV3Schema"])
            cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
            return cls(schema)
    raise SchemaError(f"{group}/{version} {kind}: version not served by the vendored CRD")


def validate(manifest: Mapping[str, Any]) -> None:
    """Raise SchemaError unless `manifest` is valid for the pinned cluster."""
    api_version, kind = manifest["apiVersion"], manifest["kind"]
    group, _, version = api_version.rpartition("/")
    if (group, kind) in CRD_FILES:
        errors = sorted(crd_validator(group, version, kind).iter_errors(dict(manifest)), key=str)
        if errors:
            e = errors[0]
            where = "/".join(str(p) for p in e.absolute_path)
            raise SchemaError(f"{kind} {where}: {e.message}")
        # CRDs leave metadata untyped; check it against ObjectMeta through a core object.
        validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": manifest["metadata"]})
        return
    try:
        kubernetes_validate.validate(dict(manifest), K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise SchemaError(f"{kind} {where}: {exc.message}") from None
