"""How well the data gate (`transferflow check-data`) finds planted problems, what it flags on
clean data, and what it costs.

Copies the demo data into two temporary projects. One stays clean: its flags are false alarms
or Fashion-MNIST's own copies. The other gets, with a fixed seed, 300 near copies (resized by
10-20 % up or down, JPEG quality 70), 50 also cropped by 5 % on one side (scored apart, outside
the target) and 100 byte copies under new names, each in a split other than its source's; then
5 % of all labels flipped to another class. The real command runs with every check at `warn`,
caches in the temporary folder and no DVC pull; flagged.csv and summary.json are scored:
a planted pair is found when both images are flagged as copies of each other, and precision is
the planted share of the cross-split pairs flagged; label_issue is scored against the flipped
rows. Unplanted label_issue flags, which Fashion-MNIST's ambiguous labels earn too, are counted
among the classes it confuses (t-shirt_top, shirt, pullover, coat) and 40 drawn to judge by eye.
Seconds from summary.json: the clean data with a cold feature cache (the gate makes the
frozen-feature pass training would make), with warm features (the gate's own cost), and with
findings kept. Each command takes 20-50 s (TensorFlow, Prefect's temporary server).

    PYTHONPATH=. .venv/bin/python bench/data_checks.py --seed 0 --out /tmp/data-checks-bench

Prints a Markdown table and the figures; writes results.json and pictures to --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from conf.loader import load_config
from tasks.data.checks import CHECKS
from tasks.data.pixels import summarize_pixels

ROOT = Path(__file__).resolve().parents[1]
CONFUSED = {"t-shirt_top", "shirt", "pullover", "coat"}
SPLITS = ("train", "val", "test")
PARTNER = {  # where each check's detail names the other image of a pair
    "exact_duplicate": r"copy in \S+ (.+) \(same pixels\)$",
    "near_duplicate": r"copy in \S+ (.+) \(similarity [0-9.]+\)$",
    "conflicting_label": r"its copy (.+) \(\w+\) is labelled",
}


@dataclass(frozen=True)
class Run:
    """One check-data run: its wall time, summary.json, flagged.csv and report folder."""

    wall: float
    summary: dict
    flagged: pd.DataFrame
    report: Path


def make_project(work: Path, name: str, data: Path) -> Path:
    """A project folder holding conf/ and a copy of the data, a git repository so that the
    config's project root is this folder."""
    project = work / name
    shutil.copytree(ROOT / "conf", project / "conf")
    shutil.copytree(data, project / "data")
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    return project


