"""The team set-up end to end: MLflow on PostgreSQL with artifacts in S3, DVC on S3, shared workers.

Everything is real and on this machine: Debian's PostgreSQL, moto's S3 server, `mlflow server`,
`prefect server start`, two `prefect worker` processes of a process work pool. Only the MLflow
server holds S3 credentials for its artifacts; the flows and workers reach models through it.
DVC's credentials sit in each checkout's `.dvc/config.local`, as `docs/operations.md` says.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import HAVE_IMAGENET_WEIGHTS
from tests.repositories import DVC, run
from tests.servers import BIN, ROOT, fresh_name, start, stop, tail
from tests.team_servers import (
    S3Endpoint,
    postgres_binaries,
    postgres_server,
    query,
    s3_server,
    team_mlflow_server,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        postgres_binaries() is None,
        reason="PostgreSQL is not installed here (apt-get install postgresql; .ci/run does)",
    ),
]

BUCKET = "team-bucket"
# A secret that must reach S3 and nowhere else: no output, MLflow record or Prefect artifact.
SECRET = f"team-secret-{uuid.uuid4().hex}"
# Two cells that share no stage, so both are ready at once and each worker takes one (a cell
# that resumes another's stage waits for it, and the first worker to finish would take it too).
STRATEGIES = ["from_scratch", "feature_extraction"]
CONFIG = {
    "extends": "compare.yaml",
    "data": {"image_size": 32, "batch_size": 32},
    "feature_extraction": {"epochs": 3, "patience": 2},
    "compare": {
        "label_budgets": [4],
        "seeds": [1],
        "workers": 2,
        "strategies": [
            {"name": "from_scratch", "from_scratch": True},
            {"name": "feature_extraction", "fine_tune": {"stages": []}},
        ],
    },
    "registry": {"model_name": "team-classifier", "min_value": 0.0},
    "tracking": {"experiment": "team-compare"},
    "demo": {"train_per_class": 6, "val_per_class": 2, "test_per_class": 5},
}


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> Iterator[tuple[str, str, S3Endpoint]]:
    """PostgreSQL, S3 and the MLflow server on them: (database URL, tracking URL, S3)."""
    logs = tmp_path_factory.mktemp("team-servers")
    with (
        postgres_server(logs) as database,
        s3_server(logs, [BUCKET], SECRET) as s3,
        team_mlflow_server(logs, database, f"s3://{BUCKET}/mlflow", s3) as tracking,
    ):
        yield database, tracking, s3


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a team member's shell: no AWS variables, no default tracking store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3_"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    return {**env, **extra}


def dvc_credentials(checkout: Path, s3: S3Endpoint) -> None:
    """What each team member does once per checkout: keys in .dvc/config.local, never in git."""
    run(
        DVC,
        "remote",
        "modify",
        "--local",
        "storage",
        "access_key_id",
        s3.access_key_id,
        cwd=checkout,
    )
    run(DVC, "remote", "modify", "--local", "storage", "secret_access_key", SECRET, cwd=checkout)


def origin_repository(where: Path, s3: S3Endpoint) -> Path:
    """The team's repository: the project's conf/ and Makefile, DVC's remote on S3."""
    where.mkdir(parents=True)
    shutil.copytree(
        ROOT / "conf", where / "conf", ignore=shutil.ignore_patterns("__pycache__", "*.py")
    )
    (where / "conf" / "test.yaml").write_text(yaml.safe_dump(CONFIG))
    shutil.copy(ROOT / "Makefile", where / "Makefile")
    run("git", "init", "-q", "-b", "main", cwd=where)
    run("git", "config", "user.email", "team@example.com", cwd=where)
    run("git", "config", "user.name", "team", cwd=where)
    run(DVC, "init", "-q", cwd=where)
    run(DVC, "remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc", cwd=where)
    run(DVC, "remote", "modify", "storage", "endpointurl", s3.url, cwd=where)
    dvc_credentials(where, s3)
    (where / ".gitignore").write_text("/data\n/reports\n")
    run("git", "add", "-A", cwd=where)
    run("git", "commit", "-qm", "project on the team's remote", cwd=where)
    return where


