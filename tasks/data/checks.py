"""The data gate's checks on an image table, and the policy that turns their findings into a
decision: go on, go on without some images, or stop before training."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from conf.data import CHECK_NAMES, DataChecksConfig
from tasks.data.duplicates import conflicting_rows, duplicate_rows, exact_pairs, near_pairs
from tasks.data.errors import DataError
from tasks.data.label_issues import find_likely_label_errors
from tasks.data.pixels import PixelSummary
from tasks.data.table import SPLITS, ImageTable

CHECKS = CHECK_NAMES
# The checks that read the pixels: with all of them off, no image is decoded.
PIXEL_CHECKS = ("exact_duplicate", "near_duplicate", "conflicting_label", "blank_image")
FLAGGED_COLUMNS = ["path", "split", "check", "detail"]
_POLICY_COLUMNS = ["row", "leak", "droppable", "partner", "partner_split", "suggested"]


class DataChecksError(DataError):
    """The data cannot be checked or trained on as it is: every image a copy, a class of one
    image, nothing but blank images."""


class DataChecksFailedError(DataError):
    """A check whose policy is `fail` found something: nothing is trained or registered."""


@dataclass(frozen=True)
class CheckFindings:
    """What the checks found, before any policy: one row per flagged image (or class).

    `flagged` has the columns path, split, check, detail, and for the policy `leak` (a copy
    across splits) and `droppable` (the image `drop` removes); `partner` is the other image of
    a pair (row number, -1 for none) and `partner_split` its split, `suggested` a label
    issue's suggested label.
    `class_counts` has a row per class and a column per split. `notes` says what a check could
    not do.
    """

    flagged: pd.DataFrame
    class_counts: pd.DataFrame
    notes: dict[str, str] = field(default_factory=dict)
    # The domain fit: LogME of the pretrained and the random-init features, the images scored.
    domain_fit: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckOutcome:
    """The findings under the policy: the table to train on, the images dropped, the decision.

    `failing` counts, for each check that stops the run, the findings that stop it.
    """

    findings: CheckFindings
    table: ImageTable
    dropped: pd.DataFrame
    failing: dict[str, int]
    counts: dict[str, int]

    @property
    def decision(self) -> str:
        if self.failing:
            return "fail"
        return "drop" if len(self.dropped) else "pass"


def find_problems(
    table: ImageTable,
    pixels: PixelSummary | None,
    features: np.ndarray | None,
    settings: DataChecksConfig,
    min_test_per_class: int,
    seed: int,
    names: list[str] | None = None,
) -> CheckFindings:
    """Run every check that is not `off` on `table` (pixels and features in the frame's order;
    no pixels when every check that reads them is off, see `reads_pixels`).

    `names` are the paths as details quote them (relative to data.path; default the table's).
    """
    frame = table.frame
    paths = names if names is not None else frame["path"].tolist()
    if pixels is None:
        if reads_pixels(settings):
            raise ValueError("the pixel checks need the images' PixelSummary")
        pixels = PixelSummary.none(len(frame))
    _refuse_unusable(table, pixels, settings)
    rows: list[dict] = []
    notes: dict[str, str] = {}
    exact = exact_pairs(pixels)
    near = []
    if settings.near_duplicate != "off" or settings.conflicting_label != "off":
        near = near_pairs(pixels, settings.near_duplicate_similarity, exact)
    if settings.exact_duplicate != "off":
        rows += duplicate_rows(frame, exact, "exact_duplicate", paths)
    if settings.near_duplicate != "off":
        rows += duplicate_rows(frame, near, "near_duplicate", paths)
    if settings.conflicting_label != "off":
        rows += conflicting_rows(frame, exact + near, paths)
    if settings.blank_image != "off":
        blank = np.flatnonzero(pixels.spread < settings.blank_spread)
        splits = frame["split"].to_numpy()
        rows += [
            {
                "row": int(row),
                "check": "blank_image",
                "detail": f"grey values vary by {pixels.spread[row]:.2f} (standard deviation)",
                "droppable": splits[row] != "test",
            }
            for row in blank
        ]
    if settings.label_issue != "off":
        if features is None:
            raise ValueError("label_issue needs the frozen features of every image")
        found = find_likely_label_errors(
            features,
            table.label_ids(frame),
            len(table.classes),
            settings.label_issue_folds,
            seed,
        )
        if found.skipped:
            notes["label_issue"] = f"not checked: {found.skipped}"
        splits = frame["split"].to_numpy()
        rows += [
            {
                "row": int(row),
                "check": "label_issue",
                "detail": f"labelled {frame['label'].iat[row]!r}, looks like "
                f"{table.classes[suggested]!r} (p(given label) = {probability:.3f})",
                "droppable": splits[row] != "test",
                "suggested": table.classes[suggested],
            }
            for row, suggested, probability in zip(
                found.rows, found.suggested, found.given_probability, strict=True
            )
        ]
    counts = class_counts(table)
    flagged = _as_frame(rows, frame)
    if settings.class_balance != "off":
        balance = balance_rows(counts, settings, min_test_per_class)
        flagged = pd.concat([flagged, balance], ignore_index=True)
    return CheckFindings(flagged, counts, notes)


def reads_pixels(settings: DataChecksConfig) -> bool:
    """Whether any check that is on reads the images' pixels."""
    return any(getattr(settings, check) != "off" for check in PIXEL_CHECKS)


def _as_frame(rows: list[dict], frame: pd.DataFrame) -> pd.DataFrame:
    found = pd.DataFrame(rows, columns=["check", "detail", *_POLICY_COLUMNS])
    found["path"] = frame["path"].to_numpy()[found["row"].to_numpy(dtype=np.int64)]
    found["split"] = frame["split"].to_numpy()[found["row"].to_numpy(dtype=np.int64)]
    found["leak"] = found["leak"].fillna(False).astype(bool)
    found["droppable"] = found["droppable"].fillna(False).astype(bool)
    found["partner"] = found["partner"].fillna(-1).astype(np.int64)
    found["partner_split"] = found["partner_split"].fillna("")
    return found[[*FLAGGED_COLUMNS, *_POLICY_COLUMNS]]


def class_counts(table: ImageTable) -> pd.DataFrame:
    """Images per class (rows, in the table's class order) and split (columns)."""
    counts = pd.crosstab(table.frame["label"], table.frame["split"])
    return counts.reindex(index=list(table.classes), columns=list(SPLITS), fill_value=0)


def balance_rows(
    counts: pd.DataFrame, settings: DataChecksConfig, min_test_per_class: int
) -> pd.DataFrame:
    """A finding per class too small to train (fewer than `min_train_per_class` training
    images) or too small for the gate's per-class check (fewer than `min_test_per_class` test
    images), and one when the largest training class outnumbers the smallest by more than
    `max_imbalance`. `path` is empty: these are classes, not images."""
    rows = []
    for label, train in counts["train"].items():
        if train < settings.min_train_per_class:
            rows.append(
                (
                    "train",
                    f"class {label!r}: {train} training image(s), fewer than "
                    f"data.checks.min_train_per_class ({settings.min_train_per_class})",
                )
            )
    for label, test in counts["test"].items():
        if test < min_test_per_class:
            rows.append(
                (
                    "test",
                    f"class {label!r}: {test} test image(s); the promotion gate's per-class "
                    f"check needs {min_test_per_class} to show a drop of registry.max_class_drop",
                )
            )
    train = counts["train"]
    if len(train) > 1 and train.min() > 0 and train.max() / train.min() > settings.max_imbalance:
        rows.append(
            (
                "train",
                f"imbalance {train.max() / train.min():.1f}: {train.idxmax()!r} has "
                f"{train.max()} training images, {train.idxmin()!r} {train.min()} (above "
                f"data.checks.max_imbalance, {settings.max_imbalance:g})",
            )
        )
    flagged = pd.DataFrame(rows, columns=["split", "detail"])
    flagged.insert(0, "path", "")
    flagged.insert(2, "check", "class_balance")
    flagged["row"] = -1
    flagged["leak"] = False
    flagged["droppable"] = False
    flagged["partner"] = -1
    flagged["partner_split"] = ""
    flagged["suggested"] = None
    return flagged


def _refuse_unusable(table: ImageTable, pixels: PixelSummary, settings: DataChecksConfig) -> None:
    """Data no policy can make usable: one clear message, before anything is trained."""
    frame = table.frame
    totals = frame["label"].value_counts()
    single = sorted(label for label, count in totals.items() if count < 2)
    if single and settings.class_balance != "off":
        raise DataChecksError(
            f"class(es) {', '.join(single)} have a single image; a class needs images to train "
            "on and to test on. Add images or remove the class."
        )
    if settings.blank_image != "off" and len(frame):
        blank = pixels.spread < settings.blank_spread
        labels = frame["label"].to_numpy()
        all_blank = sorted(label for label in table.classes if blank[labels == label].all())
        if blank.all():
            raise DataChecksError(
                f"all {len(frame)} images are blank (grey values vary by less than "
                f"data.checks.blank_spread, {settings.blank_spread:g}); check how they were "
                "exported"
            )
        if all_blank:
            raise DataChecksError(
                f"every image of class(es) {', '.join(all_blank)} is blank (grey values vary "
                f"by less than data.checks.blank_spread, {settings.blank_spread:g}); check how "
                "they were exported"
            )
    distinct = len(set(pixels.digest))
    if settings.exact_duplicate != "off" and len(frame) > 1 and distinct == 1:
        raise DataChecksError(
            f"all {len(frame)} images have the same pixels; the data holds one picture"
        )


def leaks_into_test(flagged: pd.DataFrame) -> pd.Series:
    """Findings of a copy across splits with one side in the test split."""
    return flagged["leak"] & ((flagged["split"] == "test") | (flagged["partner_split"] == "test"))


def apply_policy(
    table: ImageTable, findings: CheckFindings, settings: DataChecksConfig
) -> CheckOutcome:
    """The decision under each check's policy, and the table without the images `drop` removes.

    `fail` counts every finding of the check, except that the duplicate checks count only
    copies between the test split and another: the leaks that inflate the test score the
    promotion gate trusts. Other copies (within a split, between training and validation) are
    recorded, as under `warn`.
    Dropping never empties a class of its training images: that is an error naming the class.
    """
    flagged = findings.flagged
    failing: dict[str, int] = {}
    dropping = pd.Series(False, index=flagged.index)
    for check in CHECKS:
        policy = getattr(settings, check)
        mine = flagged["check"] == check
        if policy == "fail":
            counted = mine & leaks_into_test(flagged) if check.endswith("_duplicate") else mine
            if counted.any():
                failing[check] = int(counted.sum())
        elif policy == "drop":
            dropping |= mine & flagged["droppable"]
    dropped = (
        flagged[dropping][["path", "split", "check", "detail"]]
        .drop_duplicates("path")
        .reset_index(drop=True)
    )
    frame = table.frame[~table.frame["path"].isin(set(dropped["path"]))].reset_index(drop=True)
    left = set(frame.loc[frame["split"] == "train", "label"])
    emptied = [label for label in table.classes if label not in left]
    if emptied and not failing:
        raise DataChecksError(
            f"dropping the {len(dropped)} flagged image(s) would leave class(es) "
            f"{', '.join(emptied)} no training image; fix the data, or set their checks to warn"
        )
    counts = {check: int((flagged["check"] == check).sum()) for check in CHECKS}
    counts["leak"] = int(flagged["leak"].sum() // 2)
    counts["test_leak"] = int(leaks_into_test(flagged).sum() // 2)
    counts["dropped"] = len(dropped)
    return CheckOutcome(findings, replace(table, frame=frame), dropped, failing, counts)
