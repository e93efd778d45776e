"""Switchyard: one stack is one whole environment. This file only wires the components."""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    # `pulumi up` runs this directory as a script; make `infra.*` importable like in tests.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pulumi

from infra import config
from infra.cache import Cache, CacheArgs
from infra.cluster import Cluster, ClusterArgs
from infra.gateway import Gateway, GatewayArgs
from infra.images import Images, ImagesArgs
from infra.models import ModelJobs, ModelJobsArgs
from infra.network import Network, NetworkArgs
from infra.serving import Serving, ServingArgs, render_gateway_catalog
from infra.storage import EFS_CSI_POLICY, ModelStorage, ModelStorageArgs

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODELS_NAMESPACE = "switchyard-models"
GATEWAY_NAMESPACE = "switchyard"

settings = config.load()
tags = {
    "switchyard:project": settings.project,
    "switchyard:stack": settings.stack,
    "switchyard:tier": settings.tier.value,
}
prefix = settings.prefix
production = settings.tier is config.Tier.production

network = Network(
    prefix,
    NetworkArgs(
        cidr=settings.network.cidr,
        az_count=settings.network.az_count,
        single_nat_gateway=settings.network.single_nat_gateway,
        cluster_name=prefix,
        tags=tags,
    ),
)
cluster = Cluster(
    prefix,
    ClusterArgs(
        name=prefix,
        settings=settings.cluster,
        vpc_id=network.vpc_id,
        private_subnet_ids=network.private_subnet_ids,
        tags=tags,
    ),
)
images = Images(
    prefix,
    ImagesArgs(
        repository_prefix=prefix,
        tag=settings.images.tag,
        # Relative to wherever the CLI runs us, so state does not embed this machine's paths.
        context_root=os.path.relpath(PROJECT_ROOT / settings.images.context_root),
        force_delete=not production,
        tags=tags,
    ),
)
storage = ModelStorage(
    prefix,
    ModelStorageArgs(
        vpc_id=network.vpc_id,
        private_subnet_ids=network.private_subnet_ids,
        node_security_group_id=cluster.node_security_group_id,
        cluster_name=cluster.cluster_name,
        csi_role_arn=cluster.irsa_role(
            "efs-csi", "kube-system", "efs-csi-controller-sa", [EFS_CSI_POLICY]
        ).arn,
        namespace=MODELS_NAMESPACE,
        provider=cluster.provider,
        tags=tags,
    ),
)
cache = Cache(
    prefix,
    CacheArgs(
        replication_group_id=prefix,
        settings=settings.cache,
        vpc_id=network.vpc_id,
        private_subnet_ids=network.private_subnet_ids,
        client_security_group_id=cluster.node_security_group_id,
        tags=tags,
    ),
)
jobs = ModelJobs(
    prefix,
    ModelJobsArgs(
        models=settings.models,
        namespace=storage.namespace,
        pvc_name=storage.pvc_name,
        image=images.refs["gateway"],
        provider=cluster.provider,
        hf_token=settings.secrets.hf_token,
    ),
)
serving = Serving(
    prefix,
    ServingArgs(
        models=settings.models,
        namespace=storage.namespace,
        namespace_name=MODELS_NAMESPACE,
        vllm_image=images.refs["vllm"],
        prometheus_url=settings.prometheus_url,
        pull_jobs=jobs.jobs,
        provider=cluster.provider,
        ha=production,
    ),
)
gateway = Gateway(
    prefix,
    GatewayArgs(
        namespace=GATEWAY_NAMESPACE,
        image=images.refs["gateway"],
        catalog=render_gateway_catalog(settings.catalog, settings.models, MODELS_NAMESPACE),
        redis_url=cache.url,
        stripe_api_key=settings.secrets.stripe_api_key,
        admin_token=settings.secrets.admin_token,
        replicas=settings.gateway.replicas,
        max_replicas=settings.gateway.max_replicas,
        hostname=settings.gateway.hostname,
        certificate_arn=settings.gateway.certificate_arn,
        allowed_cidrs=settings.gateway.allowed_cidrs,
        vpc_id=network.vpc_id,
        vpc_cidr=settings.network.cidr,
        hosted_zone_id=settings.gateway.hosted_zone_id,
        provider=cluster.provider,
        depends_on=[cluster.lb_controller, serving],
        tags=tags,
    ),
)

pulumi.export("api_url", gateway.api_url)
pulumi.export("load_balancer_hostname", gateway.load_balancer_hostname)
pulumi.export("kubeconfig", cluster.kubeconfig)
pulumi.export("cluster_name", cluster.cluster_name)
pulumi.export("ecr_repository_urls", images.repository_urls)
pulumi.export("efs_file_system_id", storage.file_system_id)
pulumi.export("redis_endpoint", cache.endpoint)
