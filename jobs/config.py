"""Job configs: flat frozen dataclasses that become the command line, and the flag groups they share.

Owns: the dataclass -> argparse bridge (`arg`, `build_parser`, `parse_config`: one `--kebab-case`
flag per field, help from `arg`, every default shown, `__post_init__` errors as usage errors with
exit status 2), the flag groups of DESIGN.md §5 with their checks (storage, run, actor, pipeline,
model, coreset, knn), `--storage-options` parsed once per config (`.options`), and the redacted views
of a config for logs and manifests. Must not: start Ray, touch storage, or know any one job.

Supported field types: str, int, float, bool (as `--flag/--no-flag`) and `X | None` of those.
A flag group checks its own fields in `__post_init__` and then calls the next group's
(`super().__post_init__()`), so a job config made of several groups checks them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from patchcore_core import coreset, knn, preprocess, storage
from patchcore_core.spec import ModelSpec, default_layers, parse_layers

T = TypeVar("T")

_SCALARS = (str, int, float, bool)
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_RATIO = 0.1  # share of all patches a coreset keeps when neither --ratio nor --size is given


def arg(help: str, default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with CLI help text; no default = a required flag."""
    return dataclasses.field(default=default, metadata={"help": help})


def _scalar_type(kind: Any, where: str) -> type:
    """The scalar type of `str`, `int | None`, `Optional[float]`, ...; TypeError otherwise."""
    if kind in _SCALARS:
        return kind
    origin = typing.get_origin(kind)
    if origin is typing.Union or origin is types.UnionType:
        members = [m for m in typing.get_args(kind) if m is not type(None)]
        if len(members) == 1 and len(typing.get_args(kind)) == 2 and members[0] in _SCALARS:
            return members[0]
    raise TypeError(
        f"{where}: unsupported CLI type {kind!r}; use str, int, float, bool or one of them | None"
    )


def _show(value: Any) -> str:
    """A default as the user would type it: unset, '', true/false, 0.1."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return "''"
    return str(value).replace("%", "%%")


def build_parser(cls: type, prog: str | None = None) -> argparse.ArgumentParser:
    """argparse parser with one flag per field of the flat dataclass `cls`."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(cls.__doc__ or "").strip(),
        allow_abbrev=False,  # `--size` must never silently match `--size-limit`
    )
    for field in dataclasses.fields(cls):
        if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            raise TypeError(f"{cls.__name__}.{field.name}: default_factory is not supported")
        # `X | None` only changes the default, which the dataclass already holds
        kind = _scalar_type(hints[field.name], f"{cls.__name__}.{field.name}")
        required = field.default is dataclasses.MISSING
        text = field.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        text = f"{text} (required)" if required else f"{text} (default: {_show(field.default)})"
        flag = "--" + field.name.replace("_", "-")
        default = None if required else field.default
        if kind is bool:
            action = parser.add_argument(
                flag, dest=field.name, action=argparse.BooleanOptionalAction,
                required=required, default=default,
            )
            action.help = text  # Python < 3.14 would append its own "(default: ...)" otherwise
        else:
            metavar = field.name.upper()
            parser.add_argument(
                flag, dest=field.name, type=kind,
                required=required, default=default, help=text, metavar=metavar,
            )
    return parser


def parse_config(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None) -> T:
    """Parse `argv` (default: sys.argv[1:]) into the frozen dataclass `cls`.

    `--help` prints every flag with its default and exits 0; an unknown flag, a badly typed
    value or a value rejected by `cls.__post_init__` prints usage plus the reason and exits 2.
    """
    parser = build_parser(cls, prog)
    values = vars(parser.parse_args(argv))
    try:
        return cls(**values)
    except (ValueError, TypeError) as err:
        parser.error(str(err))  # exits 2 with the usage line; the message names the bad value
        raise AssertionError("unreachable") from err


