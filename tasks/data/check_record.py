"""The data gate's record: findings kept per data version and settings, the report a user reads
(flagged.csv, summary.json, a picture of the worst cases), and the one-line verdict."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from conf.data import DataChecksConfig
from tasks.data.checks import CHECKS, FLAGGED_COLUMNS, CheckFindings, CheckOutcome
from tasks.data.table import ImageTable
from tasks.runtime.run_log import run_logger

FLAGGED_FILE = "flagged.csv"
DROPPED_FILE = "dropped.csv"
SUMMARY_FILE = "summary.json"
PICTURE_FILE = "flagged.png"
_FINDINGS_FILE = "findings.csv"
_COUNTS_FILE = "class_counts.csv"
_NOTES_FILE = "notes.json"
_DOMAIN_FIT_FILE = "domain_fit.json"
_COLUMNS = 8
_MARGIN = 56


def findings_key(
    table: ImageTable,
    settings: DataChecksConfig,
    min_test_per_class: int,
    seed: int,
    data_version: str,
    features_key: str | None,
) -> str:
    """What the findings depend on: the data version, every row of the table, which checks run
    and their settings (not what each policy does with them), and the frozen features."""
    fields = settings.model_dump(exclude={"cache_dir", *CHECKS})
    fields["checks_on"] = [check for check in CHECKS if getattr(settings, check) != "off"]
    fields.update(
        min_test_per_class=min_test_per_class,
        seed=seed,
        data_version=data_version,
        features=features_key if reads_features(settings) else None,
        classes=list(table.classes),
    )
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for path, label, split in table.frame[["path", "label", "split"]].itertuples(index=False):
        digest.update(f"{path}\0{label}\0{split}\n".encode())
    return digest.hexdigest()[:32]


def load_findings(folder: Path) -> tuple[CheckFindings, Path] | None:
    """Findings stored in `folder` and their picture; None when absent or incomplete."""
    names = (_FINDINGS_FILE, _COUNTS_FILE, _NOTES_FILE, PICTURE_FILE, _DOMAIN_FIT_FILE)
    files = [folder / name for name in names]
    if not all(path.is_file() for path in files):
        return None
    try:
        flagged = pd.read_csv(files[0], keep_default_na=False, dtype={"path": str, "detail": str})
        flagged["suggested"] = flagged["suggested"].replace("", None)
        flagged["leak"] = flagged["leak"].astype(str) == "True"
        flagged["droppable"] = flagged["droppable"].astype(str) == "True"
        counts = pd.read_csv(files[1], index_col=0)
        notes = json.loads(files[2].read_text())
        domain_fit = json.loads(files[4].read_text())
    except (OSError, ValueError) as error:
        run_logger().warning(
            "Ignoring the data checks kept in %s (checking again): %s", folder, error
        )
        return None
    flagged["path"] = flagged["path"].astype(str)
    return CheckFindings(flagged, counts, notes, domain_fit), files[3]


def store_findings(folder: Path, findings: CheckFindings, picture: Path) -> None:
    """Keep the findings and their picture in `folder`, written aside and renamed into place, so
    a run that reads them sees a whole record or none."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    findings.flagged.to_csv(staging / _FINDINGS_FILE, index=False)
    findings.class_counts.to_csv(staging / _COUNTS_FILE)
    (staging / _NOTES_FILE).write_text(json.dumps(findings.notes))
    (staging / _DOMAIN_FIT_FILE).write_text(json.dumps(findings.domain_fit))
    shutil.copyfile(picture, staging / PICTURE_FILE)
    try:
        os.replace(staging, folder)
    except OSError:  # another run stored the same findings first
        shutil.rmtree(staging, ignore_errors=True)


def reads_features(settings: DataChecksConfig) -> bool:
    """Whether the gate needs the frozen features: for the label check or the domain fit."""
    return settings.label_issue != "off" or settings.domain_fit != "off"


def data_root(path: Path) -> Path:
    """The folder the table's paths are shown relative to: data.path, or its manifest's folder."""
    return path.parent if path.suffix.lower() == ".csv" else path


def shown_paths(paths: pd.Series, root: Path) -> list[str]:
    """Paths relative to `root` where they lie under it; empty stays empty (a class's finding)."""
    prefix = f"{root.resolve()}{os.sep}"
    return [p[len(prefix) :] if p.startswith(prefix) else p for p in paths]


