"""Tracking helpers that must not leak state into later runs in the same process."""

from __future__ import annotations

import os

import mlflow
import pytest

from tasks.runtime.tracking_server import tracking_uri, using_tracking_uri
from tasks.tracking.runs import flatten


def test_fluent_block_leaves_no_tracking_uri_behind(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with using_tracking_uri(f"sqlite:///{tmp_path / 'a.db'}"):
        assert mlflow.get_tracking_uri().endswith("a.db")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    # The next project in this process logs to its own store, not the last one used.
    assert tracking_uri(tmp_path / "other") == f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"


def test_fluent_block_keeps_the_users_tracking_server(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    with using_tracking_uri(f"sqlite:///{tmp_path / 'a.db'}"):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"
    assert tracking_uri(tmp_path) == "http://127.0.0.1:5999"


@pytest.mark.parametrize(
    ("tree", "flat"),
    [
        ({"a": {"b": 1}}, {"a.b": "1"}),
        (
            {"stages": [{"unfreeze_blocks": 2}, {"unfreeze_blocks": "all"}]},
            {"stages.0.unfreeze_blocks": "2", "stages.1.unfreeze_blocks": "all"},
        ),
        ({"options": {}}, {}),
    ],
)
def test_flatten_names_every_leaf(tree, flat) -> None:
    assert flatten(tree) == flat