def plant(data: Path, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Add copies to data/manifest.csv and flip 5 % of its labels; the truth of both."""
    rng = np.random.default_rng(seed)
    frame = pd.read_csv(data / "manifest.csv", dtype=str)
    classes = sorted(frame["label"].unique())
    (data / "images" / "planted").mkdir()
    sources = rng.choice(len(frame), 450, replace=False)
    kinds = ["near"] * 300 + ["cropped"] * 50 + ["exact"] * 100
    added, truth = [], []
    for number, (row, kind) in enumerate(zip(sources, kinds, strict=True)):
        source = frame.iloc[row]
        split = rng.choice([s for s in SPLITS if s != source["split"]])
        suffix = "png" if kind == "exact" else "jpg"
        copy = f"images/planted/{kind}_{number:04d}.{suffix}"
        if kind == "exact":
            shutil.copyfile(data / source["path"], data / copy)
        else:
            with Image.open(data / source["path"]) as image:
                factor = rng.uniform(*(1.1, 1.2) if rng.random() < 0.5 else (0.8, 0.9))
                size = (round(image.width * factor), round(image.height * factor))
                image = image.convert("L").resize(size, Image.Resampling.BICUBIC)
            if kind == "cropped":
                cut = max(1, round(0.05 * size[0]))
                box = [(cut, 0, *size), (0, 0, size[0] - cut, size[1])]
                box += [(0, cut, *size), (0, 0, size[0], size[1] - cut)]
                image = image.crop(box[rng.integers(4)])
            image.save(data / copy, "JPEG", quality=70)
        added.append({"path": copy, "label": source["label"], "split": split})
        truth.append(
            {"copy": copy, "source": source["path"], "kind": kind, "label": source["label"]}
        )
    frame = pd.concat([frame, pd.DataFrame(added)], ignore_index=True)
    flips = rng.choice(len(frame), round(0.05 * len(frame)), replace=False)
    true_labels = frame["label"].iloc[flips].tolist()
    for row, label in zip(flips, true_labels, strict=True):
        frame.at[row, "label"] = rng.choice([c for c in classes if c != label])
    frame.to_csv(data / "manifest.csv", index=False)
    flipped = frame.iloc[flips].rename(columns={"label": "given"}).assign(true=true_labels)
    return pd.DataFrame(truth), flipped


def check_data(project: Path, work: Path, transferflow: str) -> Run:
    """The real command on the project's manifest, every check at warn, caches under `work`."""
    overrides = [
        "data.dvc_file=null",
        f"data.path={project / 'data' / 'manifest.csv'}",
        f"feature_extraction.cache_dir={work / 'features'}",
        f"data.checks.cache_dir={work / 'checks'}",
        *(f"data.checks.{check}=warn" for check in CHECKS),
    ]
    command = [transferflow, "check-data", "-c", str(project / "conf" / "default.yaml")]
    for override in overrides:
        command += ["-s", override]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"check-data exited {done.returncode}:\n{done.stderr[-3000:]}")
    print(f"  {done.stdout.strip().splitlines()[-1]} ({wall:.1f} s)")
    report = project / "reports" / "data_checks"
    summary = json.loads((report / "summary.json").read_text())
    flagged = pd.read_csv(report / "flagged.csv", dtype=str, keep_default_na=False)
    return Run(wall, summary, flagged, report)


def flagged_pairs(flagged: pd.DataFrame) -> pd.DataFrame:
    """Pairs flagged from both sides, one row per pair and check: key (the two paths, sorted),
    check, leak, similarity."""
    pairs = []
    for check, pattern in PARTNER.items():
        rows = flagged[flagged["check"] == check]
        partner = rows["detail"].str.extract(pattern)[0]
        if partner.isna().any():
            print(f"  SURPRISE: {partner.isna().sum()} {check} detail(s) name no partner")
        similarity = rows["detail"].str.extract(r"similarity ([0-9.]+)")[0].astype(float)
        pairs.append(
            pd.DataFrame(
                {
                    "key": pair_keys(rows["path"], partner.fillna("?")),
                    "check": check,
                    "leak": rows["detail"].str.startswith("leak:").to_numpy(),
                    "similarity": similarity.fillna(1.0).to_numpy(),
                }
            )
        )
    found = pd.concat(pairs, ignore_index=True)
    sides = found.groupby(["key", "check"])["key"].transform("size")
    return found[sides == 2].drop_duplicates(["key", "check"]).reset_index(drop=True)


def pair_keys(first: pd.Series, second: pd.Series) -> list[tuple[str, str]]:
    return [tuple(sorted(pair)) for pair in zip(first, second, strict=True)]


def ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


DUPLICATES = ("exact_duplicate", "near_duplicate")
SCORED = (  # row; checks whose pairs count; planted kinds to find; cross-split pairs only; precision
    ("leak (target)", DUPLICATES, ("near", "exact"), True, True),
    ("exact_duplicate", ("exact_duplicate",), ("exact",), True, True),
    ("near_duplicate", ("near_duplicate",), ("near",), True, True),
    ("cropped 5 % (not in target)", DUPLICATES, ("cropped",), True, False),
    ("conflicting_label", ("conflicting_label",), ("near", "exact"), False, True),
)


