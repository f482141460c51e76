"""The memory bank (paper §3.2): coreset-selected patch features plus what is needed to reuse them.

A plain frozen record; storage.save_bank / storage.load_bank move it to and from an artifact folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from patchcore_core.features import feature_width
from patchcore_core.spec import ModelSpec


@dataclass(frozen=True, eq=False)
class Bank:
    """Memory bank M of M entries and its provenance.

    features: (M, W) float32 patch embeddings (not projected), W = features.feature_width(spec):
        embed_dim, or the rank of the channel map when the spec stores low-rank features.
    image_ids, ys, xs: where each entry came from (image URI, patch-grid row and column).
    coverage_radius: max distance, in the projected space, from any training patch to its nearest
        bank entry (paper Alg. 1 objective).
    image_threshold, pixel_threshold: calibrated on nominal images (None when not calibrated).
    info: JSON-able counts and config of the run that built the bank.
    """

    spec: ModelSpec
    features: torch.Tensor
    image_ids: tuple[str, ...]
    ys: torch.Tensor
    xs: torch.Tensor
    projection_seed: int
    coverage_radius: float
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or self.features.dtype != torch.float32:
            raise ValueError(
                f"bank features must be (M, W) float32, got {self.features.dtype} "
                f"{tuple(self.features.shape)}"
            )
        count, dim = self.features.shape
        if count < 1:
            raise ValueError("a bank needs at least one entry")
        width = feature_width(self.spec)
        if dim != width:
            raise ValueError(
                f"bank features are {dim} wide but the spec stores {width}-wide features "
                f"(embed_dim={self.spec.embed_dim}, low_rank={self.spec.low_rank}); build the "
                "features with features.embed for this spec"
            )
        if not isinstance(self.image_ids, tuple) or len(self.image_ids) != count:
            raise ValueError(f"image_ids must be a tuple of {count} strings (one per entry)")
        for name, coords in (("ys", self.ys), ("xs", self.xs)):
            if coords.shape != (count,) or coords.dtype.is_floating_point:
                raise ValueError(
                    f"{name} must be ({count},) integers, got {coords.dtype} {tuple(coords.shape)}"
                )

    @property
    def size(self) -> int:
        """Number of bank entries M."""
        return int(self.features.shape[0])
