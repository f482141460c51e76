"""Labelled datasets (MVTec AD layout as in paper §4.1, VisA split CSV) and their ground truth.

Readers return, per category, the nominal training image URIs and the test items (URI, label,
defect type, mask URI); helpers match scored URIs to test items and read masks (their crop-space
geometry is `preprocess.mask_to_crop`).
Local paths and fsspec URIs alike, via patchcore_core.storage.
"""

from __future__ import annotations

import csv
import io
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from patchcore_core import storage

NOMINAL = "good"  # MVTec's name for the defect-free test folder
MVTEC_LAYOUT = (
    "an MVTec AD layout: <category>/train/good/*.png, <category>/test/good/*.png, "
    "<category>/test/<defect>/*.png and <category>/ground_truth/<defect>/<name>_mask.png, "
    "given either as the root holding the category folders or as one category folder"
)
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_LABELS = {"normal": 0, "good": 0, "0": 0, "anomaly": 1, "bad": 1, "1": 1}


@dataclass(frozen=True)
class TestItem:
    """One labelled test image. label: 0 nominal, 1 defective; mask_uri None for nominal images.

    Mask pixels > 0 are defective (MVTec masks are 0/255; VisA masks use small non-zero labels).
    """

    uri: str
    label: int
    defect: str
    mask_uri: str | None


@dataclass(frozen=True)
class Category:
    """One category (VisA: object). train: sorted nominal image URIs (empty only when read with
    require_train=False); test: labelled items sorted by path, both labels present."""

    name: str
    train: tuple[str, ...]
    test: tuple[TestItem, ...]


# --------------------------------------------------------------------------- entry point


def load_dataset(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    require_train: bool = True,
) -> dict[str, Category]:
    """Categories of the dataset at `uri`, sorted by name; reads listings and CSVs, not images.

    uri: an MVTec AD root, one MVTec-style category folder, a VisA split CSV (object, split, label,
    image, mask), or a VisA root holding split_csv/1cls.csv. ValueError when the layout is wrong or
    incomplete, naming what was expected and found; require_train=False accepts no train images.
    """
    if uri.rstrip("/").lower().endswith(".csv"):
        return read_visa(uri, storage_options, require_train=require_train)
    visa_csv = storage.join_uri(uri, "split_csv", "1cls.csv")  # VisA's one-class split
    if storage.exists(visa_csv, storage_options):
        return read_visa(visa_csv, storage_options, require_train=require_train)
    return read_mvtec(uri, storage_options, require_train=require_train)


# --------------------------------------------------------------------------- MVTec AD layout


def _relative_paths(uri: str, storage_options: dict[str, Any] | None) -> tuple[str, dict[str, str]]:
    """(base URI, {path relative to uri: full URI}) of every image below `uri`.

    ValueError when `uri` is not a folder or holds no image.
    """
    if not storage.is_dir(uri, storage_options):
        raise ValueError(f"dataset {uri!r} is not a folder (or does not exist); expected {MVTEC_LAYOUT}")
    try:
        found = storage.list_images(uri, storage_options)
    except ValueError as err:
        raise ValueError(f"dataset {uri!r} holds no images; expected {MVTEC_LAYOUT}") from err
    base = storage.normalise_uri(uri)  # the form list_images gives its URIs
    if all(u.startswith(base + "/") for u in found):
        return base, {u[len(base) + 1 :]: u for u in found}
    raise AssertionError(f"listed images of {uri} do not share its prefix: {found[:3]}")


def _describe(paths: Sequence[str], depth: int) -> str:
    """'a/b/ (3 images), c/d/ (1 images)': the folders (first `depth` levels) holding images."""
    counts: dict[str, int] = {}
    for rel in paths:
        folder = "/".join(rel.split("/")[:-1][:depth]) or "."
        counts[folder] = counts.get(folder, 0) + 1
    shown = [f"{k}/ ({v} images)" for k, v in sorted(counts.items())[:12]]
    more = f", ... {len(counts) - 12} more" if len(counts) > 12 else ""
    return ", ".join(shown) + more if shown else "nothing"


