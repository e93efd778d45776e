"""Rendering paths the stack files do not exercise yet: a canary in Standard (KEDA) mode."""

from __future__ import annotations

from typing import Any

from app.catalog import parse_catalog
from infra.config import Model, ServingMode
from infra.serving import predictor_url, render_gateway_catalog, render_inference_services
from policy.rules import ISVC, Res, inference_service_on_gpu
from tests.infra.k8s_schemas import validate

NS = "switchyard-models"
ENTRY: dict[str, Any] = {
    "name": "chat-large",
    "source": "hf://org/big",
    "revision": "aaa",
    "gpu": {"type": "nvidia-l40s", "count": 4, "instance_type": "g6e.12xlarge"},
    "replicas": {"min": 1, "max": 4},
    "canary": {"revision": "bbb", "traffic_percent": 25},
    "serving_mode": "standard",
}


def _model() -> tuple[Model, dict[str, Any]]:
    catalog = parse_catalog({"models": [ENTRY]})
    return Model(spec=catalog.models[0], mode=ServingMode.standard), catalog.model_dump(
        mode="json", exclude_none=True
    )


def test_standard_canary_is_a_second_service_sized_to_its_share() -> None:
    model, _ = _model()
    stable, canary = render_inference_services(model, NS, "http://prometheus:9090")
    assert (stable["name"], canary["name"]) == ("chat-large", "chat-large-canary")
    assert "canaryTrafficPercent" not in canary["spec"]["predictor"]
    assert (
        canary["spec"]["predictor"]["minReplicas"],
        canary["spec"]["predictor"]["maxReplicas"],
    ) == (
        1,
        1,
    )
    env = {e["name"]: e["value"] for e in canary["spec"]["predictor"]["model"]["env"]}
    assert env["SWITCHYARD_MODEL_SOURCE"] == "hf://org/big@bbb"
    for obj in (stable, canary):
        manifest = {
            "apiVersion": "serving.kserve.io/v1beta1",
            "kind": "InferenceService",
            "metadata": {**obj["metadata"], "annotations": obj["annotations"]},
            "spec": obj["spec"],
        }
        validate(manifest)
        assert inference_service_on_gpu(Res(ISVC, obj["name"], manifest)) == []


def test_gateway_splits_standard_canaries_itself() -> None:
    model, data = _model()
    rendered = render_gateway_catalog(data, (model,), NS)
    (entry,) = rendered["models"]
    assert entry["endpoints"] == [predictor_url("chat-large", NS)]
    assert entry["canary"]["endpoints"] == [predictor_url("chat-large-canary", NS)]
    assert parse_catalog(rendered).models[0].canary is not None


def test_aliases_in_stack_config_reach_the_gateway_catalogue() -> None:
    from infra.config import _models

    second = {**ENTRY, "name": "chat-large-v2", "revision": "ccc"}
    second.pop("canary")
    models, data = _models(
        [ENTRY, second],
        [
            {
                "name": "chat",
                "sticky": True,
                "targets": [
                    {"model": "chat-large", "weight": 95},
                    {"model": "chat-large-v2", "weight": 5},
                ],
            }
        ],
    )
    rendered = render_gateway_catalog(data, models, NS)
    alias = parse_catalog(rendered).alias("chat")
    assert alias is not None
    assert [(t.model, t.weight) for t in alias.targets] == [
        ("chat-large", 95),
        ("chat-large-v2", 5),
    ]


def test_bad_aliases_in_stack_config_fail_early() -> None:
    import pytest

    from infra.config import ConfigError, _models

    with pytest.raises(ConfigError, match="expected a list of aliases"):
        _models([ENTRY], {"chat": "chat-large"})
    with pytest.raises(ConfigError, match="alias 'chat' targets unknown model 'nope'"):
        _models([ENTRY], [{"name": "chat", "targets": [{"model": "nope", "weight": 1}]}])
