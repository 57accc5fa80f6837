"""Real project repositories for the end-to-end tests: git, DVC, a local remote, the demo cut."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))


def run(*command: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command the way a user would; fail the test with its output if it fails."""
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def dvc_project(base: Path, config: dict) -> Path:
    """A team's repository in base/origin: conf/ plus conf/test.yaml = `config`, and the demo cut
    that config's `demo:` section describes in data/, tracked by DVC, pushed to base/remote and
    committed on branch main."""
    from tasks.data.demo import write_demo_dataset

    origin, remote = base / "origin", base / "remote"
    origin.mkdir(parents=True)
    remote.mkdir()
    shutil.copytree(
        ROOT / "conf", origin / "conf", ignore=shutil.ignore_patterns("__pycache__", "*.py")
    )
    (origin / "conf" / "test.yaml").write_text(yaml.safe_dump(config))
    demo = config["demo"]
    write_demo_dataset(
        origin / "data" / "fashion_mnist",
        train_per_class=demo["train_per_class"],
        val_per_class=demo["val_per_class"],
        test_per_class=demo["test_per_class"],
        seed=0,
    )
    run("git", "init", "-q", "-b", "main", cwd=origin)
    run("git", "config", "user.email", "t@example.com", cwd=origin)
    run("git", "config", "user.name", "test", cwd=origin)
    run(DVC, "init", "-q", cwd=origin)
    run(DVC, "remote", "add", "-d", "storage", str(remote), cwd=origin)
    run(DVC, "add", "-q", "data", cwd=origin)
    run(DVC, "push", "-q", cwd=origin)
    run("git", "add", "-A", cwd=origin)
    run("git", "commit", "-qm", "data v1", cwd=origin)
    return origin


def with_pipeline(project: Path, config: str) -> None:
    """Add this repository's DVC pipeline to `project`, its stages run on `config`: dvc.yaml,
    the ignore files, and the code its stages list as dependencies; committed."""
    (project / "dvc.yaml").write_text(
        (ROOT / "dvc.yaml").read_text().replace("conf/default.yaml", config)
    )
    (project / ".dvcignore").write_text((ROOT / ".dvcignore").read_text())
    with (project / ".gitignore").open("a") as ignores:  # after `dvc add`'s own entry
        ignores.write((ROOT / ".gitignore").read_text())
    for code in ("tasks", "flows"):
        shutil.copytree(ROOT / code, project / code, ignore=shutil.ignore_patterns("__pycache__"))
    run("git", "add", "-A", cwd=project)
    run("git", "commit", "-qm", "pipeline", cwd=project)
