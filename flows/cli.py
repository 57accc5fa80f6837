"""The `transferflow` command: train, build the demo data, and show where the results are."""

from __future__ import annotations

import os
from typing import Annotated

import typer

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)

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
    "DVC_NO_ANALYTICS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


@app.callback()
def _environment() -> None:
    for name, value in _QUIET_DEFAULTS.items():
        os.environ.setdefault(name, value)


@app.command()
def train(config: ConfigOption = "conf/default.yaml", set_: SetOption = None) -> None:
    """Run the training flow: pull data, train head, fine-tune in stages, register, promote."""
    from conf import project_root
    from flows.train import train_classifier
    from tasks.tracking import ui_hint

    result = train_classifier(config, list(set_ or []))
    typer.echo("")
    typer.echo("Test scores per stage:")
    for stage in result.stages:
        typer.echo(
            f"  {stage.stage:<20} accuracy {stage.test_accuracy:.4f}  macro-F1 {stage.test_macro_f1:.4f}"
            f"  ({stage.epochs_run} epochs, {stage.train_seconds:.0f} s)"
        )
    outcome = "now the champion" if result.decision.promote else "not promoted"
    typer.echo(
        f"MLflow run:   {result.run_id} (experiment {result.experiment_id}) on {result.tracking_uri}"
    )
    typer.echo(
        f"Registered:   {result.model_name} version {result.version}, alias 'challenger', {outcome}"
    )
    typer.echo(f"Decision:     {result.decision.reason}")
    hint = ui_hint(result.tracking_uri, project_root(config))
    if not hint.startswith("open "):
        hint += (
            f"\n              then open http://127.0.0.1:5000/#/experiments/{result.experiment_id}"
        )
    typer.echo(f"MLflow UI:    {hint}")


@app.command("demo-data")
def demo_data(config: ConfigOption = "conf/default.yaml", set_: SetOption = None) -> None:
    """Build the Fashion-MNIST demo dataset, pin it with DVC (data.dvc) and push it to the remote."""
    from flows.demo_data import prepare_demo_data

    result = prepare_demo_data(config, list(set_ or []))
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
