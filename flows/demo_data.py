"""The demo-data flow: cut Fashion-MNIST into a small-label dataset, pin it with DVC, push it."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow

from tasks.data.demo import build_demo_dataset, write_demo_report
from tasks.data.versioning import pinned_data_version, push_data_version, track_data_version
from tasks.stages.preflight import load_pipeline_config

DEFAULT_CONFIG = "conf/default.yaml"


@dataclass(frozen=True)
class DemoDataResult:
    """The version the repository pinned before, the version just built, and the split sizes."""

    pinned: str | None
    built: str
    counts: dict[str, int]

    @property
    def matches_pin(self) -> bool:
        return self.pinned == self.built


@flow(name="prepare-demo-data", log_prints=True)
def prepare_demo_data(
    config_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None
) -> DemoDataResult:
    """Build the demo dataset, check it is the version data.dvc pins, and push it to the remote."""
    loaded = load_pipeline_config(config_path, overrides or [])
    config, project = loaded.config, loaded.project
    pinned = pinned_data_version(config.data, project)
    demo = build_demo_dataset(config.demo, project)
    built = track_data_version(config.data, project)
    push_data_version(config.data, project)
    result = DemoDataResult(pinned=pinned, built=built, counts=demo.counts)
    write_demo_report(project, result.pinned, result.built, result.counts)
    return result