def _mvtec_category(
    name: str, where: str, rel: dict[str, str], require_train: bool
) -> Category:
    """One category from {path relative to the category folder: URI}; `where` is for messages.

    Masks pair with test images by defect folder and file stem, with or without MVTec's `_mask`
    suffix. ValueError, listing what was found, when train/good/ is empty (if required), a test
    image is not directly in test/<defect>/, a defect image has no mask, or a label has no image.
    """
    train = sorted(u for r, u in rel.items() if r.startswith("train/good/"))
    tests = {r: u for r, u in rel.items() if r.startswith("test/")}
    # mask lookup: ground_truth/<defect>/<stem>[_mask].<ext>
    masks: dict[tuple[str, str], str] = {}
    for r, u in rel.items():
        parts = r.split("/")
        if parts[0] == "ground_truth" and len(parts) == 3:
            stem = posixpath.splitext(parts[2])[0]
            stem = stem[: -len("_mask")] if stem.endswith("_mask") else stem
            masks[(parts[1], stem)] = u
    found = _describe(list(rel), 2)
    if require_train and not train:
        raise ValueError(
            f"category {name!r} at {where}: no images in train/good/; expected {MVTEC_LAYOUT}; "
            f"found: {found}"
        )
    items, missing, misplaced = [], [], []
    for r, u in sorted(tests.items()):
        parts = r.split("/")
        if len(parts) != 3:  # test/<defect>/<file>, nothing deeper
            misplaced.append(r)
            continue
        defect, stem = parts[1], posixpath.splitext(parts[2])[0]
        if defect == NOMINAL:
            items.append(TestItem(u, 0, defect, None))
        elif (defect, stem) in masks:
            items.append(TestItem(u, 1, defect, masks[(defect, stem)]))
        else:
            missing.append(f"ground_truth/{defect}/{stem}_mask.png")
    problems = []
    if misplaced:
        problems.append(f"test images not directly in test/<defect>/: {misplaced[:3]}")
    if missing:
        problems.append(f"{len(missing)} defect images have no mask, e.g. {missing[:3]}")
    if not any(i.label == 0 for i in items):
        problems.append("no nominal test images in test/good/")
    if not any(i.label == 1 for i in items):
        problems.append("no defective test images in test/<defect>/ (with masks)")
    if problems:
        raise ValueError(
            f"category {name!r} at {where} is incomplete: {'; '.join(problems)}. "
            f"Expected {MVTEC_LAYOUT}; found: {found}"
        )
    return Category(name, tuple(train), tuple(items))


def read_mvtec(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    require_train: bool = True,
) -> dict[str, Category]:
    """MVTec AD root (category folders) or a single MVTec-style category folder, by name.

    A folder with test/ directly in it is one category named after the folder; otherwise every
    first-level folder holding test/ is a category. ValueError when no folder holds test/, or
    one holds train/ or ground_truth/ without test/.
    """
    base, rel = _relative_paths(uri, storage_options)
    if any(r.startswith("test/") for r in rel):  # a single category folder
        name = posixpath.basename(base) or "dataset"
        return {name: _mvtec_category(name, uri, rel, require_train)}
    by_category: dict[str, dict[str, str]] = {}
    for r, u in rel.items():
        head, _, rest = r.partition("/")
        if rest:
            by_category.setdefault(head, {})[rest] = u
    names = sorted(n for n, sub in by_category.items() if any(r.startswith("test/") for r in sub))
    if not names:
        raise ValueError(
            f"dataset {uri!r} has no test/ folder at its top or one level down; expected "
            f"{MVTEC_LAYOUT}; found: {_describe(list(rel), 2)}"
        )
    # a category copied without its test/ would otherwise drop out of the evaluation unnoticed
    partial = sorted(n for n, sub in by_category.items() if n not in names
                     and any(r.startswith(("train/", "ground_truth/")) for r in sub))
    if partial:
        raise ValueError(
            f"dataset {uri!r}: categories {partial} have train/ or ground_truth/ but no test/ "
            f"folder; expected {MVTEC_LAYOUT}"
        )
    return {
        n: _mvtec_category(n, storage.join_uri(uri, n), by_category[n], require_train)
        for n in names
    }


# --------------------------------------------------------------------------- VisA split CSV


def _resolve(root: str, entry: str) -> str:
    """A CSV entry as a URI: absolute entries as given, relative ones under `root`."""
    if "://" in entry or entry.startswith("/"):
        return entry
    return storage.join_uri(root, posixpath.normpath(entry))


