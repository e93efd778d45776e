"""The model catalogue: the one description of every model, read by the gateway and by infra/.

The gateway reads it from a YAML file (``SWITCHYARD_CATALOG``); the Pulumi program reads the same
schema from stack config and renders it into InferenceServices, download Jobs and the gateway's
ConfigMap. Only the name is required, so the minimal local form
``models: [{name: chat-small, endpoints: ["http://127.0.0.1:9001"]}]`` works.

This module must stay dependency-light (pydantic + yaml only): infra/ imports it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
_SOURCE_RE = re.compile(r"^(hf://[^@\s]+(@[^\s]+)?|s3://[^\s]+|file://[^\s]+|/[^\s]*)$")


class CatalogError(ValueError):
    """The catalogue is unusable; the message names the offending key."""


class ModelKind(StrEnum):
    chat = "chat"
    completion = "completion"
    embedding = "embedding"


class _Lenient(BaseModel):
    """Unknown keys are kept out and reported as a warning, not fatal: a newer catalogue must
    not take down an older gateway, but a typo should still be visible in the log."""

    model_config = ConfigDict(extra="allow", frozen=True)

    @model_validator(mode="after")
    def _warn_unknown(self) -> _Lenient:
        if self.model_extra:
            log.warning(
                "catalog: ignoring unknown key(s) %s in %s",
                sorted(self.model_extra),
                type(self).__name__,
            )
        return self


def _check_urls(v: tuple[str, ...]) -> tuple[str, ...]:
    """Static replica URLs, or ``dns+http://name:port``: every address the name resolves to is
    a replica (a headless Service's pods), re-resolved while the gateway runs."""
    for url in v:
        if not url.startswith(("http://", "https://", "dns+http://", "dns+https://")):
            raise ValueError(
                f"endpoint {url!r} must start with http://, https:// or dns+http(s)://"
            )
    return tuple(u.rstrip("/") for u in v)


class GPU(_Lenient):
    type: str = Field("nvidia-l4", description="GPU type; one node group per distinct type")
    count: int = Field(1, ge=1, le=16)
    instance_type: str = Field("g6.xlarge", description="EC2 instance type for this GPU type")


class Replicas(_Lenient):
    min: int = Field(1, ge=0, le=1000)
    max: int = Field(1, ge=1, le=1000)

    @model_validator(mode="after")
    def _ordered(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(f"replicas.min ({self.min}) must be <= replicas.max ({self.max})")
        return self


class Autoscaling(_Lenient):
    metric: str = Field("concurrency", pattern="^(concurrency|rps)$")
    target: int = Field(8, ge=1, le=10_000)


RoutingStrategyName = Literal["round_robin", "least_outstanding", "queue_aware", "prefix_aware"]


class CanaryGuard(_Lenient):
    """Rolls a canary back (weight 0) when it does clearly worse than the stable target.

    Over the last ``window_s`` seconds, once both sides have ``min_requests`` answers: the
    canary breaches when its error rate (5xx answers) exceeds ``stable * max_error_ratio +
    error_margin``, or its p95 time to first byte exceeds ``stable * max_ttft_ratio +
    ttft_margin_ms``. A rollback lasts until the gateway restarts or an operator resets it."""

    window_s: float = Field(60.0, gt=0, le=3600)
    min_requests: int = Field(20, ge=1)
    max_error_ratio: float = Field(2.0, ge=1.0)
    error_margin: float = Field(0.02, ge=0, le=1)
    max_ttft_ratio: float = Field(2.0, ge=1.0)
    ttft_margin_ms: float = Field(20.0, ge=0)


class Canary(_Lenient):
    """A new revision served beside the stable one with a share of the traffic."""

    revision: str
    traffic_percent: int = Field(5, ge=0, le=100)
    endpoints: tuple[str, ...] = Field(
        default=(), description="Replicas of the canary when the gateway splits the traffic"
    )
    sticky: bool = Field(False, description="Keep each API key on one side of the split")
    guard: CanaryGuard | None = None

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _check_urls(v)


class AliasTarget(_Lenient):
    model: str
    weight: float = Field(ge=0)


class Alias(_Lenient):
    """A public model name split by weight between catalogue models (e.g. 95/5 for a canary).

    The first target is the stable one; the others are canaries the guard may roll back. A key
    must be allowed the alias name itself; it needs no grant for the targets (the operator who
    defines the alias vouches for them), but fallbacks of a target still need their own grant."""

    name: str
    targets: tuple[AliasTarget, ...] = Field(min_length=1)
    sticky: bool = Field(False, description="Same key, same target (hash of the key id)")
    guard: CanaryGuard | None = None

    @model_validator(mode="after")
    def _weights(self) -> Alias:
        if sum(t.weight for t in self.targets) <= 0:
            raise ValueError(f"alias {self.name!r}: target weights must not all be 0")
        models = [t.model for t in self.targets]
        if len(set(models)) != len(models):
            raise ValueError(f"alias {self.name!r} lists a target twice")
        return self


class Meters(_Lenient):
    """Stripe meter event names for this model's tokens (input and output priced apart)."""

    input: str = "switchyard_input_tokens"
    output: str = "switchyard_output_tokens"


class ModelSpec(_Lenient):
    name: str
    kind: ModelKind = ModelKind.chat
    endpoints: tuple[str, ...] = Field(
        default=(), description="Static replica base URLs (local runs); in-cluster comes from infra"
    )
    source: str | None = Field(None, description="hf://org/name@revision, s3://bucket/prefix, /dir")
    revision: str = "main"
    served_name: str | None = Field(
        None, description="Model id the upstream engine answers to (default: name)"
    )
    max_model_len: int = Field(4096, ge=16, le=10_000_000)
    default_max_tokens: int = Field(
        256, ge=1, description="Expected completion length when a request gives no max_tokens"
    )
    gpu: GPU = GPU()
    replicas: Replicas = Replicas()
    autoscaling: Autoscaling = Autoscaling()
    serving_mode: Literal["knative", "standard"] = Field(
        "knative",
        description="knative: KServe canary + concurrency autoscaling; standard: KEDA on "
        "vllm:num_requests_waiting, canary split by the gateway",
    )
    queue_target: int = Field(2, ge=1, description="Waiting requests per replica (standard)")
    canary: Canary | None = None
    vllm_args: tuple[str, ...] = ()
    meters: Meters = Meters()
    fallbacks: tuple[str, ...] = ()
    routing: RoutingStrategyName | None = Field(
        None, description="Replica choice; default SWITCHYARD_ROUTING_STRATEGY"
    )
    shed_waiting: int | None = Field(
        None,
        ge=0,
        description="503 at once when every replica has more waiting requests than this; "
        "default SWITCHYARD_SHED_WAITING",
    )

    @field_validator("name")
    @classmethod
    def _dns_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(
                f"{v!r} is not a valid model name (lowercase letters, digits, '-' and '.', "
                "1-63 characters, starting and ending alphanumeric)"
            )
        return v

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _check_urls(v)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str | None) -> str | None:
        if v is not None and not _SOURCE_RE.match(v):
            raise ValueError(
                f"source {v!r} must be hf://org/name[@rev], s3://bucket/prefix or /dir"
            )
        return v

    @property
    def upstream_name(self) -> str:
        return self.served_name or self.name


class Catalog(_Lenient):
    models: tuple[ModelSpec, ...] = ()
    aliases: tuple[Alias, ...] = ()

    @model_validator(mode="after")
    def _unique(self) -> Catalog:
        seen: set[str] = set()
        for m in self.models:
            if m.name in seen:
                raise ValueError(f"model name {m.name!r} appears twice")
            seen.add(m.name)
        names = seen
        for m in self.models:
            for fb in m.fallbacks:
                if fb not in names:
                    raise ValueError(f"model {m.name!r} lists unknown fallback {fb!r}")
        for a in self.aliases:
            if a.name in seen:
                raise ValueError(f"alias {a.name!r} clashes with a model or alias of that name")
            seen.add(a.name)
            kinds = set()
            for t in a.targets:
                target = self.get(t.model)
                if target is None:
                    raise ValueError(f"alias {a.name!r} targets unknown model {t.model!r}")
                kinds.add(target.kind)
            if len(kinds) > 1:
                raise ValueError(f"alias {a.name!r} mixes model kinds {sorted(kinds)}")
        return self

    def alias(self, name: str) -> Alias | None:
        for a in self.aliases:
            if a.name == name:
                return a
        return None

    def get(self, name: str) -> ModelSpec | None:
        for m in self.models:
            if m.name == name:
                return m
        return None

    def __iter__(self) -> Iterator[ModelSpec]:  # type: ignore[override]
        return iter(self.models)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)


def _format_error(exc: ValidationError, where: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}: {loc or '<root>'}: {err['msg']}")
    return "; ".join(parts)


def parse_catalog(data: Any, where: str = "catalog") -> Catalog:
    """Validate already-loaded data (a dict from YAML or from Pulumi config)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CatalogError(f"{where}: expected a mapping with a 'models' list")
    try:
        return Catalog.model_validate(data)
    except ValidationError as exc:
        raise CatalogError(_format_error(exc, where)) from None


def load_catalog(path: str | Path) -> Catalog:
    """The catalogue in a YAML file; any unusable file raises CatalogError, nothing else."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"SWITCHYARD_CATALOG: cannot read {p}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise CatalogError(f"SWITCHYARD_CATALOG: {p} is not UTF-8 text: {exc.reason}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogError(f"SWITCHYARD_CATALOG: {p} is not valid YAML: {exc}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise CatalogError(f"SWITCHYARD_CATALOG: {p} is nested too deeply") from None
    return parse_catalog(data, where=str(p))
