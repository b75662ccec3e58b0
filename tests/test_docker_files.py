"""Static checks of docker/Dockerfile and docker/compose.yaml.

No Docker engine runs where the tests run, so the image is never built here: these tests read
the files and check what can be checked without one (every COPY source exists and is not
ignored, the image's torch is kept, the compose file parses, the trainer's command names files
that exist and a config that validates, the tracking URI names the MLflow service and its port,
and that server accepts that Host name).
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
COMPOSE = DOCKER / "compose.yaml"


# --------------------------------------------------------------------------- Dockerfile parsing
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, `\\` continuations joined, heredoc
    bodies (`<<'EOF'` ... `EOF`) kept inside their instruction."""
    lines = path.read_text().splitlines()
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        text = line
        while text.endswith("\\") and i < len(lines):
            text = text[:-1] + " " + lines[i].strip()
            i += 1
        for marker in re.findall(r"<<-?['\"]?(\w+)['\"]?", text):
            body = []
            while i < len(lines) and lines[i].strip() != marker:
                body.append(lines[i])
                i += 1
            i += 1  # the terminator
            text += "\n" + "\n".join(body)
        word, _, rest = text.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_args() -> dict[str, str | None]:
    args = {}
    for word, rest in dockerfile_instructions(DOCKERFILE):
        if word == "ARG":
            name, eq, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"') if eq else None
    return args


def ignored(rel: str, patterns: list[str]) -> bool:
    rel = rel.strip("/")
    parts = rel.split("/")
    for pattern in patterns:
        pattern = pattern.strip("/")
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(p, pattern[3:]) for p in parts):
                return True
        # a pattern matching a folder ignores everything below it
        elif any(fnmatch.fnmatch("/".join(parts[:n]), pattern) for n in range(1, len(parts) + 1)):
            return True
    return False


def ignore_patterns() -> list[str]:
    if not DOCKERIGNORE.exists():
        return []
    return [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def test_base_image_is_a_cuda_pytorch_image():
    instructions = dockerfile_instructions(DOCKERFILE)
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) == 1, froms
    base = froms[0].split()[0]
    if base.startswith("${"):
        base = dockerfile_args()[base.strip("${}")]
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+(\.\d+)?-cuda\d+(\.\d+)*-cudnn\d+-(runtime|devel)", base), base


def test_copy_sources_exist_and_are_not_ignored():
    patterns = ignore_patterns()
    copies = [rest for word, rest in dockerfile_instructions(DOCKERFILE) if word in ("COPY", "ADD")]
    assert copies, "the Dockerfile copies nothing"
    for rest in copies:
        words = [w for w in shlex.split(rest) if not w.startswith("--")]
        assert "--from" not in rest, rest
        *sources, _dest = words
        assert sources, rest
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository (the build context)"
            assert not ignored(src, patterns), f"COPY {src}: excluded by {DOCKERIGNORE.name}"
    # what setup.cfg needs to install the package is copied
    copied = {s.rstrip("/") for rest in copies for s in shlex.split(rest)[:-1]}
    for needed in ("setup.cfg", "pyproject.toml", "README.md", "gps_ds", "launchers", "configs"):
        assert needed in copied, f"{needed} is not copied into the image"


def test_dockerignore_keeps_local_state_out():
    patterns = ignore_patterns()
    for local in (".venv", ".git", "runs", "gps_ds/__pycache__"):
        assert ignored(local, patterns), f"{local} would be sent to the build context"