def test_a_team_on_postgres_s3_and_shared_workers(team, prefect_api, tmp_path) -> None:
    database, tracking, s3 = team
    origin = origin_repository(tmp_path / "origin", s3)
    venv = Path(BIN).parent

    # 1. `make demo-data` builds the dataset and pushes it to the S3 remote.
    env = clean_env()
    made = subprocess.run(
        [
            "make",
            "demo-data",
            f"VENV={venv}",
            "CONFIG=conf/test.yaml",
            # The venv is installed already, whichever TensorFlow build it holds.
            *("-o", f"{venv}/installed-cpu", "-o", f"{venv}/installed-cuda"),
        ],
        cwd=origin,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    run("git", "add", "data.dvc", cwd=origin)
    run("git", "commit", "-qm", "data v1", cwd=origin)
    pinned = yaml.safe_load((origin / "data.dvc").read_text())["outs"][0]

    # 2. A fresh clone on another "machine": no data, no DVC cache; its own keys.
    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path)
    dvc_credentials(clone, s3)
    assert not (clone / "data").exists()

    # 3. Two workers of a process work pool, against the shared MLflow and Prefect servers.
    shared = clean_env(
        MLFLOW_TRACKING_URI=tracking,
        PREFECT_API_URL=prefect_api,
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_LOGGING_LEVEL="INFO",
    )
    pool = fresh_name("team")[:40]
    run(
        str(BIN / "prefect"),
        "work-pool",
        "create",
        pool,
        "--type",
        "process",
        cwd=clone,
        env=shared,
    )
    run(str(BIN / "transferflow"), "deploy-cells", "--pool", pool, cwd=clone, env=shared)
    homes = [tmp_path / f"worker-{index}" for index in range(2)]
    workers = []
    for home in homes:
        home.mkdir()
        command = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "1"]
        workers.append(start([*command, "--name", home.name], home / "worker.log", shared, home))
    overrides = [] if HAVE_IMAGENET_WEIGHTS else ["-s", "base.weights=null"]
    try:
        compared = subprocess.run(
            [
                str(BIN / "transferflow"),
                "compare",
                "-c",
                "conf/test.yaml",
                "-s",
                f"compare.work_pool={pool}",
                *overrides,
            ],
            cwd=clone,
            env=shared,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        for worker in workers:
            stop(worker)
    output = compared.stdout + compared.stderr
    assert compared.returncode == 0, output + "".join(tail(h / "worker.log") for h in homes)
    for home in homes:
        assert "Completed" in tail(home / "worker.log", 100_000), f"{home.name} ran no cell"

    # 4. The winner was registered and promoted on the shared server.
    client = MlflowClient(tracking)
    champion = client.get_model_version_by_alias(CONFIG["registry"]["model_name"], "champion")
    assert champion.tags["data_version"] == pinned["md5"]

    # 5. `transferflow predict` loads the champion from the S3-backed store, through the server.
    photos = tmp_path / "photos"
    shutil.copytree(clone / "data" / "fashion_mnist" / "images" / "test", photos)
    predictions = tmp_path / "predictions.csv"
    predicted = subprocess.run(
        [
            str(BIN / "transferflow"),
            "predict",
            "--images",
            str(photos),
            "--model",
            f"models:/{CONFIG['registry']['model_name']}@champion",
            "--output",
            str(predictions),
            "-c",
            "conf/test.yaml",
        ],
        cwd=clone,
        env=shared,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert predicted.returncode == 0, predicted.stdout + predicted.stderr
    table = pd.read_csv(predictions)
    assert len(table) == 10 * CONFIG["demo"]["test_per_class"]
    assert set(table["label"]) <= {path.name for path in photos.iterdir()}

    # 6. Nothing went to a local store; PostgreSQL holds the records, the bucket the files.
    for folder in (origin, clone, *homes):
        assert not (folder / "mlflow.db").exists() and not (folder / "mlartifacts").exists()
        assert not (folder / "mlruns").exists()
    experiment = client.get_experiment_by_name(CONFIG["tracking"]["experiment"]).experiment_id
    runs = query(database, "SELECT count(*) FROM runs WHERE experiment_id = %s", int(experiment))
    cells = query(
        database,
        "SELECT count(*) FROM tags t JOIN runs r ON r.run_uuid = t.run_uuid "
        "WHERE r.experiment_id = %s AND t.key = 'strategy' AND r.status = 'FINISHED'",
        int(experiment),
    )
    versions = query(
        database,
        "SELECT count(*) FROM model_versions WHERE name = %s",
        CONFIG["registry"]["model_name"],
    )
    keys = [
        item["Key"]
        for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for item in page.get("Contents", [])
    ]
    models = [key for key in keys if key.startswith("mlflow/") and key.endswith("/MLmodel")]
    dvc_files = [key for key in keys if key.startswith("dvc/")]
    print(
        f"PostgreSQL: {runs[0][0]} runs ({cells[0][0]} with a strategy tag), {versions[0][0]} "
        f"model versions; bucket: {len(keys)} objects, {len(models)} MLmodel files, "
        f"{len(dvc_files)} DVC objects"
    )
    assert runs[0][0] >= 1 + 2 * len(STRATEGIES)  # the comparison, its cells and their stages
    assert cells[0][0] >= len(STRATEGIES)
    assert versions[0][0] >= 1
    assert len(models) >= len(STRATEGIES)
    assert len(dvc_files) >= pinned["nfiles"]  # every image, plus the directory listing

    # 7. The S3 secret is nowhere but in the S3 server and the checkouts' config.local.
    worker_logs = [tail(home / "worker.log", 10_000_000) for home in homes]
    for text in (
        made.stdout,
        made.stderr,
        output,
        predicted.stdout,
        predicted.stderr,
        *worker_logs,
    ):
        assert SECRET not in text
    for table_name, column in [
        ("params", "value"),
        ("tags", "value"),
        ("model_version_tags", "value"),
        ("registered_model_tags", "value"),
    ]:
        leaked = query(
            database, f"SELECT count(*) FROM {table_name} WHERE {column} LIKE %s", f"%{SECRET}%"
        )
        assert leaked[0][0] == 0, f"the S3 secret is in MLflow's {table_name}"
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: prefect_api}),
        get_client(sync_client=True) as prefect,
    ):
        artifacts = prefect.read_artifacts()
    assert artifacts and not any(SECRET in str(artifact.data) for artifact in artifacts)
    assert SECRET not in (clone / ".dvc" / "config").read_text()
    assert SECRET not in run("git", "log", "-p", "--all", cwd=clone)
