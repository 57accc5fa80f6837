"""The import contracts of pyproject.toml (`make lint` runs them) catch an import that breaks them.

Each test analyses a copy of the three packages, so a violation can be planted without touching
the project.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
LAYERS = "flows use tasks, tasks use conf, never the other way"
CONF_WITHOUT_TENSORFLOW = "conf loads without TensorFlow, Keras or MLflow"
GATE_IS_STATISTICS = "tasks.registry.gate is pure statistics"
TASK_LAYERS = "tasks: each package imports only the packages below it"
NO_CYCLE = "no import cycle among siblings"


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    for package in ("conf", "tasks", "flows"):
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def lint_imports(project: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH first: the copy's packages, not the installed project, are the ones analysed.
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def plant(project: Path, module: str, line: str) -> None:
    path = project / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + f"\n\ndef planted():\n    {line}\n")


def test_the_project_keeps_every_contract(project_copy: Path) -> None:
    result = lint_imports(project_copy)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for contract in (LAYERS, TASK_LAYERS, NO_CYCLE, CONF_WITHOUT_TENSORFLOW, GATE_IS_STATISTICS):
        assert f"{contract} KEPT" in output
    assert " 0 broken" in output


@pytest.mark.parametrize(
    ("module", "line", "contract", "named_import"),
    [
        ("conf.loader", "import flows.train", LAYERS, "conf.loader -> flows.train"),
        (
            "tasks.report.summary",
            "from flows import cli",
            LAYERS,
            "tasks.report.summary -> flows.cli",
        ),
        (
            "tasks.data.table",
            "from tasks.stages.runner import run_stages",
            TASK_LAYERS,
            "tasks.data.table -> tasks.stages.runner",
        ),
        (
            "tasks.model.classifier",
            "from tasks.tracking import runs",
            TASK_LAYERS,
            "tasks.model.classifier -> tasks.tracking.runs",
        ),
        ("conf.schema", "import keras", CONF_WITHOUT_TENSORFLOW, "conf.schema -> keras"),
        (
            "tasks.registry.gate",
            "import mlflow",
            GATE_IS_STATISTICS,
            "tasks.registry.gate -> mlflow",
        ),
    ],
)
def test_an_import_against_a_contract_fails_and_names_it(
    project_copy: Path, module: str, line: str, contract: str, named_import: str
) -> None:
    # Planted inside a function: an import hidden there to dodge a cycle still counts.
    plant(project_copy, module, line)
    result = lint_imports(project_copy)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"{contract} BROKEN" in output
    assert named_import in output


def test_a_cycle_inside_a_package_fails_and_names_it(project_copy: Path) -> None:
    """The layers allow any import inside one package; a cycle among its modules still fails."""
    plant(project_copy, "tasks.stages.plan", "from tasks.stages import runner")
    plant(project_copy, "tasks.stages.runner", "from tasks.stages import plan")
    result = lint_imports(project_copy)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"{NO_CYCLE} BROKEN" in output
    assert "No cycles are allowed in tasks.stages" in output
