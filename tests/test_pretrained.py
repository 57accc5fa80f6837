"""The genuine ImageNet MobileNet weights are pretrained: their features classify real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_imagenet_weights

pytestmark = [pytest.mark.slow, needs_imagenet_weights]


@pytest.fixture(scope="module")
def fashion_subset(tmp_path_factory):
    """40 training and 20 test images per class of real Fashion-MNIST, as PNG files."""
    from tasks.data.demo import write_demo_dataset
    from tasks.data.table import load_image_table

    root = tmp_path_factory.mktemp("fmnist") / "subset"
    write_demo_dataset(root, train_per_class=40, val_per_class=0, test_per_class=20, seed=1)
    return load_image_table(root / "manifest.csv", 0.0, 0.0, seed=1)


def head_accuracy(weights: str | None, table) -> float:
    """Feature extraction as the pipeline does it: frozen base, cached features, a trained head."""
    from tasks.data.stream import image_dataset
    from tasks.inference.evaluate import score_predictions
    from tasks.inference.forward import forward_pass
    from tasks.model.bases import build_base
    from tasks.model.classifier import build_classifier
    from tasks.stages.fitting import train_head

    base = build_base("MobileNet", weights, 96, {"alpha": 0.25})
    classifier = build_classifier(base, "MobileNet", 10, "avg", 0.2, 0, seed=0)
    train, test = (
        forward_pass(
            classifier.feature_extractor,
            image_dataset(table.split(s), table.classes, 96, 64),
            len(table.split(s)),
        )
        for s in ("train", "test")
    )
    train_head(
        classifier.head,
        train,
        None,
        epochs=60,
        learning_rate=3e-3,
        patience=1,
        batch_size=32,
        seed=0,
        stage="feature_extraction",
    )
    probabilities = np.asarray(classifier.head(test[0], training=False))
    return score_predictions(probabilities, test[1], table.classes).accuracy


def test_imagenet_features_beat_random_ones_on_real_fashion_mnist(
    fashion_subset, keras_home: Path
) -> None:
    assert (keras_home / "models" / "mobilenet_2_5_224_tf_no_top.h5").is_file()
    pretrained = head_accuracy("imagenet", fashion_subset)
    scratch = head_accuracy(None, fashion_subset)
    # 40 labels per class: ImageNet features reach about 0.7; a random base stays near chance.
    assert pretrained >= 0.6, pretrained
    assert pretrained >= scratch + 0.3, (pretrained, scratch)