def test_image_keeps_its_torch_and_ds_build_ops_is_optional():
    args = dockerfile_args()
    assert args.get("DS_BUILD_OPS") == "0", "DS_BUILD_OPS must be a build arg, off by default"
    runs = [rest for word, rest in dockerfile_instructions(DOCKERFILE) if word == "RUN"]
    pip_installs = [seg for rest in runs for seg in re.split(r"&&|;|\n", rest) if "pip install" in seg]
    assert pip_installs
    for seg in pip_installs:
        tokens = shlex.split(seg.replace("\\", " "))
        after = tokens[tokens.index("install") + 1:]
        assert not any(re.match(r"^(torch|torchvision)([=<>!~ ]|$)", t) for t in after), f"reinstalls torch: {seg}"
        assert "-c" in after or "--constraint" in after, f"pip install without the keep-torch constraints: {seg}"
    assert any("-e" in shlex.split(seg) and ".[" in seg for seg in pip_installs), "the package is not installed"
    ds_ops = [rest for rest in runs if "DS_BUILD_OPS" in rest]
    assert ds_ops and "--no-build-isolation" in ds_ops[0], "DeepSpeed ops must build against the image's torch"


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")
def test_run_steps_parse():
    """Each RUN is valid `sh` (the image's /bin/sh); a Python heredoc compiles."""
    for word, rest in dockerfile_instructions(DOCKERFILE):
        if word != "RUN":
            continue
        heredoc = re.match(r"python3? - <<-?['\"]?(\w+)['\"]?\n", rest)
        if heredoc:
            compile(rest[heredoc.end():], "Dockerfile RUN heredoc", "exec")
            continue
        proc = subprocess.run(["sh", "-n"], input=rest, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"RUN {rest[:80]}...: {proc.stderr}"


# --------------------------------------------------------------------------- compose
def compose() -> dict:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and "services" in data
    return data


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` / `${VAR-default}` / `${VAR}` with nothing set in the
    environment: the defaults (nested ones too)."""
    pattern = re.compile(r"\$\{(\w+)(?::?-([^${}]*))?\}")
    previous = None
    while previous != value:
        previous, value = value, pattern.sub(lambda m: m.group(2) or "", value)
    return value


def server_args(service: dict) -> dict[str, str]:
    cmd = service["command"]
    cmd = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
    assert cmd[:2] == ["mlflow", "server"], cmd
    args, i = {}, 2
    while i < len(cmd):
        if cmd[i].startswith("--") and i + 1 < len(cmd) and not cmd[i + 1].startswith("--"):
            args[cmd[i]] = cmd[i + 1]
            i += 2
        else:
            args[cmd[i]] = ""
            i += 1
    return args


def mlflow_service(data: dict) -> tuple[str, dict]:
    for name, svc in data["services"].items():
        cmd = svc.get("command") or []
        cmd = shlex.split(cmd) if isinstance(cmd, str) else cmd
        if list(cmd[:2]) == ["mlflow", "server"]:
            return name, svc
    raise AssertionError("no service runs `mlflow server`")


def trainer_service(data: dict) -> dict:
    assert "trainer" in data["services"], list(data["services"])
    return data["services"]["trainer"]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_builds_this_dockerfile():
    for name, svc in compose()["services"].items():
        build = svc.get("build")
        if build is None:
            continue
        build = {"context": build} if isinstance(build, str) else build
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == REPO, f"{name}: build context {context} is not the repository root"
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE, name
        declared = dockerfile_args()
        for arg in build.get("args") or {}:
            assert arg in declared, f"{name}: build arg {arg} is not an ARG of the Dockerfile"


def test_trainer_command_runs_train_launcher_on_an_existing_config():
    from gps_ds.config import load_config

    cmd = trainer_service(compose())["command"]
    cmd = shlex.split(cmd) if isinstance(cmd, str) else [interpolate(str(c)) for c in cmd]
    assert cmd[0] == "deepspeed", cmd
    script = cmd[1]
    assert script == "launchers/train.py" and (REPO / script).is_file(), cmd
    config = cmd[cmd.index("--config") + 1]
    assert (REPO / config).is_file(), f"default config {config} does not exist"
    overrides = [cmd[i + 1] for i, c in enumerate(cmd) if c == "--set"]
    load_config(REPO / config, overrides)  # validates: raises on a bad key or value


def test_tracking_uri_points_at_the_mlflow_service():
    data = compose()
    name, server = mlflow_service(data)
    trainer = trainer_service(data)
    uri = env_of(trainer)["MLFLOW_TRACKING_URI"]
    parsed = urlparse(uri)
    args = server_args(server)
    assert parsed.scheme == "http" and parsed.hostname == name, f"{uri} does not name the service {name!r}"
    assert parsed.port == int(args["--port"]), f"{uri}: the server listens on {args['--port']}"
    assert args.get("--host") == "0.0.0.0", "the server must listen beyond its own container"
    # gps-ds reads the server from tracking.uri: the command sets the same URI
    cmd = [interpolate(str(c)) for c in trainer["command"]]
    assert f"tracking.uri={uri}" in cmd, cmd
    # and the trainer waits for the server
    depends = trainer.get("depends_on")
    assert depends and name in depends, depends


def test_mlflow_server_accepts_the_service_host_name():
    """MLflow 3 rejects Host headers outside its allow-list (localhost and private IPs by
    default), and the trainer calls it by its service name."""
    security = pytest.importorskip("mlflow.server.security_utils")
    data = compose()
    name, server = mlflow_service(data)
    uri = urlparse(env_of(trainer_service(data))["MLFLOW_TRACKING_URI"])
    allowed = server_args(server).get("--allowed-hosts") or env_of(server).get("MLFLOW_SERVER_ALLOWED_HOSTS")
    hosts = [h.strip() for h in allowed.split(",")] if allowed else security.get_default_allowed_hosts()
    assert security.is_allowed_host_header(hosts, uri.netloc), f"{uri.netloc} is refused by {hosts}"
    assert security.is_allowed_host_header(hosts, "localhost:5000"), "the UI on the published port is refused"


def test_mlflow_store_and_artifacts_are_on_a_volume():
    data = compose()
    name, server = mlflow_service(data)
    args = server_args(server)
    mounts = [str(v).split(":")[1] for v in server.get("volumes") or []]
    store = args["--backend-store-uri"]
    assert store.startswith("sqlite:////"), store
    for path in (store.removeprefix("sqlite:///"), args["--artifacts-destination"]):
        assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), f"{path} is not on a volume"
    named = [str(v).split(":")[0] for v in server["volumes"] if not str(v).startswith((".", "/", "$", "~"))]
    for vol in named:
        assert vol in (data.get("volumes") or {}), f"volume {vol} is not declared"
    assert "--serve-artifacts" in args or "--artifacts-destination" in args


def test_trainer_reserves_gpus():
    trainer = trainer_service(compose())
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices), devices
    assert trainer.get("ipc") == "host" or trainer.get("shm_size"), "NCCL/DataLoader need a larger /dev/shm"


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_docker_compose_config_validates():
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    proc = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
