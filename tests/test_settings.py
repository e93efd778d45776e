"""Settings come from SWITCHYARD_* and the catalogue; bad values stop start-up by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.catalog import CatalogError, ModelKind, load_catalog, parse_catalog
from app.settings import SettingsError, load_settings


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("models: [{name: chat-small, endpoints: ['http://127.0.0.1:9001/']}]\n")
    monkeypatch.setenv("SWITCHYARD_REDIS_URL", "redis://10.0.0.1:6380/2")
    monkeypatch.setenv("SWITCHYARD_CATALOG", str(catalog))
    monkeypatch.setenv("SWITCHYARD_BILLING_WINDOW_S", "30")
    monkeypatch.setenv("SWITCHYARD_ADMIN_TOKEN", "s3cret")
    s = load_settings()
    assert s.redis_url == "redis://10.0.0.1:6380/2"
    assert s.billing_window_s == 30
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)
    spec = s.catalog.get("chat-small")
    assert spec is not None and spec.endpoints == ("http://127.0.0.1:9001",)
    assert spec.kind is ModelKind.chat


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("SWITCHYARD_PORT", "eighty"),
        ("SWITCHYARD_PORT", "70000"),
        ("SWITCHYARD_REDIS_URL", "http://localhost"),
        ("SWITCHYARD_BILLING_WINDOW_S", "0"),
        ("SWITCHYARD_KEY_CACHE_TTL_S", "5"),
        ("SWITCHYARD_STRIPE_API_BASE", "ftp://stripe"),
        ("SWITCHYARD_LOG_LEVEL", "loud"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=var):
        load_settings()


def test_missing_catalogue_file_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHYARD_CATALOG", "/nonexistent/catalog.yaml")
    with pytest.raises(SettingsError, match=r"SWITCHYARD_CATALOG.*cannot read"):
        load_settings()


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"models": [{"name": "Bad_Name"}]}, "models.0.name"),
        ({"models": [{"name": "a", "endpoints": ["ftp://x"]}]}, "models.0.endpoints"),
        ({"models": [{"name": "a"}, {"name": "a"}]}, "appears twice"),
        ({"models": [{"name": "a", "kind": "vision"}]}, "models.0.kind"),
        ({"models": [{"name": "a", "replicas": {"min": 3, "max": 1}}]}, "replicas.min"),
        ({"models": [{"name": "a", "fallbacks": ["b"]}]}, "unknown fallback"),
        ({"models": "chat"}, "models"),
        ([1, 2], "mapping"),
    ],
)
def test_catalogue_errors_name_the_key(data: object, fragment: str) -> None:
    with pytest.raises(CatalogError, match=fragment):
        parse_catalog(data)


def test_minimal_catalogue_form(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "models:\n  - name: chat-small\n    endpoints: ['http://127.0.0.1:9001']\n"
        "  - name: embed\n    kind: embedding\n    endpoints: ['http://127.0.0.1:9002']\n"
    )
    catalog = load_catalog(f)
    assert catalog.names == ("chat-small", "embed")
    assert catalog.get("embed").kind is ModelKind.embedding  # type: ignore[union-attr]


def test_unknown_catalogue_keys_are_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    catalog = parse_catalog({"models": [{"name": "a", "colour": "blue"}]})
    assert catalog.names == ("a",)
    assert "colour" in caplog.text


def test_invalid_yaml_is_reported(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("models: [unclosed\n")
    with pytest.raises(CatalogError, match="not valid YAML"):
        load_catalog(f)


def test_gateway_refuses_to_start_on_bad_settings() -> None:
    env = {**os.environ, "SWITCHYARD_PORT": "not-a-port"}
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "gateway"],
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0
    assert "SWITCHYARD_PORT" in out.stderr
    assert "Traceback" not in out.stderr
