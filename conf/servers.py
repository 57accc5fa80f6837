"""The sections on the servers a run uses: MLflow tracking, each server's time limit, the schedule."""

from __future__ import annotations

from pydantic import Field, field_validator

from conf.section import Section


class TrackingConfig(Section):
    experiment: str = Field(
        "transfer-learning", min_length=1, description="The MLflow experiment of the runs."
    )
    resume: bool = Field(
        True,
        description="Start from a stage that a run in the experiment already finished with the "
        "same data, base, head, seed and settings, instead of training it again.",
    )
    heartbeat_seconds: int = Field(
        30,
        ge=1,
        description="How often a live run marks itself alive in MLflow. A RUNNING run with no "
        "heartbeat for five of these is taken for dead (killed, machine lost) and closed as "
        "KILLED by the next run in its experiment.",
    )


class TimeoutsConfig(Section):
    """How long one call to each server may take, its retries included, before the run fails.

    A run that fails on a lost server keeps what it finished: stages already logged resume when
    the same command runs again.
    """

    mlflow_seconds: int = Field(
        60,
        ge=20,
        description="One call to the MLflow tracking server (MLFLOW_TRACKING_URI), its four "
        "attempts included; each attempt may wait about a sixth of it for an answer.",
    )
    dvc_pull_seconds: int = Field(
        900, ge=10, description="The whole `dvc pull` of the pinned data from the DVC remote."
    )
    prefect_api_seconds: int = Field(
        60,
        ge=20,
        description="One call to the Prefect API (PREFECT_API_URL, or the local one), its three "
        "attempts included.",
    )


class ScheduleConfig(Section):
    """The retraining deployment that `transferflow serve` (`make serve`) registers with Prefect."""

    deployment_name: str = Field(
        "scheduled", min_length=1, description="Run it with retrain-classifier/<this name>."
    )
    cron: str = Field("0 3 * * 1", description="When it runs, five-field cron, in `timezone`.")
    timezone: str = Field("UTC", description="An IANA time zone, e.g. Europe/Berlin.")
    git_pull: bool = Field(
        False, description="`git pull --ff-only` the project before checking for changes."
    )

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from prefect.schedules import Cron  # the parser the Prefect server itself applies

        try:
            Cron(value)
        except ValueError as exc:
            raise ValueError(
                f"{exc}; expected five fields, e.g. '0 3 * * 1' (Monday 03:00)"
            ) from None
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}; use an IANA name such as UTC") from None
        return value
