"""The import contracts of pyproject.toml (`make lint` runs them) catch an import that breaks them.

Each test analyses a copy of the three packages, so a violation can be planted without touching
the project.
"""

from __future__ import annotations

import ast
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


def function_level_project_imports(root: Path) -> list[tuple[str, str]]:
    """Each import of a project module inside a function (TYPE_CHECKING blocks aside), as
    (`path:line`, the line above it)."""
    found = []
    for package in ("conf", "tasks", "flows"):
        for path in sorted((root / package).rglob("*.py")):
            lines = path.read_text().splitlines()
            for function in ast.walk(ast.parse("\n".join(lines))):
                if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(function):
                    if isinstance(node, ast.ImportFrom):
                        modules = [node.module or ""] if not node.level else ["tasks"]
                    elif isinstance(node, ast.Import):
                        modules = [alias.name for alias in node.names]
                    else:
                        continue
                    if any(m.split(".")[0] in ("conf", "tasks", "flows") for m in modules):
                        where = f"{path.relative_to(root)}:{node.lineno}"
                        found.append((where, lines[node.lineno - 2].strip()))
    return found


def test_every_import_of_the_project_inside_a_function_says_why(project_copy: Path) -> None:
    found = function_level_project_imports(ROOT)
    unexplained = [where for where, above in found if not above.startswith("# lazy:")]
    assert not unexplained, f"function-level imports without a '# lazy:' reason: {unexplained}"
    assert len(found) <= 20, found
    # ...and one planted without a reason is caught.
    plant(project_copy, "tasks.data.table", "from tasks.runtime import run_log")
    planted = function_level_project_imports(project_copy)
    assert [where for where, above in planted if not above.startswith("# lazy:")] == [
        f"tasks/data/table.py:{len((project_copy / 'tasks/data/table.py').read_text().splitlines())}"
    ]