def config_dict(config: Any) -> dict[str, Any]:
    """`dataclasses.asdict` without the fields that may hold credentials (for logs and manifests)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if not storage.may_hold_secrets(k)}


def config_json(config: Any) -> str:
    """The config as one JSON line for the log; secret-bearing fields show only their key names."""
    out = config_dict(config)
    for name in sorted(f.name for f in dataclasses.fields(config) if storage.may_hold_secrets(f.name)):
        value = getattr(config, name)
        options = parse_storage_options(value) if isinstance(value, str) else dict(value)
        out[name] = {key: "<redacted>" for key in sorted(options)}
    return json.dumps(out, sort_keys=True)


def parse_storage_options(text: str) -> dict[str, Any]:
    """`--storage-options` JSON text -> dict for fsspec; "" -> {}. ValueError names the problem."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        # do not echo the text: it may hold a secret key
        raise ValueError(
            f"--storage-options must be a JSON object, e.g. '{{\"anon\": true}}'; "
            f"parse error at char {err.pos}: {err.msg}"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(
            f"--storage-options must be a JSON object, got a JSON {type(value).__name__}; "
            "e.g. '{\"anon\": true}'"
        )
    return value


def fields_of(config: Any, *groups: type) -> dict[str, Any]:
    """{field: value} of `config` for the fields of the flag `groups` (to build another job's
    config from a recipe's, e.g. fit -> coreset, without copying fields one by one)."""
    names = {f.name for group in groups for f in dataclasses.fields(group)}
    return {name: getattr(config, name) for name in sorted(names)}


# --------------------------------------------------------------------------- flag groups


class Flags:
    """Root of the flag groups: the end of the `__post_init__` chain."""

    def __post_init__(self) -> None:
        """Each group checks its fields, then calls `super().__post_init__()`; this ends the chain."""


@dataclass(frozen=True, kw_only=True)
class StorageFlags(Flags):
    """Where credentials-free fsspec options come from; `.options` is the parsed dict."""

    storage_options: str = arg("JSON object of fsspec options for every URI (never logged)", "")

    def __post_init__(self) -> None:
        parse_storage_options(self.storage_options)  # raises on bad JSON, without echoing it
        super().__post_init__()

    @functools.cached_property
    def options(self) -> dict[str, Any]:
        """`--storage-options` parsed once (a new dict per config; never logged)."""
        return parse_storage_options(self.storage_options)


@dataclass(frozen=True, kw_only=True)
class RunFlags(StorageFlags):
    """What a job does with an output folder that exists, and whether it does any work."""

    overwrite: bool = arg("replace a committed output folder", False)
    dry_run: bool = arg("resolve the config, list the inputs, log the plan, then stop", False)


@dataclass(frozen=True, kw_only=True)
class ActorFlags(RunFlags):
    """How many Ray actors a job runs, their CPU reservation and their device (jobs.cluster)."""

    workers: int = arg("model actors; 0 = one per GPU, or on CPU one per --cpus-per-worker CPUs, "
                       "sharing all CPUs but a quarter (for decoding)", 0)
    cpus_per_worker: float = arg("CPUs Ray reserves for each actor", 1.0)
    device: str = arg("auto|cpu|cuda; auto = cuda when the Ray cluster has GPUs", "auto")

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0 (0 = automatic), got {self.workers}")
        if not 0.0 < self.cpus_per_worker <= 1024:
            raise ValueError(f"--cpus-per-worker must be in (0, 1024], got {self.cpus_per_worker}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class PipelineFlags(ActorFlags):
    """Batching, sharding and fault handling of a Ray Data image job (jobs.pipeline)."""

    batch_size: int = arg("images per model call (per actor)", 32)
    shard_size: int = arg("images per output shard part-NNNNN (the unit of commit and resume)", 256)
    max_pixels: int = arg("larger inputs are recorded as errors (decompression bombs)",
                          preprocess.DEFAULT_MAX_PIXELS)
    max_failures: int = arg("unreadable inputs tolerated; more = exit status 2 after writing all", 0)
    retries: int = arg("times a batch is retried after its worker process died (actors restart)", 3)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.max_pixels < 1:
            raise ValueError(f"--max-pixels must be >= 1, got {self.max_pixels}")
        if self.max_failures < 0:
            raise ValueError(f"--max-failures must be >= 0, got {self.max_failures}")
        if self.retries < 0:
            raise ValueError(f"--retries must be >= 0, got {self.retries}")
        super().__post_init__()


_SPEC_DEFAULTS = ModelSpec  # class attributes hold the field defaults


@dataclass(frozen=True, kw_only=True)
class ModelFlags(Flags):
    """The model flags of DESIGN.md §5: they make the ModelSpec that every bank records."""

    backbone: str = arg("wide_resnet50_2|wide_resnet101_2|resnet18|resnet50|resnet101|"
                        "resnext101_32x8d|efficientnet_lite0; "
                        "a comma-separated list (`fit` only) builds an ensemble, one member per "
                        "backbone (paper Table S5)", _SPEC_DEFAULTS.backbone)
    weights: str = arg("default (standard ImageNet weights) | none (random, tests) | URI of a "
                       "state dict; for an ensemble one value for all members or one per "
                       "member separated by ';'", _SPEC_DEFAULTS.weights)
    layers: str = arg("comma-separated backbone stages; '' = the backbone's default; for an "
                      "ensemble one list per member separated by ';' (e.g. "
                      "'layer2,layer3;blocks.2,blocks.4')", "")
    resize: int = arg("shorter side in px before the centre crop", _SPEC_DEFAULTS.resize)
    crop: int = arg("square crop in px fed to the backbone", _SPEC_DEFAULTS.crop)
    patch_size: int = arg("p of the p x p neighbourhood aggregation", _SPEC_DEFAULTS.patch_size)
    embed_dim: int = arg("width D of a patch embedding", _SPEC_DEFAULTS.embed_dim)
    reweight_neighbors: int = arg("b of Eq. 7 (1 = plain max patch distance)",
                                  _SPEC_DEFAULTS.reweight_neighbors)
    sigma: float = arg("Gaussian smoothing of anomaly maps in crop px (0 = none)", _SPEC_DEFAULTS.sigma)
    aggregation: str = arg("paper (per-channel p x p local average, paper §3.1) | authors (the "
                           "reference code's unfold + adaptive pool)", _SPEC_DEFAULTS.aggregation)
    frame: str = arg("crop (resize + centre crop, the paper's protocol; the border outside the "
                     "crop is not inspected) | full (the whole input resized to crop x crop)",
                     _SPEC_DEFAULTS.frame)
    low_rank: bool = arg("store paper-aggregation features in the exact rank-r space of their "
                         "channel map when r < --embed-dim: same distances and scores, fewer "
                         "bytes (efficientnet_lite0: 152 of 1024 dims); no effect when r = D "
                         "(wide_resnet50_2) or with --aggregation authors", _SPEC_DEFAULTS.low_rank)
    feature_dtype: str = arg("float16|float32 values in the feature store", "float16")

    def __post_init__(self) -> None:
        if self.feature_dtype not in storage.FEATURE_DTYPES:
            raise ValueError(f"--feature-dtype must be one of {', '.join(storage.FEATURE_DTYPES)}, "
                             f"got {self.feature_dtype!r}")
        self.model_specs()  # raises ValueError on a bad combination
        super().__post_init__()

    def model_specs(self) -> tuple[ModelSpec, ...]:
        """One ModelSpec per --backbone entry (several: an ensemble's members, which share every
        flag but the backbone, weights and layers); raises ValueError on a bad combination."""
        backbones = [b.strip() for b in self.backbone.split(",")]
        count = len(backbones)
        weights = _per_member(self.weights, count, "--weights")
        layer_lists = _per_member(self.layers, count, "--layers") if count > 1 or self.layers else [""]
        return tuple(
            ModelSpec(
                backbone=backbone, weights=weight,
                layers=parse_layers(layers) if layers else default_layers(backbone),
                resize=self.resize, crop=self.crop, patch_size=self.patch_size,
                embed_dim=self.embed_dim, reweight_neighbors=self.reweight_neighbors,
                sigma=self.sigma, aggregation=self.aggregation, frame=self.frame,
                low_rank=self.low_rank,
            )
            for backbone, weight, layers in zip(backbones, weights, layer_lists)
        )

    def model_spec(self) -> ModelSpec:
        """The one ModelSpec of a single --backbone (ValueError for an ensemble's list: only
        `patchcore fit` builds ensembles; score them with `patchcore score --bank`)."""
        specs = self.model_specs()
        if len(specs) > 1:
            raise ValueError(
                f"--backbone {self.backbone!r} names {len(specs)} backbones (an ensemble), which "
                "only `patchcore fit` builds; pass one backbone here")
        return specs[0]

    @property
    def is_ensemble(self) -> bool:
        return "," in self.backbone


def _per_member(value: str, count: int, flag: str) -> list[str]:
    """A ';'-separated per-member flag value: one entry for all members, or one per member."""
    parts = [part.strip() for part in value.split(";")] if count > 1 else [value]
    if len(parts) == 1:
        return parts * count
    if len(parts) != count:
        raise ValueError(f"{flag} {value!r} has {len(parts)} ';'-separated entries for {count} "
                         f"backbones; give one value for all members or one per backbone")
    return parts


@dataclass(frozen=True, kw_only=True)
class CoresetFlags(Flags):
    """How many patches the greedy coreset keeps (paper §3.2) and its seeded projection."""

    ratio: float | None = arg(f"fraction of all patches to keep; {DEFAULT_RATIO} if no --size", None)
    size: int | None = arg("number of patches to keep, instead of --ratio", None)
    projection_dim: int = arg("width of the coreset's seeded Gaussian random projection", 128)
    seed: int = arg("seed of the projection and of the first selected patch", 0)

    def __post_init__(self) -> None:
        if self.ratio is not None and self.size is not None:
            raise ValueError(f"give --ratio or --size, not both (got {self.ratio} and {self.size})")
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.size is not None and self.size < 1:
            raise ValueError(f"--size must be >= 1, got {self.size}")
        if self.projection_dim < 1:
            raise ValueError(f"--projection-dim must be >= 1, got {self.projection_dim}")
        super().__post_init__()

    @property
    def effective_ratio(self) -> float | None:
        """--ratio, DEFAULT_RATIO when neither --ratio nor --size is given, None with --size."""
        return DEFAULT_RATIO if self.ratio is None and self.size is None else self.ratio

    def num_samples(self, num_points: int) -> int:
        """Coreset size for `num_points` patches (`coreset.coreset_size`)."""
        return coreset.coreset_size(num_points, self.effective_ratio, self.size)


@dataclass(frozen=True, kw_only=True)
class KnnFlags(Flags):
    """How patches are searched in the bank (paper §3.3): exact, or an approximate faiss index whose
    recall@1 the job measures and records. Unset parameters are derived from the bank (N entries)."""

    knn: str = arg("exact (faiss flat; on cuda faiss GPU, else torch on the GPU) | ivf-flat | ivf-pq "
                   "(approximate: recall@1 against exact is measured on the first scored patches "
                   "and recorded in the manifest)", "exact")
    knn_nlist: int | None = arg("IVF lists (k-means cells, trained with a fixed seed); unset = "
                                "round(4 sqrt(N)), at most N // 39", None)
    knn_nprobe: int | None = arg("IVF lists scanned per query (more = higher recall, slower); unset "
                                 "= ceil(sqrt(nlist)), at most nlist", None)
    knn_pq_m: int | None = arg("ivf-pq sub-vectors (bytes per entry with 8-bit codes; must "
                               "divide the feature width D); unset = the largest divisor of D up "
                               "to min(64, D / 4)", None)
    knn_rerank: int | None = arg("ivf-pq candidates per neighbour re-ranked by exact distance; "
                                 "unset = 4", None)

    def __post_init__(self) -> None:
        if self.knn not in knn.METHODS:
            raise ValueError(f"--knn must be one of {', '.join(knn.METHODS)}, got {self.knn!r}")
        for flag, value, needs in (("--knn-nlist", self.knn_nlist, "ivf"),
                                   ("--knn-nprobe", self.knn_nprobe, "ivf"),
                                   ("--knn-pq-m", self.knn_pq_m, "ivf-pq"),
                                   ("--knn-rerank", self.knn_rerank, "ivf-pq")):
            if value is None:
                continue
            if value < 1:
                raise ValueError(f"{flag} must be >= 1 (or unset: derived from the bank), got {value}")
            if not self.knn.startswith(needs):
                allowed = "ivf-flat|ivf-pq" if needs == "ivf" else "ivf-pq"
                raise ValueError(f"{flag} {value} applies to --knn {allowed}, got --knn {self.knn}; "
                                 f"drop {flag} or choose --knn {allowed}")
        if (self.knn_nlist is not None and self.knn_nprobe is not None
                and self.knn_nprobe > self.knn_nlist):
            raise ValueError(f"--knn-nprobe must be in [1, --knn-nlist {self.knn_nlist}], got "
                             f"{self.knn_nprobe}")
        super().__post_init__()

    def knn_options(self) -> knn.KnnOptions:
        """The search options these flags describe (parameters still to resolve per bank)."""
        return knn.KnnOptions(method=self.knn, nlist=self.knn_nlist, nprobe=self.knn_nprobe,
                              pq_m=self.knn_pq_m, rerank=self.knn_rerank)
