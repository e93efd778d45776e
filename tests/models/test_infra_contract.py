"""The pull Job (infra/models.py), the CLI and the vLLM entrypoint agree on one path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.catalog import parse_catalog
from app.cli import build_parser
from infra.config import Model, ServingMode
from infra.models import MOUNT, pull_command
from infra.serving import render_inference_services
from tests.models.conftest import run

REPO = Path(__file__).resolve().parents[2]
ENTRY = {
    "name": "chat-small",
    "source": "hf://acme/tiny-llm",
    "revision": "0e9e39f249a16976918f6564b8830bc894c89659",
    "gpu": {"type": "nvidia-l4", "count": 1, "instance_type": "g6.xlarge"},
}


def model(**overrides: str) -> Model:
    catalog = parse_catalog({"models": [{**ENTRY, **overrides}]})
    return Model(spec=catalog.models[0], mode=ServingMode.knative)


@pytest.mark.parametrize("source", ["hf://acme/tiny-llm", "s3://weights/tiny", "/data/tiny"])
def test_the_job_command_parses_and_names_the_served_directory(source: str) -> None:
    m = model(source=source)
    command, args = pull_command(m, m.spec.revision)
    assert command[:3] == ["switchyard", "models", "pull"]
    parsed = build_parser().parse_args([*command[1:], *args])
    assert parsed.fn.__name__ == "cmd_models_pull"
    assert Path(parsed.dest) == Path(MOUNT) / "chat-small"
    assert parsed.revision == m.spec.revision

    (isvc,) = render_inference_services(m, "ns", "http://prometheus")
    container = isvc["spec"]["predictor"]["model"]
    env = {e["name"]: e["value"] for e in container["env"]}
    # KServe mounts <volume>/chat-small at /mnt/models; the entrypoint serves /mnt/models/<rev>.
    assert container["storageUri"] == "pvc://models/chat-small"
    assert env["SWITCHYARD_MODEL_REVISION"] == parsed.revision


def test_what_a_pull_publishes_is_what_the_entrypoint_serves(
    tmp_path: Path, env: dict[str, str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    m = model(source=str(src))
    command, args = pull_command(m, m.spec.revision)
    volume = tmp_path / "volume"
    args = [a.replace(MOUNT, str(volume)) for a in args]
    done = run(env, *command[2:], *args)
    assert done.returncode == 0, done.stderr

    stand_in = f"{sys.executable} -c 'import sys, json; print(json.dumps(sys.argv[1:]))'"
    served = subprocess.run(
        [sys.executable, str(REPO / "images" / "vllm" / "entrypoint.py")],
        env={
            **env,
            "SWITCHYARD_MODEL_ROOT": str(volume / "chat-small"),  # what KServe mounts
            "SWITCHYARD_MODEL_REVISION": m.spec.revision,
            "SWITCHYARD_VLLM_COMMAND": stand_in,
            "SWITCHYARD_READY_TIMEOUT": "2",
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert served.returncode == 0, served.stderr
    assert json.loads(served.stdout)[0] == str(volume / "chat-small" / m.spec.revision)