def read_visa(
    csv_uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    require_train: bool = True,
) -> dict[str, Category]:
    """VisA's split CSV (columns object, split, label, image, mask; label normal/anomaly).

    Relative paths resolve against the dataset root: the CSV's folder, or its parent when that
    folder is VisA's `split_csv/`. Anomalous items get the defect type "anomaly" (the CSV names
    none). ValueError for a missing file or column; a row (named by its line) with an unknown
    label or split, an anomalous training image or an anomalous test image without a mask; an
    object lacking train rows (if required) or test rows of either label.
    """
    if not storage.is_file(csv_uri, storage_options):
        raise ValueError(f"VisA split CSV {csv_uri!r} does not exist")
    # utf-8-sig: a CSV saved by Excel starts with a BOM that would stick to the first column name
    text = storage.read_bytes(csv_uri, storage_options).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    if any(c not in columns for c in VISA_COLUMNS):
        raise ValueError(
            f"{csv_uri}: expected a VisA split CSV with columns {list(VISA_COLUMNS)}, "
            f"found columns {columns}"
        )
    folder = posixpath.dirname(storage.normalise_uri(csv_uri))
    root = posixpath.dirname(folder) if posixpath.basename(folder) == "split_csv" else folder
    train: dict[str, list[str]] = {}
    tests: dict[str, list[TestItem]] = {}
    for line, raw in enumerate(reader, start=2):  # line 1 is the header
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        label = VISA_LABELS.get(row["label"].lower())
        split = row["split"].lower()
        if label is None or split not in ("train", "test") or not row["object"] or not row["image"]:
            raise ValueError(
                f"{csv_uri} line {line}: need object, split in (train, test), label in "
                f"{sorted(VISA_LABELS)} and an image path; found {row}"
            )
        image = _resolve(root, row["image"])
        if split == "train":
            if label:
                raise ValueError(f"{csv_uri} line {line}: a training image labelled anomalous")
            train.setdefault(row["object"], []).append(image)
            continue
        if label and not row["mask"]:
            raise ValueError(f"{csv_uri} line {line}: anomalous test image without a mask path")
        mask = _resolve(root, row["mask"]) if label else None
        tests.setdefault(row["object"], []).append(
            TestItem(image, label, "anomaly" if label else NOMINAL, mask)
        )
    out = {}
    for name in sorted(set(train) | set(tests)):
        items = tuple(sorted(tests.get(name, []), key=lambda i: i.uri))
        labels = {i.label for i in items}
        if labels != {0, 1} or (require_train and not train.get(name)):
            raise ValueError(
                f"{csv_uri}: object {name!r} needs train rows and test rows of both labels; found "
                f"{len(train.get(name, []))} train, {sum(1 - i.label for i in items)} normal and "
                f"{sum(i.label for i in items)} anomalous test rows"
            )
        out[name] = Category(name, tuple(sorted(train.get(name, []))), items)
    if not out:
        raise ValueError(f"{csv_uri}: the split CSV has no rows")
    return out


# --------------------------------------------------------------------------- matching and masks


def uri_key(uri: str) -> str:
    """Comparable form of a URI (`storage.normalise_uri`): what scored URIs are matched by."""
    return storage.normalise_uri(uri)


def match_test_items(
    categories: dict[str, Category], uris: Sequence[str], errors: dict[str, str]
) -> tuple[dict[str, list[tuple[TestItem, int]]], list[str]]:
    """Pair each category's test items with scored `uris`: ({category: [(item, index)]}, skipped).

    By normalised URI, else by the longest unique common path suffix of 3 to 6 parts that names the
    category folder (data scored from a copy elsewhere). index: position in `uris`. Categories
    with no scored item are skipped; a partly scored category is a ValueError naming missing
    images (with their error from `errors`, {uri_key: message}). ValueError too when a URI is
    scored twice or no category has a scored item.
    """
    index: dict[str, int] = {}
    by_suffix: dict[str, list[int]] = {}
    for i, uri in enumerate(uris):
        key = uri_key(uri)
        if key in index:
            raise ValueError(f"{uri} is scored twice; pass each image's results once")
        index[key] = i
        parts = key.split("/")
        # 6 parts reach the category folder in both layouts: MVTec <category>/test/<defect>/<file>
        # (4), VisA <object>/Data/Images/<Normal|Anomaly>/<file> (5)
        for depth in range(3, min(len(parts), 6) + 1):
            by_suffix.setdefault("/".join(parts[-depth:]), []).append(i)

    def find(uri: str, category: str) -> int | None:
        key = uri_key(uri)
        if key in index:
            return index[key]
        parts = key.split("/")
        for depth in range(min(len(parts), 6), 2, -1):  # longest (most specific) suffix first
            # The suffix must name the category folder: `test/good/000.png` alone would match
            # another category's image of the same name.
            if category not in parts[-depth:-1]:
                continue
            hits = by_suffix.get("/".join(parts[-depth:]), [])
            if len(hits) == 1:
                return hits[0]
        return None

    matched: dict[str, list[tuple[TestItem, int]]] = {}
    skipped = []
    for name, category in categories.items():
        found = [(item, find(item.uri, name)) for item in category.test]
        missing = [item.uri for item, i in found if i is None]
        if len(missing) == len(found):
            skipped.append(name)
        elif missing:
            why = [f"{u} ({errors[uri_key(u)]})" if uri_key(u) in errors else u for u in missing[:3]]
            raise ValueError(
                f"category {name!r}: {len(missing)} of {len(found)} test images have no score, e.g. "
                f"{why}; score all of {name}'s test images (or fix the failed ones) and rerun"
            )
        else:
            matched[name] = [(item, i) for item, i in found if i is not None]
    if not matched:
        raise ValueError(
            f"no test image of the dataset ({sum(len(c.test) for c in categories.values())} images, "
            f"categories {list(categories)}) appears in the results ({len(uris)} scored URIs); "
            "check that --results and --dataset refer to the same images"
        )
    return matched, skipped


def read_mask(uri: str, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """Ground-truth mask file -> (H, W) bool, True where the pixel value is > 0 (any mode, read
    as 8-bit grey); FileNotFoundError when the file is missing."""
    with Image.open(io.BytesIO(storage.read_bytes(uri, storage_options))) as image:
        return np.asarray(image.convert("L")) > 0
