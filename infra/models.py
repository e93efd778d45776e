"""One Kubernetes Job per (model, revision) that puts the weights on the shared volume.

The Job name hashes source and revision, so a new revision is a new Job (Jobs are immutable)
and an unchanged one is left alone. Pulumi waits for a Job to complete, and each
InferenceService depends on its Jobs, so no replica ever starts before its weights are there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from infra.config import Model
from infra.storage import MODELS_UID
from infra.workloads import SCRATCH, container_security, labels, pod_security, system_pool

MOUNT = "/models"


def revisions(model: Model) -> list[str]:
    """Revisions that must be on the volume: the stable one and the canary, if any."""
    spec = model.spec
    revs = [spec.revision]
    if spec.canary is not None and spec.canary.revision not in revs:
        revs.append(spec.canary.revision)
    return revs


def source_at(source: str, revision: str) -> str:
    """hf:// sources name their revision in the URI; s3:// and directories are one revision."""
    if source.startswith("hf://"):
        return f"{source.split('@', 1)[0]}@{revision}"
    return source


def pull_command(model: Model, revision: str) -> tuple[list[str], list[str]]:
    """(command, args) of the pull Job: the weights land in MOUNT/<name>/<revision>.

    That is the directory the vLLM entrypoint serves: KServe mounts MOUNT/<name> at
    /mnt/models (storageUri pvc://models/<name>) and the predictor's
    SWITCHYARD_MODEL_REVISION names the sub-directory. `--revision` is explicit because
    s3:// and directory sources carry no revision of their own.
    """
    assert model.spec.source is not None  # config.load() rejects models without a source
    command = ["switchyard", "models", "pull", source_at(model.spec.source, revision)]
    return command, ["--dest", f"{MOUNT}/{model.spec.name}", "--revision", revision]


def job_name(model: Model, revision: str) -> str:
    digest = hashlib.sha256(f"{model.spec.source}|{revision}".encode()).hexdigest()[:8]
    return f"pull-{model.spec.name[:44]}-{digest}"


@dataclass
class ModelJobsArgs:
    models: tuple[Model, ...]
    namespace: pulumi.Input[str]
    pvc_name: pulumi.Input[str]
    image: pulumi.Input[str]
    """The gateway image: it carries the `switchyard` CLI."""
    provider: k8s.Provider
    hf_token: pulumi.Output[str] | None
    """Optional Hugging Face token for gated models; stored as a Kubernetes Secret."""


class ModelJobs(pulumi.ComponentResource):
    jobs: dict[tuple[str, str], k8s.batch.v1.Job]
    """(model name, revision) -> its pull Job, for InferenceServices to depend on."""

    def __init__(
        self, name: str, args: ModelJobsArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("switchyard:infra:ModelJobs", name, None, opts)
        self._name = name
        self._args = args
        token_secret = None
        if args.hf_token is not None:
            token_secret = k8s.core.v1.Secret(
                f"{name}-hf-token",
                metadata={"name": "hf-token", "namespace": args.namespace},
                string_data={"HF_TOKEN": pulumi.Output.secret(args.hf_token)},
                opts=pulumi.ResourceOptions(parent=self, provider=args.provider),
            )
        self.jobs = {}
        for model in args.models:
            for revision in revisions(model):
                self.jobs[(model.spec.name, revision)] = self._create_job(
                    model, revision, token_secret
                )
        self.register_outputs({"jobs": [j.metadata.name for j in self.jobs.values()]})

    def _create_job(
        self, model: Model, revision: str, token_secret: k8s.core.v1.Secret | None
    ) -> k8s.batch.v1.Job:
        a, spec = self._args, model.spec
        name = job_name(model, revision)
        command, args = pull_command(model, revision)
        container = {
            "name": "pull",
            "image": a.image,
            "command": command,
            "args": args,
            "env": [
                {
                    "name": "HF_TOKEN",
                    "valueFrom": {
                        "secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN", "optional": True}
                    },
                },
                {"name": "HOME", "value": SCRATCH},
            ],
            "resources": {
                "requests": {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "1Gi"},
                "limits": {"cpu": "2", "memory": "4Gi", "ephemeral-storage": "2Gi"},
            },
            "securityContext": container_security(),
            "volumeMounts": [
                {"name": "models", "mountPath": MOUNT},
                {"name": "tmp", "mountPath": SCRATCH},
            ],
        }
        return k8s.batch.v1.Job(
            f"{self._name}-{name}",
            metadata={
                "name": name,
                "namespace": a.namespace,
                "labels": labels("model-pull", **{"switchyard.dev/model": spec.name}),
            },
            spec={
                "backoffLimit": 4,  # the pull resumes, so a retry costs only what was missing
                "activeDeadlineSeconds": 6 * 3600,
                "template": {
                    "metadata": {"labels": labels("model-pull")},
                    "spec": {
                        "restartPolicy": "Never",
                        "automountServiceAccountToken": False,
                        "securityContext": pod_security(MODELS_UID),
                        "nodeSelector": system_pool(),
                        "containers": [container],
                        "volumes": [
                            {"name": "models", "persistentVolumeClaim": {"claimName": a.pvc_name}},
                            {"name": "tmp", "emptyDir": {}},
                        ],
                    },
                },
            },
            opts=pulumi.ResourceOptions(
                parent=self,
                provider=a.provider,
                depends_on=[token_secret] if token_secret else [],
                custom_timeouts=pulumi.CustomTimeouts(create="6h"),
            ),
        )