def score_copies(truth: pd.DataFrame, flipped: pd.DataFrame, pairs: pd.DataFrame) -> list[dict]:
    """Recall and precision for leaks, each duplicate check, cropped copies, and conflicting
    labels (planted pairs of the target's kinds left with different labels by the flips)."""
    label = dict(zip(flipped["path"], flipped["given"], strict=True))
    truth = truth.assign(
        key=pair_keys(truth["copy"], truth["source"]),
        differ=[
            label.get(copy, planted_as) != label.get(source, planted_as)
            for copy, source, planted_as in truth[["copy", "source", "label"]].itertuples(False)
        ],
    )
    rows = []
    for name, checks, kinds, cross, precise in SCORED:
        keys = set(pairs.loc[pairs["check"].isin(checks) & (pairs["leak"] | (not cross)), "key"])
        wanted = truth["kind"].isin(kinds) & (truth["differ"] | (name != "conflicting_label"))
        wanted = set(truth.loc[wanted, "key"])
        right = len(keys & set(truth["key"]))
        rows.append(
            {
                "check": name,
                "planted": len(wanted),
                "found": len(wanted & keys),
                "recall": ratio(len(wanted & keys), len(wanted)),
                "flagged": len(keys) if precise else None,
                "precision": ratio(right, len(keys)) if precise else None,
            }
        )
    return rows


def similarity_of(truth: pd.DataFrame, data: Path) -> dict:
    """Each kind's planted pairs as the near-duplicate check sees them: the correlation of the
    gate's own descriptors (tasks.data.pixels), lowest, 5th percentile and median."""
    copies = summarize_pixels([str(data / path) for path in truth["copy"]]).descriptor
    sources = summarize_pixels([str(data / path) for path in truth["source"]]).descriptor
    similarity = pd.Series(np.einsum("ij,ij->i", copies, sources), index=truth["kind"])
    return {
        kind: [round(float(v), 4) for v in values.quantile([0, 0.05, 0.5])]
        for kind, values in similarity.groupby(level=0)
    }


