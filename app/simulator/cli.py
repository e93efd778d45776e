"""`switchyard simulate` / `python -m app.simulator`: serve one simulated vLLM replica.

Every SimulatorConfig field is a flag (`ttft_ms` -> `--ttft-ms`; booleans as `--hang` /
`--no-hang`), so flags, `POST /sim/config` keys and the dataclass never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from typing import Any

import uvicorn

from app.gc_tuning import freeze_startup_heap
from app.simulator.config import KINDS, SimulatorConfig
from app.simulator.server import QuietDrops, create_app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchyard simulate",
        description="Serve a simulated vLLM engine (OpenAI API + vLLM Prometheus metrics).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    hints = typing.get_type_hints(SimulatorConfig)
    for f in dataclasses.fields(SimulatorConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if args and typing.get_origin(hint) is not typing.Literal else hint
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": help_text}
        if f.name == "kind":
            kwargs["choices"] = KINDS
        elif base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif base in (int, float, str):
            kwargs["type"] = base
        parser.add_argument(flag, **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SimulatorConfig)}
    return SimulatorConfig(**values)


def serve(config: SimulatorConfig, host: str, port: int) -> None:
    """Run uvicorn (uvloop + httptools, no access log) until SIGINT/SIGTERM."""
    logging.getLogger("uvicorn.error").addFilter(QuietDrops())
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host=host,
            port=port,
            loop="uvloop",
            http="httptools",
            log_level="warning",
            access_log=False,
            lifespan="on",
            backlog=4096,
            timeout_keep_alive=75,
            # Hanging requests must not keep the process alive on SIGTERM.
            timeout_graceful_shutdown=1,
        )
    )
    print(
        f"switchyard simulator: model={config.model} kind={config.kind} "
        f"listening on http://{host}:{port}",
        file=sys.stderr,
        flush=True,
    )
    freeze_startup_heap()  # a benchmark's engine: its GC pauses would be everyone's latency
    server.run()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    serve(config, args.host, args.port)
    return 0
