#!/usr/bin/env python3
"""Start vLLM's OpenAI server on a model revision from the shared volume, never the internet.

Standard library only: it runs on the vLLM image's Python, before anything else.

1. Resolve the model directory: $SWITCHYARD_MODEL_ROOT/$SWITCHYARD_MODEL_REVISION (KServe
   mounts the model's directory of the volume at /mnt/models; the pull Job published the
   revision under it). A root that is itself a published revision is served as is.
2. Wait for the revision's ready marker (written last by `switchyard models pull`), up to
   $SWITCHYARD_READY_TIMEOUT seconds, so a replica never loads a half-copied model.
3. Force offline mode (HF_HUB_OFFLINE=1 and friends) and exec the server:
   `vllm serve <dir> --served-model-name ... --max-model-len ... --gpu-memory-utilization ...
   --tensor-parallel-size ... --safetensors-load-strategy eager <arguments given to us>`.

Arguments given to the container (the ServingRuntime's `--port`, the catalogue's vllm_args)
are passed on and win over the environment's defaults, except `--served-model-name`: the
runtime template fills it with the InferenceService name (`<model>-canary` for a Standard
canary) while the gateway asks for SWITCHYARD_SERVED_NAME, so the environment wins there.
`--model` is dropped: the volume path is the only model a replica may serve.
$SWITCHYARD_VLLM_COMMAND replaces `vllm serve` (tests use a stand-in that prints its argv).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

READY_MARKER = ".switchyard-ready"
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
# env var -> (flag, default); an empty value leaves the flag to vLLM's own default.
FLAGS = {
    "SWITCHYARD_MAX_MODEL_LEN": ("--max-model-len", ""),
    "SWITCHYARD_GPU_MEMORY_UTILIZATION": ("--gpu-memory-utilization", "0.90"),
    "SWITCHYARD_TENSOR_PARALLEL_SIZE": ("--tensor-parallel-size", "1"),
    # mmap'd safetensors page in slowly over NFS; eager reads each file sequentially.
    "SWITCHYARD_SAFETENSORS_LOAD_STRATEGY": ("--safetensors-load-strategy", "eager"),
}


def log(message: str) -> None:
    print(f"switchyard-vllm: {message}", file=sys.stderr, flush=True)


class Fatal(Exception):
    pass


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _drop_flag(args: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == flag:
            skip = True  # its value is the next argument
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def model_dir(env: dict[str, str]) -> Path:
    root = Path(env.get("SWITCHYARD_MODEL_ROOT", "/mnt/models"))
    if (root / READY_MARKER).exists():
        return root
    revision = env.get("SWITCHYARD_MODEL_REVISION", "")
    if not revision or "/" in revision or revision in {".", ".."}:
        raise Fatal(f"SWITCHYARD_MODEL_REVISION must name a revision under {root}: {revision!r}")
    return root / revision


def wait_ready(directory: Path, timeout: float, poll: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        try:
            marker = json.loads((directory / READY_MARKER).read_text())
        except FileNotFoundError:
            marker = None
        except ValueError as exc:
            raise Fatal(f"{directory / READY_MARKER} is not valid JSON: {exc}") from None
        if isinstance(marker, dict):
            return marker
        if time.monotonic() >= deadline:
            raise Fatal(
                f"{directory / READY_MARKER} did not appear within {timeout:.0f}s: has the pull "
                "Job for this revision succeeded? (`switchyard models list /models`)"
            )
        if not announced:
            log(f"waiting for {directory / READY_MARKER} (the pull Job publishes it last)")
            announced = True
        time.sleep(poll)


def build_command(env: dict[str, str], directory: Path, args: list[str]) -> list[str]:
    command = shlex.split(env.get("SWITCHYARD_VLLM_COMMAND", "vllm serve"))
    if _has_flag(args, "--model"):
        log("ignoring --model: a replica serves the revision on the volume")
        args = _drop_flag(args, "--model")
    served = env.get("SWITCHYARD_SERVED_NAME", "")
    out = [*command, str(directory)]
    if served:
        args = _drop_flag(args, "--served-model-name")
        out += ["--served-model-name", served]
    for var, (flag, default) in FLAGS.items():
        value = env.get(var, default)
        if not value or _has_flag(args, flag):
            continue
        if flag == "--safetensors-load-strategy" and _has_flag(args, "--load-format"):
            continue  # another loader (e.g. runai_streamer) was chosen explicitly
        out += [flag, value]
    return out + args


def main(argv: list[str]) -> int:
    env = dict(os.environ)
    try:
        directory = model_dir(env)
        timeout = float(env.get("SWITCHYARD_READY_TIMEOUT", "1800"))
        poll = float(env.get("SWITCHYARD_READY_POLL", "2"))
        marker = wait_ready(directory, timeout, poll)
        command = build_command(env, directory, argv)
    except (Fatal, ValueError) as exc:
        log(f"error: {exc}")
        return 1
    env.update(OFFLINE)
    log(f"serving {directory} (source {marker.get('source')}, commit {marker.get('commit')})")
    log("exec " + shlex.join(command))
    try:
        os.execvpe(command[0], command, env)  # noqa: S606 (argv list, no shell)
    except OSError as exc:
        log(f"error: cannot start {command[0]}: {exc}")
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
