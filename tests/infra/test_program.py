"""What must hold in production, checked on the real program for every stack file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from app.catalog import parse_catalog
from infra.serving import predictor_url
from policy.rules import GPU_TAINT_KEY, GPU_TYPE_LABEL, ISVC, Secret, reveal, violations
from tests.infra.harness import ECR_PASSWORD, ROOT, SENTINELS, STACK_FILES, StackRun, stack_config

MODELS_NS = "switchyard-models"


def catalogue(run: StackRun) -> list[dict[str, Any]]:
    path = next(p for p in STACK_FILES if p.name == f"Pulumi.{run.stack}.yaml")
    return json.loads(stack_config(path)["switchyard:models"])


def isvcs(run: StackRun) -> dict[str, dict[str, Any]]:
    return {reveal(r.props)["metadata"]["name"]: reveal(r.props) for r in run.of_type(ISVC)}


def test_every_stack_file_is_exercised() -> None:
    assert {p.name for p in STACK_FILES} >= {"Pulumi.staging.yaml", "Pulumi.prod.yaml"}


def test_program_passes_every_policy_rule(run: StackRun) -> None:
    assert violations(run.resources) == {}


def test_gpu_node_groups_are_tainted_and_labelled_per_gpu_type(run: StackRun) -> None:
    gpu_types = {m["gpu"]["type"] for m in catalogue(run)}
    groups = [reveal(r.props) for r in run.of_type("aws:eks/nodeGroup:NodeGroup")]
    gpu_groups = [g for g in groups if g["amiType"] == "AL2023_x86_64_NVIDIA"]
    assert {g["labels"][GPU_TYPE_LABEL] for g in gpu_groups} == gpu_types
    for g in gpu_groups:
        assert {"key": GPU_TAINT_KEY, "value": "true", "effect": "NO_SCHEDULE"} in g["taints"]
    system = [g for g in groups if g not in gpu_groups]
    assert len(system) == 1
    assert not system[0].get("taints")


def test_every_model_is_served_on_its_gpu_nodes_from_the_shared_volume(run: StackRun) -> None:
    services = isvcs(run)
    pvcs = [reveal(r.props) for r in run.of_type("kubernetes:core/v1:PersistentVolumeClaim")]
    assert [(p["metadata"]["name"], p["spec"]["accessModes"]) for p in pvcs] == [
        ("models", ["ReadWriteMany"])
    ]
    for model in catalogue(run):
        pred = services[model["name"]]["spec"]["predictor"]
        assert pred["nodeSelector"] == {GPU_TYPE_LABEL: model["gpu"]["type"]}
        assert {"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"} in pred[
            "tolerations"
        ]
        container = pred["model"]
        assert container["storageUri"] == f"pvc://models/{model['name']}"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(model["gpu"]["count"])
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"


def test_canary_percent_only_where_the_catalogue_sets_one(run: StackRun) -> None:
    services = isvcs(run)
    for model in catalogue(run):
        pred = services[model["name"]]["spec"]["predictor"]
        canary = model.get("canary")
        knative = model.get("serving_mode", "knative") == "knative"
        if canary and knative:
            assert pred["canaryTrafficPercent"] == canary["traffic_percent"]
            env = {e["name"]: e["value"] for e in pred["model"]["env"]}
            assert env["SWITCHYARD_MODEL_REVISION"] == canary["revision"]
        else:
            assert "canaryTrafficPercent" not in pred
        assert (f"{model['name']}-canary" in services) == bool(canary and not knative)


def test_serving_mode_decides_autoscaler(run: StackRun) -> None:
    services = isvcs(run)
    for model in catalogue(run):
        svc = services[model["name"]]
        notes = svc["metadata"]["annotations"]
        if model.get("serving_mode", "knative") == "knative":
            assert notes["serving.kserve.io/deploymentMode"] == "Serverless"
            assert notes["autoscaling.knative.dev/metric"] == "concurrency"
            assert notes["serving.knative.dev/progress-deadline"] == "3600s"
        else:
            assert notes["serving.kserve.io/deploymentMode"] == "RawDeployment"
            assert notes["serving.kserve.io/autoscalerClass"] == "keda"
            query = svc["spec"]["predictor"]["autoScaling"]["metrics"][0]["external"]["metric"]
            assert "vllm:num_requests_waiting" in query["query"]


def test_knative_accepts_what_gpu_predictors_use(run: StackRun) -> None:
    (knative,) = run.of_type("kubernetes:operator.knative.dev/v1beta1:KnativeServing")
    spec = reveal(knative.props)["spec"]
    features = spec["config"]["features"]
    for flag in ("nodeselector", "tolerations", "persistent-volume-claim", "securitycontext"):
        assert features[f"kubernetes.podspec-{flag}"] == "enabled"
    assert spec["config"]["deployment"]["progress-deadline"] == "3600s"


def test_inference_services_wait_for_their_weights(run: StackRun) -> None:
    by_urn = run.by_urn()
    for reg in run.registered:
        if reg.res.type != ISVC:
            continue
        deps = [by_urn[d].res for d in reg.dependencies if d in by_urn]
        pulled = {
            (reveal(d.props)["metadata"]["labels"]["switchyard.dev/model"])
            for d in deps
            if d.type == "kubernetes:batch/v1:Job"
        }
        model = reveal(reg.res.props)["metadata"]["labels"]["switchyard.dev/model"]
        assert pulled == {model}


def test_pull_jobs_cover_every_revision(run: StackRun) -> None:
    jobs = [reveal(r.props) for r in run.of_type("kubernetes:batch/v1:Job")]
    pulled = {tuple(j["spec"]["template"]["spec"]["containers"][0]["command"][3:4]) for j in jobs}
    wanted = set()
    for m in catalogue(run):
        base = m["source"].split("@")[0]
        for rev in [m["revision"], *([m["canary"]["revision"]] if m.get("canary") else [])]:
            wanted.add((f"{base}@{rev}",))
    assert pulled == wanted


def test_storage_and_cache_are_encrypted(run: StackRun) -> None:
    (efs,) = [reveal(r.props) for r in run.of_type("aws:efs/fileSystem:FileSystem")]
    assert efs["encrypted"] is True and efs["throughputMode"] == "elastic"
    (redis_res,) = run.of_type("aws:elasticache/replicationGroup:ReplicationGroup")
    redis = redis_res.props
    assert redis["transitEncryptionEnabled"] is True
    assert redis["atRestEncryptionEnabled"] is True
    assert isinstance(redis["authToken"], Secret)


def test_only_the_load_balancer_is_open_to_the_internet_and_only_on_443(run: StackRun) -> None:
    open_rules = []
    for sg in run.of_type("aws:ec2/securityGroup:SecurityGroup"):
        for rule in reveal(sg.props).get("ingress") or []:
            if "0.0.0.0/0" in (rule.get("cidrBlocks") or []):
                open_rules.append((sg.name, rule["protocol"], rule["fromPort"], rule["toPort"]))
    assert open_rules == [(f"switchyard-{run.stack}-lb", "tcp", 443, 443)]
    (svc,) = [
        reveal(r.props)
        for r in run.of_type("kubernetes:core/v1:Service")
        if reveal(r.props)["spec"]["type"] == "LoadBalancer"
    ]
    lb_annotations = svc["metadata"]["annotations"]
    assert lb_annotations["service.beta.kubernetes.io/aws-load-balancer-ssl-ports"] == "443"
    knative = reveal(run.of_type("kubernetes:operator.knative.dev/v1beta1:KnativeServing")[0].props)
    assert knative["spec"]["ingress"]["kourier"]["service-type"] == "ClusterIP"


def _leaks(value: Any, path: str) -> list[str]:
    if isinstance(value, Secret):
        return []
    if isinstance(value, dict):
        return [leak for k, v in value.items() for leak in _leaks(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [leak for i, v in enumerate(value) for leak in _leaks(v, f"{path}[{i}]")]
    return [path for s in SENTINELS if s in str(value)]


def test_no_secret_reaches_any_resource_in_plain_text(run: StackRun) -> None:
    leaks = [leak for r in run.resources for leak in _leaks(dict(r.props), r.name)]
    assert leaks == []
    # ...and they did reach where they are needed, as secrets.
    (secret,) = run.of_type("kubernetes:core/v1:Secret")[:1]
    data = reveal(secret.props)["stringData"]
    assert data["SWITCHYARD_STRIPE_API_KEY"] == SENTINELS[0]
    assert data["SWITCHYARD_REDIS_URL"].startswith(f"rediss://:{SENTINELS[2]}@master.")


def test_leak_detector_finds_a_plaintext_secret_and_ignores_marked_ones() -> None:
    leaked = {"data": {"catalog.yaml": f"stripe: {SENTINELS[0]}"}}
    assert _leaks(leaked, "cm") == ["cm.data.catalog.yaml"]
    assert _leaks({"data": Secret({"k": SENTINELS[0]})}, "cm") == []


def test_gateway_catalogue_is_the_stack_catalogue_pointed_at_predictors(run: StackRun) -> None:
    (cm,) = run.of_type("kubernetes:core/v1:ConfigMap")
    data = yaml.safe_load(reveal(cm.props)["data"]["catalog.yaml"])
    catalog = parse_catalog(data)  # the gateway's own parser accepts it
    assert catalog.names == tuple(m["name"] for m in catalogue(run))
    for model in catalog:
        assert model.endpoints == (predictor_url(model.name, MODELS_NS),)


def test_workloads_are_pinned_to_built_image_digests(run: StackRun) -> None:
    for dep in run.of_type("kubernetes:apps/v1:Deployment"):
        image = reveal(dep.props)["spec"]["template"]["spec"]["containers"][0]["image"]
        assert "@sha256:" in image


def test_images_build_from_the_repository_image_contexts(run: StackRun) -> None:
    images = [reveal(r.props) for r in run.of_type("docker-build:index:Image")]
    built = {
        (Path(i["context"]["location"]).resolve(), Path(i["dockerfile"]["location"]).resolve())
        for i in images
    }
    # the gateway image needs app/ and the lock: the repository root is its context
    assert built == {
        (ROOT, ROOT / "images" / "gateway" / "Dockerfile"),
        (ROOT / "images" / "vllm", ROOT / "images" / "vllm" / "Dockerfile"),
    }
    for _, dockerfile in built:
        assert dockerfile.exists(), dockerfile
    for image in images:
        assert image["push"] is True and image["platforms"] == ["linux/amd64"]
        # The registry password is an ECR token: the leak test below checks it stays secret.
        assert image["registries"][0]["password"] == ECR_PASSWORD


def test_outputs_expose_what_operators_need(run: StackRun) -> None:
    out = run.outputs
    assert out["api_url"].startswith("https://") and out["api_url"].endswith("/v1")
    assert "kubeconfig" in run.secret_outputs
    assert set(out["ecr_repository_urls"]) == {"gateway", "vllm"}
    assert out["efs_file_system_id"] and out["redis_endpoint"]


def test_kubernetes_objects_use_the_clusters_provider_never_the_ambient_kubeconfig(
    run: StackRun,
) -> None:
    (provider,) = run.of_type("pulumi:providers:kubernetes")
    kubeconfig = provider.props["kubeconfig"]
    assert isinstance(kubeconfig, Secret) and f"switchyard-{run.stack}" in kubeconfig.value
    for reg in run.registered:
        if reg.custom and reg.res.type.startswith("kubernetes:"):
            assert reg.provider.startswith(provider.urn + "::"), reg.res.name


def test_every_resource_belongs_to_a_component(run: StackRun) -> None:
    for reg in run.registered:
        if reg.custom:
            assert "switchyard:infra:" in reg.res.urn, reg.res.urn
            assert reg.res.name.startswith(f"switchyard-{run.stack}-"), reg.res.name
