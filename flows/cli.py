"""The `transferflow` command: train, build the demo data, and show where the results are."""

from __future__ import annotations

import functools
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Annotated, Any, NoReturn

import typer

from conf import load_config, project_root
from conf.errors import ExpectedError
from tasks.runtime.credentials import move_tracking_credentials, redact_url
from tasks.runtime.prefect_server import local_prefect_server, stop_local_server
from tasks.runtime.run_log import registration_line, resumed_line
from tasks.runtime.stopping import note_stop_requested, signal_exit_status
from tasks.runtime.timeouts import bounded_prefect_calls
from tasks.runtime.tracking_server import (
    check_tracking_server,
    tracking_server_lost,
    tracking_uri,
    ui_hint,
)

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)

# Bad input, bad config, a server that does not answer: the user fixes the input, not the code.
EXPECTED_ERROR_EXIT = 2


def command(*args: Any, **kwargs: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """`app.command`, with an expected error shown as its message alone and exit status 2.

    A tracking server lost mid-run counts as expected. Unexpected errors keep their traceback;
    Prefect's own log of a failed task stays above it.
    """

    def register(function: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(function)
        def run(*call_args: Any, **call_kwargs: Any) -> None:
            try:
                function(*call_args, **call_kwargs)
            except ExpectedError as error:
                _fail(error)
            except Exception as error:
                lost = tracking_server_lost(error)
                if lost is None:
                    raise
                _fail(lost)

        return app.command(*args, **kwargs)(run)

    return register


def _fail(error: Exception) -> None:
    typer.secho(f"Error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(EXPECTED_ERROR_EXIT) from None


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    # An exception rather than Python's default death, so that runs close as KILLED and
    # Prefect's temporary server stops at exit. Inside a flow Prefect raises its own first.
    note_stop_requested()
    raise SystemExit(128 + signum)


def _run_flow(flow: str, config: str, overrides: list[str], *args: Any) -> Any:
    """The flow named `flow` ("module:function") called with `args`, by default with
    `(config, overrides)`: the config checked first, the Prefect API calls bounded by
    timeouts.prefect_api_seconds, Prefect's temporary server starting while the flow's module
    (TensorFlow with it) imports, and stopped with this process."""
    budget = load_config(config, overrides).timeouts.prefect_api_seconds
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    module, name = flow.split(":")
    try:
        with bounded_prefect_calls(budget), local_prefect_server() as ready:
            function = getattr(importlib.import_module(module), name)
            ready()
            return function(*(args or (config, overrides)))
    except BaseException as error:
        code = signal_exit_status(error)
        if code is None:
            raise
        _leave_now(code)


def _leave_now(code: int) -> NoReturn:
    """Exit at once after a signal, the flow's runs already closed.

    Python's normal exit joins every thread of Prefect's task runners, and a thread that was
    waiting for a cell that will never run would hold the command forever; so the temporary
    server is stopped here and the process ends without that join.
    """
    try:
        stop_local_server()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


ConfigOption = Annotated[str, typer.Option("--config", "-c", help="A YAML file in conf/.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one value, e.g. -s fine_tune.lr_factor=0.2"),
]

# Prefect's temporary local server needs ~20 s to start on 2 cores, its default time-out is 20 s.
_QUIET_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "DVC_NO_ANALYTICS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # Prefect's temporary server keeps its state in SQLite. On a loaded 2-core host a comparison's
    # cells and workers queued behind its 10 s statement timeout, the server answered 503 on
    # every retry of a concurrency-slot request, and the flow failed 4 minutes in; with these,
    # the same comparison finished.
    "PREFECT_SERVER_DATABASE_TIMEOUT": "60",
    "PREFECT_CLIENT_MAX_RETRIES": "10",
}


class _NoTracebackForExpectedErrors(logging.Filter):
    """Prefect logs a failed task or flow with its traceback; an expected error needs none, nor
    does a stop that a signal asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and (
            isinstance(error, ExpectedError) or signal_exit_status(error) is not None
        ):
            record.exc_info, record.exc_text = None, None
        return True


@app.callback()
def _environment() -> None:
    for name, value in _QUIET_DEFAULTS.items():
        os.environ.setdefault(name, value)
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_NoTracebackForExpectedErrors())
    move_tracking_credentials()  # before any flow, worker or log line sees the tracking URI


@command()
def train(config: ConfigOption = "conf/default.yaml", set_: SetOption = None) -> None:
    """Run the training flow: pull data, train head, fine-tune in stages, register, promote."""
    result = _run_flow("flows.train:train_classifier", config, list(set_ or []))
    typer.echo("")
    for done in result.resumed:
        typer.echo(f"Resumed:      {resumed_line(done.stage, done.run_id)}")
    typer.echo("Test scores per stage:")
    for stage in result.stages:
        typer.echo(f"  {stage.line()}")
    typer.echo(
        f"MLflow run:   {result.run_id} (experiment {result.experiment_id}) on "
        f"{redact_url(result.tracking_uri)}"
    )
    if result.skipped_images:
        typer.echo(
            f"Skipped:      {result.skipped_images} undecodable images "
            "(listed in skipped_images.csv on the run)"
        )
    registered = registration_line(result.model_name, result.version, result.decision.promote)
    typer.echo(f"Registered:   {registered}")
    typer.echo(f"Decision:     {result.decision.reason}")
    hint = ui_hint(result.tracking_uri, project_root(config), result.experiment_id)
    typer.echo(f"MLflow UI:    {hint}")


@command("check-data")
def check_data(config: ConfigOption = "conf/default.yaml", set_: SetOption = None) -> None:
    """Run the data gate alone: duplicates, leaks, label issues, class balance, blank images."""
    gate = _run_flow("flows.check_data:check_data_only", config, list(set_ or []))
    fit = gate.summary["domain_fit"]
    if fit:
        typer.echo(
            f"Domain fit: LogME {fit['pretrained']:.3f} pretrained, {fit['random_init']:.3f} "
            f"random init, on {fit['images']:.0f} training images"
        )
    if gate.failed:
        _fail(ExpectedError(gate.line))
    typer.echo(gate.line)


@command()
def compare(config: ConfigOption = "conf/compare.yaml", set_: SetOption = None) -> None:
    """Compare strategies (from scratch, feature extraction, fine-tuning) at several label budgets."""
    result = _run_flow("flows.compare:compare_strategies", config, list(set_ or []))
    typer.echo("")
    typer.echo(comparison_text(result.table, result.decision.metric))
    registered = registration_line(result.model_name, result.version, result.decision.promote)
    typer.echo(f"Winner:        {result.winner_reason} (run {result.best_run_id})")
    typer.echo(f"Registered:    {registered}: {result.decision.reason}")
    typer.echo(f"Charts:        {result.files.chart}, {result.files.data_efficiency}")
    typer.echo(
        f"MLflow:        experiment {result.experiment_id}, runs tagged "
        f"comparison_id={result.comparison_id} (make mlflow-ui)"
    )


def comparison_text(table, metric: str) -> str:
    """The comparison table for a terminal: mean, interval and cost per strategy and budget."""
    shown = table.assign(
        interval=[
            f"[{low:.4f}, {high:.4f}]"
            for low, high in zip(
                table[f"test_{metric}_ci_low"], table[f"test_{metric}_ci_high"], strict=True
            )
        ],
        within_best=table["within_best"].map({True: "yes", False: ""}),
    )
    columns = {
        "strategy": "strategy",
        "labels_per_class": "labels",
        "seeds": "seeds",
        f"test_{metric}_mean": f"{metric} mean",
        f"test_{metric}_std": "std",
        "interval": "interval",
        "within_best": "within best",
        "trainable_params": "trainable",
        "training_seconds": "seconds",
    }
    shown = shown[list(columns)].rename(columns=columns)
    return shown.to_string(
        index=False,
        formatters={"seconds": "{:.0f}".format},
        float_format=lambda value: f"{value:.4f}",
    )


@command("demo-data")
def demo_data(config: ConfigOption = "conf/default.yaml", set_: SetOption = None) -> None:
    """Build the Fashion-MNIST demo dataset, pin it with DVC (data.dvc) and push it to the remote."""
    result = _run_flow("flows.demo_data:prepare_demo_data", config, list(set_ or []))
    counts = ", ".join(f"{split} {count}" for split, count in result.counts.items())
    typer.echo(f"Demo data: {counts} images, DVC version {result.built}")
    if result.pinned is None:
        typer.echo("data.dvc did not exist: it now pins this version; commit it.")
    elif result.matches_pin:
        typer.echo("This is exactly the version the committed data.dvc pins.")
    else:
        typer.secho(
            f"WARNING: the data built here DIFFERS from the version the committed data.dvc pinned\n"
            f"  pinned: {result.pinned}\n  built:  {result.built}\n"
            "data.dvc now pins the built version (see `git diff data.dvc`); the demo trains on it.",
            fg=typer.colors.YELLOW,
            err=True,
        )


@command()
def retrain(config: ConfigOption = "conf/default.yaml", set_: SetOption = None) -> None:
    """Run the scheduled flow once: train only if data.dvc or the config changed since the champion."""
    result = _run_flow("flows.retrain:retrain_classifier", config, list(set_ or []))
    typer.echo(f"Retraining check: {result.decision.reason}")
    if result.training is not None:
        training = result.training
        registered = registration_line(
            training.model_name, training.version, training.decision.promote
        )
        typer.echo(f"Registered: {registered}")


@command()
def serve(config: ConfigOption = "conf/default.yaml", set_: SetOption = None) -> None:
    """Serve the retraining deployment on the config's `schedule:` (needs PREFECT_API_URL)."""
    _require_prefect_server()

    _run_flow("flows.retrain:serve_retraining", config, list(set_ or []))


@command()
def deploy(
    pool: Annotated[str, typer.Option("--pool", "-p", help="The Prefect work pool.")],
    config: ConfigOption = "conf/default.yaml",
    set_: SetOption = None,
) -> None:
    """Register the retraining deployment for a work pool's workers instead of serving it here."""
    _require_prefect_server()
    # lazy: flows.retrain loads Prefect and TensorFlow, which --help and other commands skip
    from flows.retrain import deploy_retraining

    deploy_retraining(config, list(set_ or []), pool)
    typer.echo(
        f"Deployed to work pool '{pool}'; start a worker: prefect worker start --pool {pool}"
    )


@command("deploy-cells")
def deploy_cells(
    pool: Annotated[str, typer.Option("--pool", "-p", help="The Prefect work pool.")],
) -> None:
    """Register the one-cell comparison flow for a work pool (then set compare.work_pool)."""
    _require_prefect_server()
    # lazy: flows.compare_cell loads Prefect and TensorFlow, which --help and other commands skip
    from flows.compare_cell import deploy_cells as deploy

    name = deploy(pool)
    typer.echo(
        f"Deployed {name}; start workers with `prefect worker start --pool {pool}`, then run "
        f"`transferflow compare -s compare.work_pool={pool}`"
    )


def _require_prefect_server() -> None:
    # Here, not at the top: Prefect stays out of --help and the registry commands.
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        typer.secho(
            "PREFECT_API_URL is not set: a deployment needs a Prefect server that outlives this "
            "command. Run `make serve` (starts one on http://127.0.0.1:4200), or set "
            "PREFECT_API_URL=http://<host>:4200/api.",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(EXPECTED_ERROR_EXIT)


ModelNameOption = Annotated[str, typer.Option("--model", help="The registered model's name.")]
ReasonOption = Annotated[str, typer.Option("--reason", help="Why; recorded on the version.")]


@command()
def promote(
    model: ModelNameOption,
    version: Annotated[int, typer.Option("--version", help="The version to make champion.")],
    reason: ReasonOption = "",
    config: ConfigOption = "conf/default.yaml",
) -> None:
    """Make a registered version the champion by hand, bypassing the gate (recorded on it)."""
    # lazy: MLflow reads MLFLOW_DISABLE_TELEMETRY once, on import; _environment sets it first
    from tasks.registry.hand_moves import promote_version

    _show_move(_registry_action(lambda uri: promote_version(uri, model, version, reason), config))


@command()
def rollback(
    model: ModelNameOption, reason: ReasonOption = "", config: ConfigOption = "conf/default.yaml"
) -> None:
    """Move the champion back to the version that held it before (repeat to go further back)."""
    # lazy: MLflow reads MLFLOW_DISABLE_TELEMETRY once, on import; _environment sets it first
    from tasks.registry.hand_moves import rollback_champion

    _show_move(_registry_action(lambda uri: rollback_champion(uri, model, reason), config))


def _registry_action(action, config: str):
    """Run a promotion or rollback on MLFLOW_TRACKING_URI, else the project's store."""
    uri = tracking_uri(project_root(config))
    check_tracking_server(uri)
    return action(uri)


def _show_move(move) -> None:
    was = f"v{move.previous}" if move.previous else "none"
    typer.echo(f"{move.name}: champion is now v{move.champion} (was {was})")
    typer.echo(f"Recorded:     {move.decision} by {move.by} at {move.at}: {move.reason}")


@command()
def predict(
    images: Annotated[
        str, typer.Option("--images", help="A folder of images, searched recursively.")
    ],
    model: Annotated[
        str | None,
        typer.Option(help="An MLflow model URI [default: models:/<registry.model_name>@champion]"),
    ] = None,
    output: Annotated[str, typer.Option(help="The CSV to write.")] = "predictions.csv",
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    config: ConfigOption = "conf/default.yaml",
) -> None:
    """Label every image in a folder with a registered model; write path,label,probability."""
    if model is None:
        model = f"models:/{load_config(config).registry.model_name}@champion"
    uri = tracking_uri(project_root(config))
    result = _run_flow(
        "flows.predict:predict_folder", config, [], model, images, output, batch_size, uri
    )
    typer.echo(f"Wrote {result.count} predictions by {result.model} to {result.output}")
    typer.echo("Labels: " + ", ".join(f"{k} {v}" for k, v in result.label_counts.items()))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
