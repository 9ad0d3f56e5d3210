"""Dockerfile and docker-compose.yml say only what the code accepts (no Docker engine here):
every command parses with sfrelay's own parser (or arq's), every SFRELAY_* name is a setting,
the exposed port is the default one, health checks ask routes the receiver serves."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from typing import Any

import click
import httpx
import pytest
import yaml
from arq.cli import cli as arq_cli
from arq.utils import import_string

from app.cli import build_parser
from app.config import PROJECT_ROOT, Settings
from app.main import create_app

DOCKERFILE = PROJECT_ROOT / "Dockerfile"
COMPOSE = PROJECT_ROOT / "docker-compose.yml"
DEFAULT_PORT = Settings.model_fields["port"].default
SETTING_NAMES = {f"SFRELAY_{name.upper()}" for name in Settings.model_fields}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile_stages(text: str) -> list[list[Instruction]]:
    """The Dockerfile's instructions per stage (line continuations joined, comments dropped)."""
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    stages: list[list[Instruction]] = [[]]  # stage 0: the ARGs before the first FROM
    for line in logical:
        keyword, _, args = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append(Instruction(keyword.upper(), args.strip()))
    return stages


def env_names(args: str) -> dict[str, str]:
    """ENV a=b c=d (or the legacy ENV a b) as a dict."""
    words = shlex.split(args)
    if len(words) >= 2 and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def sfrelay_accepts(argv: list[str]) -> None:
    """argv is an `sfrelay` command line its parser accepts (argparse exits on anything else)."""
    assert argv[0] == "sfrelay", argv
    scripts = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sfrelay"] == "app.cli:main"
    build_parser().parse_args(argv[1:])


def arq_accepts(argv: list[str]) -> None:
    """argv is an `arq` command line: its options parse, its settings class imports."""
    assert argv[0] == "arq", argv
    context = arq_cli.make_context("arq", argv[1:])
    # A dict (workers.main builds it from the SFRELAY_* environment), what --check reads.
    settings = import_string(context.params["worker_settings"])
    assert {"functions", "redis_settings", "queue_name"} <= set(settings)
    assert context.params["check"] is True


async def status_of(path: str) -> int:
    """The status the receiver's own app answers a GET of `path` with."""
    app = create_app(Settings(_env_file=None, env="development"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        return (await client.get(path)).status_code


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    return dockerfile_stages(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_the_dockerfile_builds_with_uv_and_runs_without_it(stages: list[list[Instruction]]) -> None:
    builder, final = stages[1], stages[-1]
    assert len(stages) == 3  # ARGs, builder, final: one image
    assert builder[0].args.endswith(" AS builder")
    assert any(i.keyword == "RUN" and "uv sync --frozen --no-dev" in i.args for i in builder)
    runs = " ".join(i.args for i in final if i.keyword == "RUN")
    assert "uv " not in runs and "pip install" not in runs and "apt-get" not in runs
    copies = [i.args for i in final if i.keyword == "COPY"]
    assert copies == [
        "--from=builder /opt/venv /opt/venv",
        "--from=builder /srv/sfrelay/app ./app",
        "--from=builder /srv/sfrelay/workers ./workers",
        "--from=builder /srv/sfrelay/wsdl ./wsdl",
    ]
    # What the builder copies in exists here.
    for instruction in builder:
        if instruction.keyword == "COPY":
            *sources, _target = instruction.args.split()
            assert all((PROJECT_ROOT / source).exists() for source in sources), instruction
    [user] = [i.args for i in final if i.keyword == "USER"]
    assert user not in ("root", "0")
    assert f"useradd --system --uid 10001 --no-create-home {user}" in runs


async def test_the_dockerfile_command_port_health_check_and_settings_are_the_codes(
    stages: list[list[Instruction]],
) -> None:
    final = stages[-1]
    [cmd] = [i.args for i in final if i.keyword == "CMD"]
    sfrelay_accepts(json.loads(cmd))
    [expose] = [i.args for i in final if i.keyword == "EXPOSE"]
    assert int(expose) == DEFAULT_PORT
    env: dict[str, str] = {}
    for instruction in (i for stage in stages for i in stage if i.keyword == "ENV"):
        env.update(env_names(instruction.args))
    sfrelay_names = {name for name in env if name.startswith("SFRELAY_")}
    assert sfrelay_names and sfrelay_names <= SETTING_NAMES
    assert int(env["SFRELAY_PORT"]) == DEFAULT_PORT
    given = {k.removeprefix("SFRELAY_").lower(): v for k, v in env.items() if k in SETTING_NAMES}
    settings = Settings(_env_file=None, **given)
    assert settings.host == "0.0.0.0"  # reachable from outside the container
    [health] = [i.args for i in final if i.keyword == "HEALTHCHECK"]
    [(port, path)] = re.findall(r"http://127\.0\.0\.1:(\d+)(/[\w/-]*)", health)
    assert int(port) == DEFAULT_PORT
    assert path == "/healthz"
    assert await status_of(path) == 200


def test_compose_commands_health_checks_ports_and_settings_are_the_codes(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "receiver", "worker"}
    for name in ("receiver", "worker"):
        service = services[name]
        assert service["build"] == "."  # the one image
        sfrelay_accepts(service["command"])
        names = set(service.get("environment", {}))
        assert names <= SETTING_NAMES, names - SETTING_NAMES
        redis_url = service["environment"]["SFRELAY_REDIS_URL"]
        assert re.fullmatch(r"redis://redis:6379/0", redis_url)  # the redis service
    # Each comes back by itself, the worker also after exit 0 (it exits to shed memory).
    assert {s.get("restart") for s in services.values()} == {"unless-stopped"}
    assert services["receiver"]["command"][:2] == ["sfrelay", "serve"]
    assert services["worker"]["command"] == ["sfrelay", "worker"]
    [mapping] = services["receiver"]["ports"]
    assert int(mapping.rsplit(":", 1)[1]) == DEFAULT_PORT
    test = services["worker"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    arq_accepts(test[1:])
    # Redis keeps what was acked: AOF fsynced before each reply, never evicting jobs.
    redis_command = services["redis"]["command"]
    assert redis_command[0] == "redis-server"
    options = dict(zip(redis_command[1::2], redis_command[2::2], strict=True))
    assert options == {
        "--appendonly": "yes",
        "--appendfsync": "always",
        "--maxmemory-policy": "noeviction",
    }


async def test_a_command_or_setting_the_code_does_not_know_is_caught() -> None:
    """The checks above can fail: what a typo in either file would look like."""
    with pytest.raises(SystemExit):
        sfrelay_accepts(["sfrelay", "serve", "--threads", "2"])
    with pytest.raises(click.UsageError):
        arq_accepts(["arq", "workers.main.WorkerSettings", "--healthcheck"])
    with pytest.raises(ImportError):
        arq_accepts(["arq", "workers.main.WorkerSetting", "--check"])
    assert "SFRELAY_REDIS" not in SETTING_NAMES
    assert await status_of("/health") == 404
    stages = dockerfile_stages('FROM a AS builder\nRUN x \\\n  y\n# c\nFROM b\nCMD ["x"]\n')
    assert stages[1] == [Instruction("FROM", "a AS builder"), Instruction("RUN", "x    y")]
