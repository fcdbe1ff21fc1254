"""cluster.yaml is a config `ray up` accepts: checked the way `ray up` checks it, without AWS.

`ray up` (ray/autoscaler/_private/commands.py, `_bootstrap_config`) runs `prepare_config` (merge
with the AWS defaults.yaml, setup-command merging, docker checks, per-type min/max workers), then
asks the AWS provider to fill node resources (needs boto3 + credentials; it only warns when that
fails), then `validate_config` (the JSON schema shipped in the wheel plus Ray's own cross-field
checks), then the provider's bootstrap, which talks to AWS. These tests run the two steps that
need no cloud and stop before the provider.
"""

from __future__ import annotations

import copy
import shlex
import subprocess
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def raw_config() -> dict[str, Any]:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def ray_up_checks(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to a config before it contacts the cloud; raises on an invalid one."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def prepared() -> dict[str, Any]:
    return ray_up_checks(raw_config())


def test_cluster_yaml_passes_ray_up_validation(prepared: dict[str, Any]) -> None:
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_head_is_cpu_only_and_workers_are_autoscaling_gpu_types(prepared: dict[str, Any]) -> None:
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0  # filled by prepare_config: the head type never scales
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    assert workers, "no worker node types"
    for name, t in workers.items():
        assert t["resources"].get("GPU", 0) >= 1, f"{name} is not a GPU type"
        assert 0 <= t["min_workers"] < t["max_workers"] <= prepared["max_workers"], name
    assert prepared["idle_timeout_minutes"] > 0


def test_every_node_installs_this_project_and_head_serves_mlflow(prepared: dict[str, Any]) -> None:
    # prepare_config merges setup_commands into the head's and the workers' lists.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install" in c and "-e /home/ray/esc50-search" in c for c in prepared[key]), key
    assert prepared["file_mounts"]["/home/ray/esc50-search"] == "."
    # The head's private address reaches its container through an env file written on the host:
    # `ray up` runs only the global initialization_commands on the head; workers override them.
    assert any("/home/ubuntu/esc50.env" in c for c in prepared["initialization_commands"])
    assert "--env-file /home/ubuntu/esc50.env" in prepared["docker"]["head_run_options"]
    for name, t in prepared["available_node_types"].items():
        if name != prepared["head_node_type"]:
            assert t["initialization_commands"] == [], name
    (mlflow,) = invocations(prepared["head_start_ray_commands"], "mlflow", "server")
    assert mlflow[mlflow.index("--host") + 1] == "$ESC50_HEAD_IP"  # the private address only
    assert mlflow[mlflow.index("--artifacts-destination") + 1].startswith("s3://")
    assert "RAY_AUTH_MODE=token" in " ".join(prepared["docker"]["run_options"])


def invocations(commands: list[str], program: str, sub: str) -> list[list[str]]:
    """The arguments of every `program sub ...` in these shell commands (up to ; & | > etc.)."""
    found = []
    for command in commands:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        for i in range(len(tokens) - 1):
            if tokens[i : i + 2] == [program, sub]:
                args = []
                for t in tokens[i + 2 :]:
                    if set(t) <= set(";&|<>()"):
                        break
                    args.append(t)
                found.append(args)
    return found


def test_ray_start_and_mlflow_server_commands_parse_with_the_pinned_clis(prepared: dict[str, Any]) -> None:
    """Every `ray start` / `mlflow server` in the config is a valid call of this venv's CLIs."""
    from mlflow.cli import cli as mlflow_cli
    from ray.scripts.scripts import start as ray_start

    head = invocations(prepared["head_start_ray_commands"], "ray", "start")
    workers = invocations(prepared["worker_start_ray_commands"], "ray", "start")
    assert len(head) == 1 and len(workers) == 1
    params = ray_start.make_context("start", list(head[0])).params
    assert params["head"] and params["num_cpus"] == 0 and params["num_gpus"] == 0  # nothing runs on the head
    assert ray_start.make_context("start", list(workers[0])).params["address"] == "$RAY_HEAD_IP:6379"
    (mlflow,) = invocations(prepared["head_start_ray_commands"], "mlflow", "server")
    params = mlflow_cli.commands["server"].make_context("server", list(mlflow)).params
    assert params["port"] == 5000 and params["backend_store_uri"].startswith("sqlite:////")
    with pytest.raises(click.NoSuchOption):  # the check can fail
        ray_start.make_context("start", [*head[0], "--num-cpu=0"])


def test_head_env_file_names_the_private_address_and_the_mlflow_login(
    prepared: dict[str, Any], tmp_path: Path
) -> None:
    """The initialization command, run here with its paths moved into tmp: the IP, the tracking URI,
    and the MLflow login, whose secret is made once (mode 600) and kept when setup runs again."""
    (command,) = [c for c in prepared["initialization_commands"] if "esc50.env" in c]
    env_file, secret = tmp_path / "esc50.env", tmp_path / ".esc50-mlflow-admin"
    command = command.replace("/home/ubuntu/esc50.env", str(env_file))
    command = command.replace("/home/ubuntu/.esc50-mlflow-admin", str(secret))
    envs = []
    for _ in range(2):  # `ray up` again on the same head
        assert subprocess.run(["bash", "-c", command]).returncode == 0
        envs.append(dict(line.split("=", 1) for line in env_file.read_text().splitlines()))
    env = envs[0]
    ip = env["ESC50_HEAD_IP"]
    assert ip and env["MLFLOW_TRACKING_URI"] == f"http://{ip}:5000"
    assert env["MLFLOW_TRACKING_USERNAME"] == "admin"
    assert len(env["MLFLOW_TRACKING_PASSWORD"]) >= 32 and env["MLFLOW_TRACKING_PASSWORD"].isalnum()
    assert env["MLFLOW_TRACKING_PASSWORD"] == secret.read_text() == envs[1]["MLFLOW_TRACKING_PASSWORD"]
    assert secret.stat().st_mode & 0o777 == 0o600 and env_file.stat().st_mode & 0o777 == 0o600


def test_head_runs_mlflow_with_basic_auth(prepared: dict[str, Any], tmp_path: Path) -> None:
    """`mlflow server --app-name basic-auth`, its config written by the command before it (run
    here with HOME in tmp), the admin password and CSRF key from the head, not from git."""
    import configparser

    from mlflow.cli import cli as mlflow_cli

    (mlflow,) = invocations(prepared["head_start_ray_commands"], "mlflow", "server")
    assert (
        mlflow_cli.commands["server"].make_context("server", list(mlflow)).params["app_name"] == "basic-auth"
    )
    (start,) = [c for c in prepared["head_start_ray_commands"] if "mlflow server" in c]
    assert 'MLFLOW_AUTH_CONFIG_PATH="$HOME/mlflow/basic_auth.ini"' in start
    assert 'MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD"' in start
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in start  # as tests/test_auth_server.py runs it
    assert 'MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat ~/mlflow/flask_secret)"' in start
    (write,) = [c for c in prepared["head_start_ray_commands"] if "basic_auth.ini" in c and c != start]
    r = subprocess.run(["bash", "-c", write], env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0
    ini = configparser.ConfigParser()
    ini.read(tmp_path / "mlflow" / "basic_auth.ini")
    conf = dict(ini["mlflow"])
    assert conf["default_permission"] == "NO_PERMISSIONS" and conf["admin_username"] == "admin"
    assert conf["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    assert conf["database_uri"] == "sqlite:////home/ray/mlflow/basic_auth.db"
    assert "admin_password" not in conf  # from the environment, made on the head
    key = tmp_path / "mlflow" / "flask_secret"
    assert len(key.read_text()) >= 32 and key.stat().st_mode & 0o777 == 0o600


def test_no_credentials_in_cluster_yaml() -> None:
    import re

    text = CLUSTER_YAML.read_text()
    for needle in (
        "aws_access_key",
        "aws_secret",
        "secret_access",
        "akia",
        "ray_auth_token=",
        "admin_password =",  # a password in the basic-auth ini
    ):
        assert needle not in text.lower(), needle
    # A password or key is only ever set from a variable or a file made on the head.
    values = re.findall(r"(?:PASSWORD|SECRET_KEY)=(\S+)", text)
    assert values and all(v.startswith(('"$', "%s")) for v in values), values


def test_every_command_is_valid_shell(prepared: dict[str, Any]) -> None:
    commands = [
        c
        for key in (
            "initialization_commands",
            "head_setup_commands",
            "worker_setup_commands",
            "head_start_ray_commands",
            "worker_start_ray_commands",
        )
        for c in prepared.get(key, [])
    ]
    for t in prepared["available_node_types"].values():
        commands += t.get("initialization_commands", []) + t.get("worker_setup_commands", [])
    assert commands
    for c in commands:
        r = subprocess.run(["bash", "-n", "-c", c], capture_output=True, text=True)
        assert r.returncode == 0, f"{c!r}: {r.stderr}"


def _broken(mutate) -> dict[str, Any]:
    config = raw_config()
    mutate(config)
    return config


@pytest.mark.parametrize(
    ("name", "mutate", "error"),
    [
        ("unknown top-level key", lambda c: c.update(max_worker=3), jsonschema.ValidationError),
        ("bad type", lambda c: c.update(idle_timeout_minutes="five"), jsonschema.ValidationError),
        (
            "fractional GPU resource",
            lambda c: c["available_node_types"]["gpu_t4"]["resources"].update(GPU=0.5),
            jsonschema.ValidationError,
        ),
        (
            "unknown node-type field",
            lambda c: c["available_node_types"]["gpu_t4"].update(instance_type="g4dn.xlarge"),
            jsonschema.ValidationError,
        ),
        ("head type missing", lambda c: c.update(head_node_type="nope"), ValueError),
        (
            "min_workers above max_workers",
            lambda c: c["available_node_types"]["gpu_t4"].update(min_workers=99),
            ValueError,
        ),
    ],
)
def test_a_broken_config_fails(name: str, mutate, error: type[Exception]) -> None:
    with pytest.raises(error):
        ray_up_checks(_broken(mutate))
