"""The ``switchyard`` command line.

Each sub-command is a thin shell around a module that does the work, so the same code runs
from the CLI, the tests and the container images.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from app.argtypes import positive_int
from app.auth.keys import Limits
from app.settings import Settings, SettingsError, load_settings

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> int:
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 30m, 12h or 30d")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _size(text: str) -> int:
    from app.models.commands import size

    return size(text)


def _settings(**overrides: Any) -> Settings:
    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        raise SystemExit(f"switchyard: configuration error: {exc}") from None


# -- gateway ------------------------------------------------------------------------------------


def cmd_gateway(args: argparse.Namespace) -> int:
    from functools import partial

    import uvicorn

    from app.http_protocol import GatewayHttpProtocol
    from app.logs import configure
    from app.server import create_app

    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port:
        overrides["port"] = args.port
    settings = _settings(**overrides)
    configure(settings.log_level)
    protocol = partial(
        GatewayHttpProtocol,
        head_timeout_s=settings.request_head_timeout_s,
        body_timeout_s=settings.request_body_timeout_s,
    )
    if not settings.catalog.models:
        print(
            "switchyard: warning: the catalogue is empty (set SWITCHYARD_CATALOG)", file=sys.stderr
        )
    if args.workers > 1:
        # Each worker process builds its own app from the environment (same settings).
        uvicorn.run(
            "app.server:app_from_env",
            factory=True,
            workers=args.workers,
            host=settings.host,
            port=settings.port,
            loop="uvloop",
            http=protocol,  # type: ignore[arg-type]
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=10,
        )
        return 0
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=protocol,  # type: ignore[arg-type]
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        limit_concurrency=args.limit_concurrency,
        h11_max_incomplete_event_size=64 * 1024,
    )
    uvicorn.Server(config).run()
    return 0


# -- keys ---------------------------------------------------------------------------------------


async def _with_store(fn: Any) -> Any:
    from app.auth.keys import KeyStore
    from app.server import redis_client

    redis = redis_client(_settings())
    try:
        return await fn(KeyStore(redis))
    finally:
        await redis.aclose()


def cmd_keys_create(args: argparse.Namespace) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    expires_at = time.time() + args.expires_in if args.expires_in else None

    model_limits = None
    if args.model_limits:
        try:
            model_limits = {
                m: Limits.model_validate(v) for m, v in json.loads(args.model_limits).items()
            }
        except (ValueError, AttributeError) as exc:
            raise SystemExit(f"switchyard: --model-limits: {exc}") from None

    async def go(store: Any) -> Any:
        return await store.create(
            model_limits=model_limits,
            max_concurrent=args.max_concurrent,
            customer=args.customer,
            models=models,
            rpm=args.rpm,
            tpm=args.tpm,
            expires_at=expires_at,
            name=args.name,
        )

    try:
        record, plaintext = asyncio.run(_with_store(go))
    except ValueError as exc:
        raise SystemExit(f"switchyard: {exc}") from None
    out = {**record.public(), "key": plaintext}
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"id:       {record.id}\ncustomer: {record.customer}\n"
            f"models:   {', '.join(record.models) if record.models else 'all'}\n"
            f"rpm/tpm:  {record.rpm or 'unlimited'}/{record.tpm or 'unlimited'}\n"
            f"key:      {plaintext}\n(the key is shown once and is not stored)"
        )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    async def go(store: Any) -> Any:
        return await store.list()

    records = asyncio.run(_with_store(go))
    if args.json:
        print(json.dumps([r.public() for r in records]))
        return 0
    print(f"{'ID':<14}{'CUSTOMER':<22}{'STATUS':<9}{'RPM':>8}{'TPM':>10}  MODELS")
    for r in records:
        p = r.public()
        models = ",".join(r.models) if r.models is not None else "*"
        print(
            f"{r.id:<14}{r.customer[:21]:<22}{p['status']:<9}{r.rpm or '-':>8}"
            f"{r.tpm or '-':>10}  {models}"
        )
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    async def go(store: Any) -> Any:
        return await store.revoke(args.id)

    record = asyncio.run(_with_store(go))
    if record is None:
        print(f"switchyard: no key with id {args.id!r}", file=sys.stderr)
        return 1
    print(json.dumps(record.public()) if args.json else f"revoked {record.id}")
    return 0


def cmd_customers_set_limits(args: argparse.Namespace) -> int:
    limits = Limits(rpm=args.rpm, tpm=args.tpm)

    async def go(store: Any) -> None:
        await store.set_customer_limits(args.customer, limits)

    try:
        asyncio.run(_with_store(go))
    except ValueError as exc:
        raise SystemExit(f"switchyard: {exc}") from None
    print(json.dumps({"customer": args.customer, **limits.model_dump()}))
    return 0


def cmd_billing_run(args: argparse.Namespace) -> int:
    from app.billing.worker import BillingWorker, install_sigint
    from app.logs import configure

    settings = _settings()
    configure(settings.log_level)
    worker = BillingWorker(settings, consumer=args.consumer)
    install_sigint(worker)
    worker.run()
    return 0


def _sync_redis() -> Any:
    import redis

    return redis.Redis.from_url(_settings().redis_url, socket_timeout=5)


def cmd_billing_dead_letters(args: argparse.Namespace) -> int:
    from app.billing.reports import dead_letters

    print(json.dumps(dead_letters(_sync_redis()), indent=2))
    return 0


def cmd_billing_resend(args: argparse.Namespace) -> int:
    from app.billing.worker import BillingWorker

    result = BillingWorker(_settings()).resend_dead_letter(args.identifier)
    print(
        json.dumps(
            {"identifier": args.identifier, "outcome": result.outcome, "detail": result.detail}
        )
    )
    return 0 if result.outcome == "sent" else 1


def cmd_billing_reconcile(args: argparse.Namespace) -> int:
    from app.billing.reports import reconcile

    rows = reconcile(_sync_redis())
    if args.json:
        print(json.dumps(rows))
    else:
        print(
            f"{'CUSTOMER':<20}{'METER':<28}{'RECORDED':>10}{'SENT':>10}{'WAITING':>9}"
            f"{'DEAD':>7}{'DIFF':>7}"
        )
        for r in rows:
            print(
                f"{r['customer'][:19]:<20}{r['meter'][:27]:<28}{r['recorded']:>10}"
                f"{r['sent']:>10}{r['waiting']:>9}{r['dead_letter']:>7}{r['difference']:>7}"
            )
    return 1 if any(r["difference"] for r in rows) else 0


def cmd_usage(args: argparse.Namespace) -> int:
    from app.billing.reports import usage
    from app.server import redis_client

    async def go() -> Any:
        client = redis_client(_settings())
        try:
            scope, ident = ("cus", args.customer) if args.customer else ("key", args.key)
            return await usage(client, scope, ident, args.days)
        finally:
            await client.aclose()

    print(json.dumps(asyncio.run(go()), indent=2))
    return 0


# -- models -------------------------------------------------------------------------------------


def cmd_models_pull(args: argparse.Namespace) -> int:
    from app.models.commands import run_pull

    return run_pull(args)


def cmd_models_list(args: argparse.Namespace) -> int:
    from app.models.commands import run_list

    return run_list(args)


# -- local platform, simulator, bench -------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from app.local.platform import run_platform

    return run_platform(port=args.port, state_dir=args.state_dir, replicas=args.replicas)


def cmd_simulate(args: argparse.Namespace, rest: list[str]) -> int:
    from app.simulator.cli import main as simulate

    return simulate(rest)


def cmd_pool(args: argparse.Namespace) -> int:
    """Replicas, health, load and traffic weights, from a running gateway's GET /admin/pool."""
    import httpx

    from app.routing.report import format_pool

    token = args.token
    if token is None:
        secret = _settings().admin_token
        token = secret.get_secret_value() if secret is not None else None
    if not token:
        raise SystemExit("switchyard pool: set SWITCHYARD_ADMIN_TOKEN or pass --token")
    try:
        r = httpx.get(
            f"{args.url.rstrip('/')}/admin/pool",
            headers={"authorization": f"Bearer {token}"},
            timeout=10,
        )
    except httpx.HTTPError as exc:
        raise SystemExit(f"switchyard pool: cannot reach {args.url}: {exc}") from None
    if r.status_code != 200:
        raise SystemExit(f"switchyard pool: HTTP {r.status_code}: {r.text[:300]}")
    print(json.dumps(r.json(), indent=2) if args.json else format_pool(r.json()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from app.bench.command import main as bench

    return bench(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switchyard", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run the whole platform locally (Redis, engines, gateway)")
    up.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    up.add_argument("--state-dir", default=".switchyard", help="logs, data and the catalogue")
    up.add_argument(
        "--replicas",
        type=positive_int,
        default=2,
        help="simulator replicas per chat model (default 2)",
    )
    up.set_defaults(fn=cmd_up)

    gw = sub.add_parser("gateway", help="serve the gateway (settings from SWITCHYARD_*)")
    gw.add_argument("--host", default=None)
    gw.add_argument("--port", type=int, default=None)
    gw.add_argument(
        "--workers", type=positive_int, default=1, help="worker processes sharing the port"
    )
    gw.add_argument(
        "--limit-concurrency",
        type=int,
        default=None,
        help="answer 503 above this many open connections",
    )
    gw.set_defaults(fn=cmd_gateway)

    sub.add_parser(
        "simulate", help="run the vLLM engine simulator (see simulate --help)", add_help=False
    )

    keys = sub.add_parser("keys", help="manage API keys (talks to SWITCHYARD_REDIS_URL)")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kc = ksub.add_parser("create", help="create a key; the plaintext is printed once")
    kc.add_argument("--customer", required=True, help="Stripe customer id, e.g. cus_123")
    kc.add_argument("--models", default=None, help="comma-separated model names (default: all)")
    kc.add_argument("--rpm", type=positive_int, default=None, help="requests per minute")
    kc.add_argument("--tpm", type=positive_int, default=None, help="tokens per minute")
    kc.add_argument("--expires-in", type=_duration, default=None, help="e.g. 30d, 12h")
    kc.add_argument("--name", default="", help="a label for humans")
    kc.add_argument(
        "--max-concurrent", type=positive_int, default=None, help="cap on concurrent requests"
    )
    kc.add_argument(
        "--model-limits",
        default=None,
        help='per-model budgets as JSON, e.g. \'{"chat-large": {"tpm": 10000}}\'',
    )
    kc.add_argument("--json", action="store_true", help="print one JSON object")
    kc.set_defaults(fn=cmd_keys_create)
    kl = ksub.add_parser("list", help="list keys (never their secrets)")
    kl.add_argument("--json", action="store_true")
    kl.set_defaults(fn=cmd_keys_list)
    kr = ksub.add_parser("revoke", help="revoke a key by id; effective everywhere within 1 s")
    kr.add_argument("id")
    kr.add_argument("--json", action="store_true")
    kr.set_defaults(fn=cmd_keys_revoke)

    billing = sub.add_parser("billing", help="usage aggregation and Stripe meter events")
    bsub = billing.add_subparsers(dest="billing_command", required=True, metavar="ACTION")
    br = bsub.add_parser("run", help="run a billing worker (any number may run)")
    br.add_argument("--consumer", default=None, help="consumer name (default: host + id)")
    br.set_defaults(fn=cmd_billing_run)
    bd = bsub.add_parser("dead-letters", help="meter events Stripe refused for good")
    bd.set_defaults(fn=cmd_billing_dead_letters)
    bs = bsub.add_parser("resend", help="send a dead-lettered meter event again")
    bs.add_argument("identifier")
    bs.set_defaults(fn=cmd_billing_resend)
    bc = bsub.add_parser("reconcile", help="recorded vs sent per customer and meter")
    bc.add_argument("--json", action="store_true")
    bc.set_defaults(fn=cmd_billing_reconcile)

    us = sub.add_parser("usage", help="daily token usage of a customer or a key")
    who = us.add_mutually_exclusive_group(required=True)
    who.add_argument("--customer")
    who.add_argument("--key", help="key id")
    us.add_argument("--days", type=positive_int, default=7)
    us.set_defaults(fn=cmd_usage)

    cust = sub.add_parser("customers", help="limits shared by all keys of a customer")
    csub = cust.add_subparsers(dest="customers_command", required=True, metavar="ACTION")
    cl = csub.add_parser("set-limits", help="set (or with no limit options, clear) the limits")
    cl.add_argument("customer")
    cl.add_argument("--rpm", type=positive_int, default=None)
    cl.add_argument("--tpm", type=positive_int, default=None)
    cl.set_defaults(fn=cmd_customers_set_limits)

    models = sub.add_parser("models", help="put model weights on the shared volume")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    mp = msub.add_parser(
        "pull", help="download, verify and publish one revision to DEST/<revision>"
    )
    mp.add_argument("source", help="hf://org/name@revision, s3://bucket/prefix or a directory")
    mp.add_argument("--dest", required=True, help="the model's directory on the volume")
    mp.add_argument(
        "--revision",
        default=None,
        help="names DEST/<revision> (default: the @revision of hf://, else main)",
    )
    mp.add_argument("--jobs", type=positive_int, default=4, help="files fetched at once")
    mp.add_argument(
        "--keep-free", type=_size, default=0, help="refuse unless this much stays free (10G)"
    )
    mp.add_argument(
        "--lock-stale-after",
        type=float,
        default=60.0,
        help="seconds without a heartbeat before another pull's lock is broken",
    )
    mp.add_argument("--progress", choices=("auto", "bar", "plain"), default="auto")
    mp.add_argument("--json", action="store_true", help="print the result as one JSON object")
    mp.set_defaults(fn=cmd_models_pull)
    ml = msub.add_parser("list", help="revisions on the volume, with sizes")
    ml.add_argument("dir", help="the volume root or one model's directory")
    ml.add_argument("--json", action="store_true")
    ml.set_defaults(fn=cmd_models_list)

    from app.bench.command import add_arguments

    pool = sub.add_parser("pool", help="a gateway's replicas, health, load and traffic weights")
    pool.add_argument("--url", default="http://127.0.0.1:8000", help="gateway base URL")
    pool.add_argument("--token", default=None, help="admin token (default SWITCHYARD_ADMIN_TOKEN)")
    pool.add_argument("--json", action="store_true", help="print GET /admin/pool as it is")
    pool.set_defaults(fn=cmd_pool)

    bench = sub.add_parser("bench", help="load-test a gateway or an engine")
    add_arguments(bench)
    bench.set_defaults(fn=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "simulate":
        return cmd_simulate(argparse.Namespace(), argv[1:])
    args = build_parser().parse_args(argv)
    result: int = args.fn(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
