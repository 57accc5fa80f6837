"""Fine-tuning through the activation cache: the same stage as through the whole model, cheaper."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from tests.tiny_stages import fresh_classifier, setting, train_stage

pytestmark = pytest.mark.training


@pytest.mark.parametrize(
    ("architecture", "head"),
    [("MobileNet", True), ("MobileNetV2", True), ("MobileNet", False)],
    ids=["MobileNet-after-head", "MobileNetV2-after-head", "MobileNet-stages-alone"],
)
def test_a_stage_through_the_cache_ends_where_the_whole_model_does(
    tmp_path: Path, tiny_table, architecture: str, head: bool, caplog
) -> None:
    """MobileNet is one chain of blocks; MobileNetV2's blocks hold skip connections. After the
    head's stage, the activations come from the feature pass; on their own, each stage fills
    the cache at its cut."""
    start = fresh_classifier(tiny_table, architecture).model.get_weights()
    whole_model, whole = train_stage(
        setting(tmp_path / "whole", architecture, activation_cache_mb=0),
        tiny_table,
        architecture,
        head,
        start,
    )
    # The stage says how it trains in its Prefect run's log; the tests keep Prefect at WARNING.
    with caplog.at_level(logging.INFO, logger="prefect"):
        cached_model, cached = train_stage(
            setting(tmp_path / "cached", architecture), tiny_table, architecture, head, start
        )
    through = [line for line in caplog.messages if "trains through the activation cache" in line]
    assert len(through) == 2
    assert all(line.endswith("reused)" if head else "computed)") for line in through)
    if head:  # the feature pass that also wrote the activations wrote the same features
        features = list((tmp_path / "whole" / "cache").glob("*.features.npy"))
        assert len(features) == 3  # train, validation and test
        for stored in features:
            alongside = np.load(tmp_path / "cached" / "cache" / stored.name)
            assert np.array_equal(np.load(stored), alongside)
    differences = [
        float(np.max(np.abs(a.numpy() - b.numpy())))
        for a, b in zip(whole_model.model.weights, cached_model.model.weights, strict=True)
    ]
    print(f"{architecture}: largest weight difference {max(differences):.2e}")
    assert max(differences) < 1e-4
    moved = [
        float(np.max(np.abs(a - b.numpy())))
        for a, b in zip(start, cached_model.model.weights, strict=True)
    ]
    assert max(moved) > 1e-3  # the stage trained
    assert cached.history.epochs["loss"] == pytest.approx(whole.history.epochs["loss"], rel=1e-4)
    assert cached.history.trainable_params == whole.history.trainable_params
    assert cached.evaluation.accuracy == whole.evaluation.accuracy
    assert cached.evaluation.loss == pytest.approx(whole.evaluation.loss, rel=1e-4)


def test_over_the_budget_the_stage_trains_through_the_whole_model_and_says_so(
    tmp_path: Path, tiny_table, caplog
) -> None:
    with caplog.at_level(logging.INFO, logger="prefect"):
        train_stage(
            setting(tmp_path, "MobileNet", activation_cache_mb=0.01), tiny_table, "MobileNet"
        )
    assert "trains through the whole model (no activation cache: its activations at" in caplog.text
    assert "over fine_tune.activation_cache_mb (0.01))" in caplog.text
    assert not (tmp_path / "cache" / "activations").exists()


def test_the_head_s_feature_pass_fills_the_cuts_of_strategies_compared_with_it(
    tmp_path: Path, tiny_table, caplog
) -> None:
    """A comparison's first cell is often the head alone: its feature pass also writes the
    activations at the cuts of the strategies that fine-tune the same base, so their stages run
    no trunk pass of their own."""
    from conf import LoadedConfig
    from tasks.stages.base import StageInputs
    from tasks.stages.plan import transfer_stages

    fine_tuning = setting(tmp_path, "MobileNet")
    config = fine_tuning.config
    head_only = LoadedConfig(
        config.model_copy(update={"fine_tune": config.fine_tune.model_copy(update={"stages": []})}),
        tmp_path,
    )
    start = fresh_classifier(tiny_table, "MobileNet").model.get_weights()
    classifier = fresh_classifier(tiny_table, "MobileNet")
    classifier.model.set_weights(start)
    _, *compared_stages = transfer_stages(config)
    (head,) = transfer_stages(head_only.config)
    head.train(StageInputs(classifier, tiny_table, head_only, "v1", None, tuple(compared_stages)))
    written = sorted((tmp_path / "cache" / "activations").glob("*.features.npy"))
    assert len(written) == 2 * 3  # two cuts; training, validation and test images at each

    with caplog.at_level(logging.INFO, logger="prefect"):
        train_stage(fine_tuning, tiny_table, "MobileNet", start=start)
    through = [line for line in caplog.messages if "trains through the activation cache" in line]
    assert len(through) == 2 and all(line.endswith("reused)") for line in through), through
    assert sorted((tmp_path / "cache" / "activations").glob("*.features.npy")) == written
