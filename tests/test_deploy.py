"""deploy/compose.yaml, checked against what tests/test_team_setup.py starts for real.

There is no Docker where the tests run, so the file is not started; what can be checked without it
is that each service runs the command and gets the variables the tested set-up uses, that no secret
is written in it, and that nothing is published beyond the loopback interface.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from tests.servers import mlflow_server_command

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def flags(command: list[str]) -> dict[str, str | None]:
    """`--name value` pairs of a command line (a flag without a value maps to None)."""
    found: dict[str, str | None] = {}
    for index, word in enumerate(command):
        if word.startswith("--"):
            following = command[index + 1] if index + 1 < len(command) else None
            found[word] = None if following is None or following.startswith("--") else following
    return found


def test_the_mlflow_service_runs_the_tested_server_command() -> None:
    tested = flags(mlflow_server_command("postgresql+psycopg://u@h/db", "s3://b/mlflow", 5000))
    service = SERVICES["mlflow"]
    declared = flags(service["command"])
    assert service["command"][:2] == ["mlflow", "server"]
    assert set(declared) == set(tested)
    assert declared["--backend-store-uri"].startswith("postgresql+psycopg://")
    assert declared["--artifacts-destination"].startswith("s3://")
    environment = service["environment"]
    assert environment["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert environment["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(environment)


def test_workers_reach_mlflow_and_prefect_by_url_and_s3_only_for_dvc() -> None:
    worker = SERVICES["worker"]
    assert worker["command"][:4] == ["prefect", "worker", "start", "--pool"]
    environment = worker["environment"]
    assert environment["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert environment["PREFECT_API_URL"] == "http://prefect:4200/api"
    assert "MLFLOW_S3_ENDPOINT_URL" not in environment  # models go through the MLflow server
    prefect = SERVICES["prefect"]
    assert prefect["command"][:3] == ["prefect", "server", "start"]
    assert prefect["environment"]["PREFECT_UI_API_URL"].endswith(":4200/api")


def test_no_secret_is_written_in_the_compose_file_and_ports_stay_on_loopback() -> None:
    secret_names = re.compile(r"PASSWORD|SECRET|ACCESS_KEY")
    for name, service in SERVICES.items():
        for key, value in (service.get("environment") or {}).items():
            if secret_names.search(key):
                assert str(value).startswith("${"), f"{name}: {key} is written in the file"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    example = (DEPLOY / ".env.example").read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", (DEPLOY / "compose.yaml").read_text()))
    assert used <= set(re.findall(r"^([A-Z0-9_]+)=", example, re.MULTILINE))
    assert "deploy/.env" in (DEPLOY.parent / ".gitignore").read_text().split()


def test_the_image_installs_the_team_extras_the_tests_use() -> None:
    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
    team = " ".join(project["project"]["optional-dependencies"]["team"])
    for package in ("dvc[s3]", "boto3", "psycopg"):
        assert package in team
    assert "'.[team]'" in (DEPLOY / "Dockerfile").read_text()
    assert SERVICES["worker"]["build"]["dockerfile"] == "deploy/Dockerfile"
