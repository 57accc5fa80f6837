"""Every config in conf/ validates, and a bad value fails with a message naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from conf import ConfigError, PipelineConfig, load_config, project_root

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_validates(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, PipelineConfig)
    from tasks.model.bases import check_architecture

    check_architecture(config.base.architecture)


def test_default_is_the_documented_demo() -> None:
    config = load_config(CONF / "default.yaml")
    assert config.base.architecture == "MobileNet"
    assert config.base.options == {"alpha": 0.25}
    assert config.data.dvc_file == "data.dvc"
    assert config.demo.train_per_class == 100 and config.demo.test_per_class == 1000
    assert config.fine_tune.learning_rates(1e-3) == pytest.approx([1e-4, 1e-5])
    assert config.registry.gate == "non_inferiority"  # an equivalent retrain gets served


def test_variant_overrides_only_what_it_names() -> None:
    default, quick = load_config(CONF / "default.yaml"), load_config(CONF / "quick.yaml")
    assert quick.feature_extraction.epochs < default.feature_extraction.epochs
    assert quick.base == default.base and quick.data == default.data


def test_command_line_override_parses_yaml_values(tmp_path: Path) -> None:
    config = load_config(
        CONF / "default.yaml",
        ["base.weights=null", "data.image_size=64", "fine_tune.stages=[{unfreeze_blocks: all}]"],
    )
    assert config.base.weights is None
    assert config.data.image_size == 64
    assert config.fine_tune.stages[0].unfreeze_blocks == "all"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.image_sise=64", "data.image_sise"),
        ("head.dropout=1.5", "head.dropout"),
        ("data.image_size=-3", "data.image_size"),
        ("evaluation.primary_metric=auc", "evaluation.primary_metric"),
        ("fine_tune.stages=[{unfreeze_blocks: 3}, {unfreeze_blocks: 2}]", "fine_tune"),
        ("data.test_fraction=0.95", "data"),
        ("compute.precision=float16", "compute.precision"),
        ("compute.jit_compile=sometimes", "compute.jit_compile"),
    ],
)
def test_bad_value_is_named(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(CONF / "default.yaml", [override])
    assert named in str(error.value)


@pytest.mark.parametrize("gate", [None, "non_inferiority", "superiority"])
def test_min_improvement_without_the_threshold_gate_says_how_to_fix_it(gate: str | None) -> None:
    overrides = ["registry.min_improvement=0.02", *([f"registry.gate={gate}"] if gate else [])]
    with pytest.raises(ConfigError) as error:
        load_config(CONF / "default.yaml", overrides)
    message = str(error.value)
    assert "registry.min_improvement (0.02) applies to registry.gate: threshold only" in message
    assert f"registry.gate is {gate or 'non_inferiority'}" in message
    assert "Set registry.gate: threshold" in message and "remove min_improvement" in message

    kept = load_config(CONF / "default.yaml", [*overrides[:1], "registry.gate=threshold"])
    assert (kept.registry.gate, kept.registry.min_improvement) == ("threshold", 0.02)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    bad_override = CONF / "default.yaml"
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config(bad_override, ["no-equals-sign"])


def test_paths_resolve_against_the_repository(tmp_path: Path) -> None:
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "x.yaml"
    config.write_text("seed: 1\n")
    assert project_root(config) == tmp_path


def test_the_configuration_reference_lists_every_key_the_loader_accepts() -> None:
    from conf.reference import BEGIN, END, reference

    document = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    written = document[document.index(BEGIN) : document.index(END) + len(END)] + "\n"
    assert written == reference(), "docs/configuration.md is stale: python -m conf.reference"
    for key in ("data.image_size", "fine_tune.stages[].unfreeze_blocks", "compare.seeds"):
        assert f"`{key}`" in written
