"""ModelSpec: the algorithm settings shared by extract, coreset and score (paper §3, DESIGN.md §3).

Stored in every manifest; two artifacts are compatible only if their specs are equal.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

SPEC_VERSION = 3
# Older specs lack the keys added since; their artifacts were built as these values say.
# Version 1 predates `aggregation` and `frame`: the authors' unfold + pool on the centre crop.
# Versions 1 and 2 predate `low_rank`: features were stored embed_dim wide.
_V2_DEFAULTS = {"low_rank": False}
_V1_DEFAULTS = {"aggregation": "authors", "frame": "crop", **_V2_DEFAULTS}
_OLD_DEFAULTS = {1: _V1_DEFAULTS, 2: _V2_DEFAULTS}

# How a p×p neighbourhood becomes one vector per layer (features.patch_features):
# paper = per-channel p×p average (§3.1, Eq. 2: "local smoothing over each individual feature
# map"), then channels pooled to embed_dim; authors = the authors' code: unfold the C*p*p values
# and adaptive-pool that vector to embed_dim (for C*p*p < embed_dim nothing is averaged over space).
AGGREGATIONS = ("paper", "authors")
# Which part of the input is inspected (preprocess.to_tensor): crop = shorter side to `resize`,
# centre crop of `crop` (the paper's protocol); full = the whole input resized to crop x crop.
FRAMES = ("crop", "full")

# Backbone name -> (default layers, allowed layers). Strides/channels live in backbone.py.
BACKBONE_LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "wide_resnet50_2": (("layer2", "layer3"), ("layer1", "layer2", "layer3", "layer4")),
    "wide_resnet101_2": (("layer2", "layer3"), ("layer1", "layer2", "layer3", "layer4")),
    "resnet18": (("layer2", "layer3"), ("layer1", "layer2", "layer3", "layer4")),
    "resnet50": (("layer2", "layer3"), ("layer1", "layer2", "layer3", "layer4")),
    # two more of Table S5's backbones (ResNet101; ResNeXt101, a member of "PatchCore ens.")
    "resnet101": (("layer2", "layer3"), ("layer1", "layer2", "layer3", "layer4")),
    "resnext101_32x8d": (("layer2", "layer3"), ("layer1", "layer2", "layer3", "layer4")),
    # efficientnet_lite0 stages are timm's block names. Output stride/channels: blocks.1 = 4/24,
    # blocks.2 = 8/40, blocks.3 = 16/80, blocks.4 = 16/112, blocks.5 = 32/192, blocks.6 = 32/320.
    # blocks.2,blocks.4 (stride 8 and 16) mirror WRN's layer2,layer3.
    "efficientnet_lite0": (
        ("blocks.2", "blocks.4"),
        ("blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6"),
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    """Settings that must be identical in extract, coreset and score jobs."""

    backbone: str = "wide_resnet50_2"
    weights: str = "default"  # "default" | "none" (random init, tests only) | URI of a state dict
    layers: tuple[str, ...] = ("layer2", "layer3")
    resize: int = 256  # shorter side in px before the centre crop
    crop: int = 224  # square input size in px fed to the backbone
    patch_size: int = 3  # p×p neighbourhood aggregated into each patch (paper §3.1)
    embed_dim: int = 1024  # width of one patch embedding (D)
    reweight_neighbors: int = 9  # b of Eq. 7; 1 = plain max patch distance
    sigma: float = 4.0  # Gaussian smoothing of anomaly maps, in crop pixels (paper §3.3)
    aggregation: str = "paper"  # one of AGGREGATIONS
    frame: str = "crop"  # one of FRAMES
    # Store features in the exact rank-r space of the paper aggregation's channel map when
    # r < embed_dim (features.feature_width): the same distances, scores and coreset, fewer bytes
    # and less kNN work (efficientnet_lite0: r = 152 of 1024). No effect for the authors'
    # aggregation or when r = embed_dim (WRN50 layer2,layer3).
    low_rank: bool = True

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONE_LAYERS:
            raise ValueError(
                f"unknown backbone {self.backbone!r}; choose one of {sorted(BACKBONE_LAYERS)}"
            )
        if isinstance(self.layers, str) or not self.layers:
            raise ValueError(f"layers must be a non-empty tuple of stage names, got {self.layers!r}")
        allowed = BACKBONE_LAYERS[self.backbone][1]
        bad = [layer for layer in self.layers if layer not in allowed]
        if bad:
            raise ValueError(
                f"layers {bad} do not exist in {self.backbone}; choose from {list(allowed)}"
            )
        positions = [allowed.index(layer) for layer in self.layers]
        if positions != sorted(set(positions)):
            raise ValueError(
                f"layers {list(self.layers)} must be distinct and in network order (shallow first, "
                f"the patch grid is the first layer's), e.g. {list(BACKBONE_LAYERS[self.backbone][0])}"
            )
        if not self.weights:
            raise ValueError("weights must be 'default', 'none' or a state-dict URI")
        if self.patch_size < 1 or self.patch_size % 2 != 1:
            raise ValueError(f"patch_size must be a positive odd number, got {self.patch_size}")
        if self.crop < 32 or self.resize < self.crop:
            raise ValueError(
                f"need crop >= 32 and resize >= crop, got resize={self.resize}, crop={self.crop}"
            )
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"aggregation must be one of {list(AGGREGATIONS)}, got {self.aggregation!r} "
                "(paper: per-channel p x p averaging; authors: the reference code's unfold + pool)"
            )
        if self.frame not in FRAMES:
            raise ValueError(
                f"frame must be one of {list(FRAMES)}, got {self.frame!r} (crop: centre crop as in "
                "the paper; full: the whole input is inspected)"
            )
        if not isinstance(self.low_rank, bool):
            raise TypeError(
                f"low_rank must be True or False, got {self.low_rank!r} (True: store features "
                "in the exact rank-r space when r < embed_dim; False: store embed_dim-wide features)"
            )
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")
        if self.reweight_neighbors < 1:
            raise ValueError(
                f"reweight_neighbors must be >= 1 (1 = plain max), got {self.reweight_neighbors}"
            )
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0 (0 = no smoothing), got {self.sigma}")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able dict, with the format version."""
        out = dataclasses.asdict(self)
        out["layers"] = list(self.layers)
        out["spec_version"] = SPEC_VERSION
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        """Inverse of `to_json`; rejects unknown keys, wrong types and other spec versions."""
        data = dict(data)
        version = data.pop("spec_version", None)
        if type(version) is int and version in _OLD_DEFAULTS:
            data = {**_OLD_DEFAULTS[version], **data}
        elif version != SPEC_VERSION:
            raise ValueError(
                f"model spec version {version!r} is not supported (this build reads "
                f"{sorted([*_OLD_DEFAULTS, SPEC_VERSION])}); re-create the artifact with this version"
            )
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown model spec keys {unknown}; known keys: {sorted(names)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            kind = hints[name]
            if name == "layers":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise TypeError(f"spec.layers must be a list of strings, got {value!r}")
                value = tuple(value)
            elif kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
                raise TypeError(f"spec.{name} must be {kind.__name__}, got {value!r}")
            kwargs[name] = value
        return cls(**kwargs)


def default_layers(backbone: str) -> tuple[str, ...]:
    """The paper's layer choice (or its analogue) for `backbone`."""
    if backbone not in BACKBONE_LAYERS:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONE_LAYERS)}")
    return BACKBONE_LAYERS[backbone][0]


def parse_layers(text: str) -> tuple[str, ...]:
    """'layer2,layer3' -> ('layer2', 'layer3')."""
    return tuple(part.strip() for part in text.split(",") if part.strip())