def summary_of(outcome: CheckOutcome, settings: DataChecksConfig, data_version: str) -> dict:
    """summary.json: the counts per check, the decision and what drove it, classes per split."""
    counts = outcome.findings.class_counts
    train = counts["train"]
    return {
        "data_version": data_version,
        "decision": outcome.decision,
        "counts": outcome.counts,
        "failing": outcome.failing,
        "policies": {check: getattr(settings, check) for check in CHECKS},
        "dropped": len(outcome.dropped),
        "images": int(counts.to_numpy().sum()),
        "class_counts": {
            str(label): {split: int(n) for split, n in row.items()}
            for label, row in counts.iterrows()
        },
        "imbalance_ratio": float(train.max() / train.min()) if train.min() > 0 else None,
        "notes": outcome.findings.notes,
        "domain_fit": outcome.findings.domain_fit,
    }


def write_report(
    folder: Path,
    outcome: CheckOutcome,
    summary: dict,
    picture: Path,
    root: Path,
) -> None:
    """reports/data_checks/: flagged.csv (path,split,check,detail; paths relative to data.path),
    dropped.csv (the images `drop` left out of training, same columns: the finding that dropped
    each), summary.json and flagged.png."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in ((FLAGGED_FILE, outcome.findings.flagged), (DROPPED_FILE, outcome.dropped)):
        listed = frame[FLAGGED_COLUMNS].copy()
        listed["path"] = shown_paths(listed["path"], root)
        listed.to_csv(folder / name, index=False)
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    if picture.resolve() != (folder / PICTURE_FILE).resolve():
        shutil.copyfile(picture, folder / PICTURE_FILE)


def verdict(outcome: CheckOutcome, report: Path) -> str:
    """One line: what was found, what the policy did, where the report is."""
    found = ", ".join(
        f"{outcome.counts[check]} {check}" for check in CHECKS if outcome.counts.get(check)
    )
    found = found or "nothing flagged"
    if outcome.failing:
        stops = ", ".join(f"{n} {check}" for check, n in outcome.failing.items())
        return (
            f"Data checks failed ({stops}; copies between test and training: "
            f"{outcome.counts['test_leak']} pair(s)); "
            f"nothing was trained or registered. Found: {found}. Report: {report}"
        )
    dropped = (
        f"; {len(outcome.dropped)} image(s) dropped from training" if len(outcome.dropped) else ""
    )
    return f"Data checks passed: {found}{dropped}. Report: {report}"


def picture_rows(findings: CheckFindings, limit: int = 8) -> dict[str, pd.DataFrame]:
    """What the picture shows: the most likely label issues (cleanlab's order) and the
    duplicate pairs, leaks first, most alike first."""
    flagged = findings.flagged
    issues = flagged[flagged["check"] == "label_issue"].head(limit)
    pairs = flagged[flagged["check"].isin(["exact_duplicate", "near_duplicate"])]
    pairs = pairs[pairs["row"] < pairs["partner"]]
    pairs = pairs.sort_values("leak", ascending=False, kind="stable").head(limit)
    return {"label_issue": issues, "duplicate": pairs}


def draw_picture(findings: CheckFindings, table: ImageTable, path: Path) -> Path:
    """A PNG grid: the top row holds label issues with their given and suggested labels, the two
    rows below duplicate pairs one above the other, with their splits and labels."""
    rows = picture_rows(findings, limit=_COLUMNS)
    frame = table.frame
    cell, caption = 112, 30
    canvas = Image.new("RGB", (_MARGIN + _COLUMNS * cell, 3 * (cell + caption)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=11)

    def put(column: int, line: int, row: int, text: str) -> None:
        left, top = _MARGIN + column * cell, line * (cell + caption)
        with Image.open(frame["path"].iat[row]) as image:
            thumbnail = image.convert("RGB").resize((cell - 8, cell - 8))
        canvas.paste(thumbnail, (left + 4, top + caption))
        draw.multiline_text((left + 4, top + 2), text, fill="black", font=font, spacing=1)

    for column, item in enumerate(rows["label_issue"].itertuples()):
        put(
            column,
            0,
            int(item.row),
            f"given {frame['label'].iat[int(item.row)]}\nsuggested {item.suggested}",
        )
    for column, item in enumerate(rows["duplicate"].itertuples()):
        kind = "leak" if item.leak else "copy"
        for line, row in ((1, int(item.row)), (2, int(item.partner))):
            put(column, line, row, f"{kind}, {frame['split'].iat[row]}\n{frame['label'].iat[row]}")
    draw.text((4, caption + cell // 2), "label\nissues", fill="black", font=font)
    draw.text((4, 2 * caption + cell + cell // 2), "copies", fill="black", font=font)
    if rows["label_issue"].empty and rows["duplicate"].empty:
        draw.text(
            (_MARGIN + 8, caption + 8), "No label issues or copies found.", fill="black", font=font
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
