"""ECR repositories and the two images built into them; Deployments use the pushed digests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_aws as aws
import pulumi_docker_build as docker_build

IMAGES = ("gateway", "vllm")


@dataclass
class ImagesArgs:
    repository_prefix: str
    """ECR names are account-wide: <project>-<stack>/<image> keeps stacks apart."""
    tag: str
    context_root: str
    """Directory of the image folders (images/gateway, images/vllm); the gateway builds from
    its parent, the repository root."""
    force_delete: bool
    """Staging may drop repositories with images in them; production keeps them."""
    tags: dict[str, str]


class Images(pulumi.ComponentResource):
    repository_urls: dict[str, pulumi.Output[str]]
    refs: dict[str, pulumi.Output[str]]
    """repo@sha256:... per image: a Deployment pinned to a digest cannot drift."""

    def __init__(
        self, name: str, args: ImagesArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("switchyard:infra:Images", name, None, opts)
        self._name = name
        self._args = args
        self.repository_urls = {}
        self.refs = {}
        for image in IMAGES:
            repo = self._create_repository(image)
            self.repository_urls[image] = repo.repository_url
            self.refs[image] = self._build(image, repo)
        self.register_outputs({"repository_urls": self.repository_urls, "refs": self.refs})

    def _create_repository(self, image: str) -> aws.ecr.Repository:
        child = pulumi.ResourceOptions(parent=self)
        repo = aws.ecr.Repository(
            f"{self._name}-{image}",
            name=f"{self._args.repository_prefix}/{image}",
            image_scanning_configuration=aws.ecr.RepositoryImageScanningConfigurationArgs(
                scan_on_push=True
            ),
            # A tag names one image forever, so a rollback really returns to the old bits.
            image_tag_mutability="IMMUTABLE",
            encryption_configurations=[
                aws.ecr.RepositoryEncryptionConfigurationArgs(encryption_type="KMS")
            ],
            force_delete=self._args.force_delete,
            tags=self._args.tags,
            opts=child,
        )
        aws.ecr.LifecyclePolicy(
            f"{self._name}-{image}",
            repository=repo.name,
            policy=json.dumps(_LIFECYCLE),
            opts=child,
        )
        return repo

    def _build(self, image: str, repo: aws.ecr.Repository) -> pulumi.Output[str]:
        token = aws.ecr.get_authorization_token_output(registry_id=repo.registry_id)
        root = Path(self._args.context_root)
        # The gateway image packages app/ and the lock, so its context is the repository root;
        # the vLLM image needs only its own folder.
        context = root.parent if image == "gateway" else root / image
        built = docker_build.Image(
            f"{self._name}-{image}",
            context=docker_build.BuildContextArgs(location=str(context)),
            dockerfile=docker_build.DockerfileArgs(location=str(root / image / "Dockerfile")),
            platforms=[docker_build.Platform.LINUX_AMD64],
            push=True,
            tags=[pulumi.Output.concat(repo.repository_url, ":", self._args.tag)],
            registries=[
                docker_build.RegistryArgs(
                    address=repo.repository_url,
                    username=token.user_name,
                    password=pulumi.Output.secret(token.password),
                )
            ],
            cache_from=[
                docker_build.CacheFromArgs(
                    registry=docker_build.CacheFromRegistryArgs(
                        ref=pulumi.Output.concat(repo.repository_url, ":buildcache")
                    )
                )
            ],
            cache_to=[
                docker_build.CacheToArgs(
                    registry=docker_build.CacheToRegistryArgs(
                        ref=pulumi.Output.concat(repo.repository_url, ":buildcache"),
                        image_manifest=True,
                        oci_media_types=True,
                    )
                )
            ],
            opts=pulumi.ResourceOptions(parent=self),
        )
        return built.ref


_LIFECYCLE = {
    "rules": [
        {
            "rulePriority": 1,
            "description": "untagged layers and build cache leftovers",
            "selection": {
                "tagStatus": "untagged",
                "countType": "sinceImagePushed",
                "countUnit": "days",
                "countNumber": 7,
            },
            "action": {"type": "expire"},
        },
        {
            "rulePriority": 2,
            "description": "keep the last 30 releases for rollbacks",
            "selection": {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": 30},
            "action": {"type": "expire"},
        },
    ]
}