def score_labels(flagged: pd.DataFrame, flipped: pd.DataFrame, data: Path, out: Path) -> dict:
    """label_issue against the flipped rows, and the unplanted flags: how many among the classes
    Fashion-MNIST confuses, and a picture of 40 of them."""
    issues = flagged[flagged["check"] == "label_issue"].copy()
    issues["given"] = issues["detail"].str.extract(r"labelled '([^']+)'")[0]
    issues["suggested"] = issues["detail"].str.extract(r"looks like '([^']+)'")[0]
    hit = issues["path"].isin(set(flipped["path"]))
    unplanted = issues[~hit]
    confused = unplanted["given"].isin(CONFUSED) & unplanted["suggested"].isin(CONFUSED)
    sample = unplanted.sample(min(40, len(unplanted)), random_state=0)
    cell, caption, font = 96, 30, ImageFont.load_default(size=11)
    canvas = Image.new("RGB", (8 * cell, 5 * (cell + caption)), "white")
    draw = ImageDraw.Draw(canvas)
    for n, item in enumerate(sample.itertuples()):
        left, top = (n % 8) * cell, (n // 8) * (cell + caption)
        with Image.open(data / item.path) as image:
            canvas.paste(
                image.convert("RGB").resize((cell - 8, cell - 8)), (left + 4, top + caption)
            )
        draw.multiline_text(
            (left + 4, top + 2), f"given {item.given}\nsugg. {item.suggested}", "black", font
        )
    canvas.save(out / "label_issue_unplanted.png")
    return {
        "check": "label_issue",
        "planted": len(flipped),
        "found": int(hit.sum()),
        "recall": ratio(int(hit.sum()), len(flipped)),
        "flagged": len(issues),
        "precision": ratio(int(hit.sum()), len(issues)),
        "unplanted": len(unplanted),
        "unplanted_given_in_confused_four": int(unplanted["given"].isin(CONFUSED).sum()),
        "unplanted_given_and_suggested_in_confused_four": int(confused.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="draws the planted problems")
    parser.add_argument("--out", type=Path, default=Path("/tmp/data-checks-bench"))
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "fashion_mnist")
    parser.add_argument("--keep", action="store_true", help="keep the temporary projects")
    args = parser.parse_args()
    print(
        f"Reproduce: PYTHONPATH=. {sys.executable} bench/data_checks.py --seed {args.seed} "
        f"--out {args.out} --data {args.data}\nSeed: {args.seed}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="data-checks-bench-"))
    tool = str(Path(sys.executable).parent / "transferflow")

    clean = make_project(work, "clean", args.data)
    print("Clean demo data: cold feature cache; warm features, no kept findings; kept findings")
    cold = check_data(clean, work, tool)
    shutil.rmtree(work / "checks")
    warm, kept = check_data(clean, work, tool), check_data(clean, work, tool)
    shutil.copyfile(cold.report / "flagged.png", args.out / "clean_flagged.png")

    planted = make_project(work, "planted", args.data)
    truth, flipped = plant(planted / "data", args.seed)
    print(f"Planted: {truth['kind'].value_counts().to_dict()}; {len(flipped)} labels flipped")
    for cache in ("features", "checks"):
        shutil.rmtree(work / cache)
    found, again = check_data(planted, work, tool), check_data(planted, work, tool)
    shutil.copyfile(found.report / "flagged.png", args.out / "planted_flagged.png")

    pairs, clean_pairs = flagged_pairs(found.flagged), flagged_pairs(cold.flagged)
    rows = score_copies(truth, flipped, pairs)
    rows.append(score_labels(found.flagged, flipped, planted / "data", args.out))
    leaks = pairs[pairs["check"].isin(DUPLICATES) & pairs["leak"]]
    extra = leaks[~leaks["key"].isin(set(pair_keys(truth["copy"], truth["source"])))]
    in_clean = int(extra["key"].isin(set(clean_pairs["key"])).sum())
    print("\n| check | planted | found | recall | pairs/flags raised | precision |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        shown = ["-" if row[k] is None else row[k] for k in ("recall", "flagged", "precision")]
        print(
            f"| {row['check']} | {row['planted']} | {row['found']} | "
            + " | ".join(map(str, shown))
            + " |"
        )
    issues = rows[-1]
    threshold = load_config(clean / "conf" / "default.yaml").data.checks.near_duplicate_similarity
    similarity = similarity_of(truth, planted / "data")
    print(
        f"\nUnplanted cross-split pairs flagged on the planted data: {len(extra)}, of which "
        f"{in_clean} the clean data already holds.\nPlanted pairs' similarity (lowest, 5th "
        f"percentile, median; threshold {threshold}): {similarity}"
        f"\nUnplanted label_issue flags: {issues['unplanted']}; given label among "
        f"{sorted(CONFUSED)}: {issues['unplanted_given_in_confused_four']}, given and suggested "
        f"both there: {issues['unplanted_given_and_suggested_in_confused_four']}; 40 of them "
        f"drawn in {args.out / 'label_issue_unplanted.png'} to judge by eye."
    )
    clean_flags = {check: cold.summary["counts"][check] for check in CHECKS}
    clean_leaks = [
        {"check": p.check, "pair": list(p.key), "similarity": p.similarity}
        for p in clean_pairs[clean_pairs["leak"]].itertuples()
    ]
    print(f"\nFlags on the clean demo data ({cold.summary['images']} images): {clean_flags}")
    print(f"Cross-split pairs there: {len(clean_leaks)}")
    for leak in clean_leaks:
        print(f"  {leak['check']}: {' ~ '.join(leak['pair'])} (similarity {leak['similarity']})")
    times = {
        "clean_cold_features": cold.summary["seconds"],
        "clean_warm_features_no_kept_findings": warm.summary["seconds"],
        "clean_kept_findings": kept.summary["seconds"],
        "planted_cold_features": found.summary["seconds"],
        "planted_kept_findings": again.summary["seconds"],
        "kept_findings_reused": kept.summary["reused"] and again.summary["reused"],
        "command_wall": [round(r.wall, 1) for r in (cold, warm, kept, found, again)],
    }
    print("\nSeconds (summary.json; command_wall: the whole command, start-up included):")
    for name, value in times.items():
        print(f"  {name}: {value}")
    results = {"seed": args.seed, "scores": rows, "unplanted_leak_pairs": len(extra)}
    results |= {"unplanted_leak_pairs_in_clean_data": in_clean, "similarity": similarity}
    results |= {"clean_flags": clean_flags, "clean_leak_pairs": clean_leaks, "seconds": times}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nWrote {args.out / 'results.json'} and the pictures beside it.")
    if args.keep:
        print(f"Kept {work}")
    else:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
