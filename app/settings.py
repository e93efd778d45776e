"""Typed settings: environment (`SWITCHYARD_*`) + the model catalogue YAML -> one frozen object.

Config flows one way: env -> Settings -> create_app(settings). Nothing else reads the
environment. A bad value stops start-up with a message naming the variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.catalog import (
    Catalog,
    CatalogError,
    RoutingStrategyName,
    load_catalog,
    parse_catalog,
)

ENV_PREFIX = "SWITCHYARD_"


class SettingsError(ValueError):
    """Start-up configuration is invalid; the message names the environment variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="ignore", case_sensitive=False
    )

    redis_url: str = "redis://127.0.0.1:6379/0"
    catalog: Annotated[Catalog, NoDecode] = Field(
        default_factory=Catalog, description="Path of the model catalogue YAML"
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    admin_token: SecretStr | None = None
    stripe_api_key: SecretStr | None = None
    stripe_api_base: str = "https://api.stripe.com"
    billing_window_s: int = Field(60, ge=1, le=3600)
    spool_dir: Path = Field(
        Path(".switchyard/spool"), description="Usage events wait here while Redis is away"
    )
    stripe_max_events_per_s: float = Field(20.0, gt=0, le=1000)
    stripe_timeout_s: float = Field(10.0, gt=0, le=120)
    billing_reclaim_idle_s: float = Field(
        30.0, gt=0, description="A stream entry unacknowledged this long belongs to a dead worker"
    )
    billing_health_port: int | None = Field(None, ge=1, le=65535)
    billing_poll_s: float = Field(
        0.1,
        ge=0,
        le=10,
        description="While not behind, the billing worker reads the usage stream at most this "
        "often: one read and fold per interval, not one per request",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Hot-path limits and timeouts.
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    request_head_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="A request line and headers must arrive within this"
    )
    request_body_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="A request body must arrive within this of its headers"
    )
    key_cache_ttl_s: float = Field(
        1.0, gt=0, le=1.0, description="Bounds how long a revoked key keeps working (<= 1 s)"
    )
    connect_timeout_s: float = Field(3.0, gt=0)
    first_token_timeout_s: float = Field(60.0, gt=0)
    total_timeout_s: float = Field(600.0, gt=0)
    upstream_retries: int = Field(2, ge=0, le=10)
    health_interval_s: float = Field(2.0, gt=0)

    # Routing (app/routing/).
    routing_strategy: RoutingStrategyName = Field(
        "least_outstanding", description="Default replica choice; a model's `routing` overrides"
    )
    load_scrape_interval_s: float = Field(
        1.0, gt=0, le=60, description="How often replicas' /metrics are read (queue-aware, shed)"
    )
    shed_waiting: int | None = Field(
        None, ge=0, description="Default load-shedding threshold (waiting requests per replica)"
    )
    shed_retry_after_s: int = Field(1, ge=1, le=600)
    prefix_chars: int = Field(
        512, ge=16, le=100_000, description="Prompt characters hashed by prefix-aware routing"
    )
    prefix_busy_slack: int = Field(
        4, ge=0, description="Prefix-aware: leave the prefix's replica when it is this much busier"
    )
    eject_after_failures: int = Field(3, ge=1, le=100)
    eject_for_s: float = Field(10.0, gt=0, le=3600)
    canary_guard_interval_s: float = Field(1.0, gt=0, le=60)
    discovery_interval_s: float = Field(
        10.0, gt=0, le=3600, description="How often dns+http:// endpoints are re-resolved"
    )

    # Rate limiting.
    ratelimit_failure_mode: Literal["fail_open", "fail_closed"] = Field(
        "fail_open", description="What happens while Redis is unreachable"
    )
    limiter_timeout_s: float = Field(0.25, gt=0, le=5)
    limiter_overlap: bool = Field(
        True,
        description="Send a request upstream while its rate-limit decision is pending when the "
        "key's budgets have ample headroom (the decision still rules; saves a Redis round trip "
        "of latency)",
    )
    gateway_replicas: int = Field(
        1, ge=1, description="Floor of the replica count used for fail-open fair shares"
    )
    upstream_max_connections: int = Field(
        1024, ge=1, description="Idle connections kept open to each replica, at most"
    )
    gc_freeze: bool = Field(
        True,
        description="Once started, exempt the start-up heap from garbage collection (a full "
        "collection over it paused every request for up to 72 ms); off only where several "
        "gateways share one process, as in tests",
    )

    @field_validator("catalog", mode="before")
    @classmethod
    def _load_catalog(cls, v: Any) -> Any:
        if v is None or v == "":
            return Catalog()
        if isinstance(v, str | Path):
            return load_catalog(v)
        if isinstance(v, dict):
            return parse_catalog(v)
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @field_validator("stripe_api_base")
    @classmethod
    def _http_base(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")


def load_settings(**overrides: Any) -> Settings:
    """Build Settings from the environment; turn validation errors into one readable message."""
    try:
        return Settings(**overrides)
    except CatalogError as exc:
        raise SettingsError(f"{ENV_PREFIX}CATALOG: {exc}") from None
    except ValidationError as exc:
        msgs = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            msgs.append(f"{ENV_PREFIX}{field.upper()}: {err['msg']}")
        raise SettingsError("; ".join(msgs)) from None
