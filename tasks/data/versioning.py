"""The data version: what a .dvc file pins, pulled, added and pushed; a fingerprint without DVC."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from conf.data import DataConfig
from conf.errors import ExpectedError
from tasks.data.errors import DataError, DataNotFoundError
from tasks.runtime.credentials import redact_url
from tasks.runtime.timeouts import call_within

if TYPE_CHECKING:
    from dvc.repo import Repo


class DataVersionMismatchError(DataError):
    """The data in the workspace is not the version its .dvc file pins."""


class DvcPullError(ExpectedError, RuntimeError):
    """`dvc pull` could not bring the pinned data from the remote."""


@dataclass(frozen=True)
class DataVersion:
    """The tracked data folder and the DVC hash that identifies its exact content."""

    path: Path
    md5: str


def data_version(repo_root: Path, dvc_file: str) -> DataVersion:
    """The data folder and hash that `dvc_file` pins, after checking the workspace holds them.

    Use it instead of `pull_data` where the data is already in place, e.g. inside a `dvc repro`
    stage that lists the folder as a dependency (`dvc repro --pull` fetches it first).
    """
    from dvc.repo import Repo

    repo_root = Path(repo_root).absolute()
    out = _tracked_output(repo_root, dvc_file)
    path = Path(os.path.normpath((repo_root / dvc_file).parent / out["path"]))
    md5 = str(out["md5"])
    with Repo(os.fspath(repo_root)) as repo:
        changes = repo.status(targets=[os.fspath(repo_root / dvc_file)])  # DVC resolves from cwd
    if changes:
        states = [
            f"{out} {state}"
            for entries in changes.values()
            for entry in entries
            if isinstance(entry, dict)
            for out, state in entry.get("changed outs", {}).items()
        ]
        raise DataVersionMismatchError(
            f"{path} is not the version {dvc_file} pins ({md5}): {', '.join(states) or changes}. "
            f"Run `dvc checkout {dvc_file}` (or `dvc pull {dvc_file}`) to restore the pinned data, "
            f"or `dvc add` the folder and commit {dvc_file} to pin your changes."
        )
    return DataVersion(path=path, md5=md5)


def pull_data(repo_root: Path, dvc_file: str) -> DataVersion:
    """`dvc pull` the data that `dvc_file` pins and return its folder and hash."""
    from dvc.exceptions import CheckoutError, DownloadError, DvcException
    from dvc.repo import Repo

    repo_root = Path(repo_root).absolute()
    out = _tracked_output(repo_root, dvc_file)  # a bad .dvc file fails before any transfer
    with Repo(os.fspath(repo_root)) as repo:
        remote, url = _remote_of(repo, out)
        try:
            repo.pull(targets=[os.fspath(repo_root / dvc_file)])  # DVC resolves targets from cwd
        except (CheckoutError, DownloadError) as error:
            raise DvcPullError(_unreachable_message(dvc_file, remote, url, error)) from error
        except DvcException as error:
            raise DvcPullError(f"`dvc pull {dvc_file}` failed: {error}") from error
    return data_version(repo_root, dvc_file)


def _tracked_output(repo_root: Path, dvc_file: str) -> dict:
    """The first output a .dvc file tracks: its `path`, `md5` and optional `remote`."""
    dvc_path = repo_root / dvc_file
    if not dvc_path.is_file():
        raise DataNotFoundError(
            f"{dvc_path} does not exist; track the data with `dvc add <folder>` and commit the "
            ".dvc file, or set data.dvc_file to null to skip DVC"
        )
    outs = (yaml.safe_load(dvc_path.read_text()) or {}).get("outs") or [{}]
    if "md5" not in outs[0] or "path" not in outs[0]:
        raise DataNotFoundError(f"{dvc_path} pins no output with an md5; re-run `dvc add`")
    return outs[0]


def _remote_of(repo: Repo, out: dict) -> tuple[str | None, str | None]:
    """The remote a pull would use and its URL as shown: without user, password or tokens."""
    name = out.get("remote") or repo.config["core"].get("remote")
    url = repo.config["remote"].get(name, {}).get("url") if name else None
    return name, redact_url(url) if url else None


def _unreachable_message(
    dvc_file: str, remote: str | None, url: str | None, error: Exception
) -> str:
    head = f"`dvc pull {dvc_file}` could not get the data"
    if remote is None:
        return (
            f"{head}: no DVC remote is configured and the local cache lacks it. Add one with "
            f"`dvc remote add -d <name> <url>` (see `dvc remote list`). DVC said: {error}"
        )
    where = f"remote '{remote}' ({url})"
    if url and "://" not in url and not os.path.isdir(url):
        problem = f"the {where} is a local folder that does not exist"
    else:
        problem = f"the {where} is unreachable or does not hold this version"
    return (
        f"{head}: {problem}. Check `dvc remote list` and your access to it, and run `dvc push` "
        f"from the machine that has the data. DVC said: {error}"
    )


# --- Prefect steps -------------------------------------------------------------------------------


def _retry_failed_downloads(task, task_run, state) -> bool:
    """Retry only interrupted transfers; a missing remote or a bad .dvc file will not heal."""
    from dvc.exceptions import DownloadError

    try:
        state.result()
    except DvcPullError as error:
        return isinstance(error.__cause__, DownloadError)
    except Exception:
        return False
    return False


def fingerprint_files(path: Path) -> str:
    """A version id for data outside DVC: names, sizes and modification times of its files."""
    folder = path.parent if path.is_file() else path
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"files-{digest.hexdigest()[:32]}"


@task(
    name="pull-data",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_condition_fn=_retry_failed_downloads,
)
def pull_data_version(data: DataConfig, project: Path, budget: float) -> str:
    """Pull the data version the .dvc file pins and return its hash (files' fingerprint without DVC).

    Inside a `dvc repro` stage DVC has already checked the data out, so the step only verifies it.
    The pull gives up after `budget` seconds (timeouts.dvc_pull_seconds).
    """
    dvc_file = data.dvc_file
    if dvc_file is None:
        path = (project / data.path).resolve()
        if not path.exists():
            raise DataNotFoundError(f"data path {path} does not exist; set data.path in the config")
        return fingerprint_files(path)
    if os.environ.get("DVC_STAGE"):
        return data_version(project, dvc_file).md5
    pulled = call_within(
        budget,
        f"`dvc pull {dvc_file}` did not finish within timeouts.dvc_pull_seconds ({budget} s): "
        "the DVC remote is slow or does not answer. Check the remote (`dvc remote list`, "
        "`dvc status -c`), or raise timeouts.dvc_pull_seconds for a large first pull.",
        lambda: pull_data(project, dvc_file),
    )
    return pulled.md5


@task(name="read-pinned-version", cache_policy=NO_CACHE)
def pinned_data_version(data: DataConfig, project: Path) -> str | None:
    """The hash the .dvc file pins now, or None when the repository has none yet."""
    dvc_file = data.dvc_file
    if dvc_file is None or not (project / dvc_file).is_file():
        return None
    return str(_tracked_output(project, dvc_file)["md5"])


@task(name="dvc-add", cache_policy=NO_CACHE)
def track_data_version(data: DataConfig, project: Path) -> str:
    """`dvc add` the data folder the .dvc file tracks; returns the new hash it pins."""
    from dvc.repo import Repo

    dvc_file = data.dvc_file or "data.dvc"
    tracked = project / Path(dvc_file).with_suffix("")
    with Repo(os.fspath(project)) as repo:
        repo.add([os.fspath(tracked)])  # DVC resolves targets from cwd: pass absolute paths
    return str(_tracked_output(project, dvc_file)["md5"])


@task(
    name="dvc-push",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
)
def push_data_version(data: DataConfig, project: Path) -> int:
    """`dvc push` the pinned data to the repository's default remote; returns files pushed."""
    from dvc.repo import Repo

    dvc_file = data.dvc_file or "data.dvc"
    with Repo(os.fspath(project)) as repo:
        return int(repo.push(targets=[os.fspath(project / dvc_file)]))
