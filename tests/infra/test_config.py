"""Stack config is validated before any resource exists, with messages that say what is allowed."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pulumi
import pytest

from infra import config
from tests.infra.harness import PROJECT, SECRET_CONFIG, STACK_FILES, stack_config, stack_name


class _NoResources(pulumi.runtime.Mocks):
    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        raise AssertionError("config.load() must not create resources")

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[Any]]:
        raise AssertionError("config.load() must not call providers")


def load(
    stack: str = "staging",
    overrides: Mapping[str, Any] | None = None,
    secrets: Mapping[str, str] | None = None,
    plain: Mapping[str, str] | None = None,
) -> config.Settings:
    """config.load() for a stack file with some keys replaced (objects merged one level)."""
    path = next(p for p in STACK_FILES if stack_name(p) == stack)
    cfg = stack_config(path)
    for key, value in (overrides or {}).items():
        full = f"switchyard:{key}"
        if isinstance(value, dict) and full in cfg:
            value = {**json.loads(cfg[full]), **value}
        if value is None:
            cfg.pop(full, None)
        else:
            cfg[full] = value if isinstance(value, str) else json.dumps(value)
    secret_values = dict(SECRET_CONFIG if secrets is None else secrets)
    pulumi.runtime.set_mocks(_NoResources(), project=PROJECT, stack=stack, preview=True)
    pulumi.runtime.set_all_config({**cfg, **secret_values, **(plain or {})}, list(secret_values))
    return config.load()


@pytest.mark.parametrize("path", STACK_FILES, ids=stack_name)
def test_every_stack_file_loads(path: Any) -> None:
    settings = load(stack_name(path))
    assert settings.prefix == f"switchyard-{stack_name(path)}"
    assert settings.models


def test_plaintext_secret_in_stack_config_is_refused() -> None:
    secrets = {k: v for k, v in SECRET_CONFIG.items() if not k.endswith("adminToken")}
    with pytest.raises(config.ConfigError, match=r"adminToken: stored in plain text.*--secret"):
        load(secrets=secrets, plain={"switchyard:adminToken": "hunter2"})


def test_missing_secret_says_how_to_set_it() -> None:
    secrets = {k: v for k, v in SECRET_CONFIG.items() if not k.endswith("stripeApiKey")}
    with pytest.raises(config.ConfigError, match=r"pulumi config set --secret stripeApiKey"):
        load(secrets=secrets)


def test_secrets_are_outputs_marked_secret() -> None:
    settings = load()

    async def is_secret() -> bool:
        return await settings.secrets.stripe_api_key.is_secret()

    assert pulumi.runtime.sync_await._sync_await(is_secret())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"network": {"azCount": 5}}, r"azCount: expected an integer in \[2, 3\]"),
        (
            {"cluster": {"gpuCapacityType": "CHEAP"}},
            r"'CHEAP' is not one of \['ON_DEMAND', 'SPOT'\]",
        ),
        ({"gateway": {"certificateArn": "arn:nope"}}, r"certificateArn: required, an ACM"),
        ({"images": {"tag": "latest"}}, r"not 'latest'"),
        ({"cache": {"nodes": 0}}, r"nodes: expected an integer in \[1, 6\]"),
        ({"cache": {"nodeTyp": "cache.t4g.small"}}, r"unknown key\(s\) \['nodeTyp'\]; allowed"),
        ({"tier": "dev"}, r"'dev' is not one of \['production', 'staging'\]"),
    ],
)
def test_bad_values_fail_early_listing_what_is_allowed(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(config.ConfigError, match=message):
        load(overrides=overrides)


def _staging_models(**change: Any) -> list[dict[str, Any]]:
    path = next(p for p in STACK_FILES if stack_name(p) == "staging")
    models: list[dict[str, Any]] = json.loads(stack_config(path)["switchyard:models"])
    models[0] = {**models[0], **change}
    return models


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gpu": {"type": "nvidia-l4", "count": 1, "instance_type": "g9.huge"}}, "is not one of"),
        ({"gpu": {"type": "nvidia-h100", "count": 1, "instance_type": "g6.xlarge"}}, "carries"),
        ({"gpu": {"type": "nvidia-l4", "count": 2, "instance_type": "g6.xlarge"}}, "count: 2 > 1"),
        ({"serving_mode": "serverless"}, r"serving_mode: Input should be 'knative' or 'standard'"),
        ({"source": None}, "source: required"),
        ({"endpoints": ["http://10.0.0.1:8000"]}, "endpoints: set by infra"),
        ({"name": "Bad_Name"}, "not a valid model name"),
    ],
)
def test_bad_catalogue_entries_fail_early(change: dict[str, Any], message: str) -> None:
    models = _staging_models(**change)
    if change.get("source", "x") is None:
        del models[0]["source"]
    with pytest.raises(config.ConfigError, match=message):
        load(overrides={"models": models})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"gateway": {"replicas": 1}}, "production needs >= 2"),
        ({"cache": {"nodes": 1}}, "multi-AZ automatic failover"),
        ({"cluster": {"gpuCapacityType": "SPOT"}}, "production serves from ON_DEMAND"),
        ({"network": {"azCount": 2}}, "production needs azCount 3"),
        ({"cluster": {"publicAccessCidrs": ["0.0.0.0/0"]}}, "must restrict the API endpoint"),
    ],
)
def test_production_tier_refuses_staging_shortcuts(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        load("prod", overrides=overrides)


def test_one_node_group_per_gpu_type_means_one_instance_type() -> None:
    models = _staging_models()
    models[1] = {
        **models[1],
        "gpu": {"type": "nvidia-l4", "count": 1, "instance_type": "g6.2xlarge"},
    }
    with pytest.raises(config.ConfigError, match="one node group"):
        load(overrides={"models": models})


def test_invalid_stack_name_is_refused() -> None:
    path = next(p for p in STACK_FILES if stack_name(p) == "staging")
    pulumi.runtime.set_mocks(_NoResources(), project=PROJECT, stack="Prod_EU", preview=True)
    pulumi.runtime.set_all_config({**stack_config(path), **SECRET_CONFIG}, list(SECRET_CONFIG))
    with pytest.raises(config.ConfigError, match="stack name 'Prod_EU'"):
        config.load()
