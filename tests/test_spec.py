"""spec: ModelSpec validation and its JSON round trip, including specs of earlier versions."""

from __future__ import annotations

import pytest

from patchcore_core.spec import SPEC_VERSION, ModelSpec


def test_defaults_are_the_papers_aggregation_on_the_centre_crop() -> None:
    spec = ModelSpec()
    assert (spec.aggregation, spec.frame) == ("paper", "crop")


@pytest.mark.parametrize("aggregation", ["paper", "authors"])
@pytest.mark.parametrize("frame", ["crop", "full"])
def test_json_round_trip_keeps_aggregation_and_frame(aggregation: str, frame: str) -> None:
    spec = ModelSpec(backbone="resnet18", aggregation=aggregation, frame=frame)
    data = spec.to_json()
    assert data["spec_version"] == SPEC_VERSION == 3
    assert (data["aggregation"], data["frame"]) == (aggregation, frame)
    assert ModelSpec.from_json(data) == spec


def test_version_1_spec_reads_as_the_authors_aggregation_on_the_crop() -> None:
    # Version-1 artifacts were built before these settings existed, with the authors' unfold + pool.
    data = ModelSpec(backbone="resnet18").to_json()
    del data["aggregation"], data["frame"], data["low_rank"]
    data["spec_version"] = 1
    spec = ModelSpec.from_json(data)
    assert (spec.aggregation, spec.frame, spec.low_rank) == ("authors", "crop", False)


@pytest.mark.parametrize(("field", "value"), [("aggregation", "mean"), ("frame", "tiles")])
def test_unknown_aggregation_or_frame_is_refused_naming_the_choices(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be one of .*got '{value}'"):
        ModelSpec(**{field: value})


def test_other_spec_versions_are_refused() -> None:
    data = ModelSpec().to_json()
    data["spec_version"] = 4
    with pytest.raises(ValueError, match="version 4 is not supported"):
        ModelSpec.from_json(data)


@pytest.mark.parametrize("low_rank", [True, False])
def test_json_round_trip_keeps_low_rank(low_rank: bool) -> None:
    spec = ModelSpec(backbone="efficientnet_lite0", layers=("blocks.2", "blocks.4"),
                     low_rank=low_rank)  # fmt: skip
    data = spec.to_json()
    assert data["low_rank"] is low_rank
    assert ModelSpec.from_json(data) == spec
    assert ModelSpec().low_rank  # the default: exact low-rank storage where it is narrower


def test_version_2_spec_reads_as_d_dim_features() -> None:
    # Version-2 artifacts hold embed_dim-wide features; reading them as low-rank would mismatch.
    data = ModelSpec(backbone="efficientnet_lite0", layers=("blocks.2", "blocks.4")).to_json()
    del data["low_rank"]
    data["spec_version"] = 2
    spec = ModelSpec.from_json(data)
    assert (spec.aggregation, spec.low_rank) == ("paper", False)
    assert spec != ModelSpec(backbone="efficientnet_lite0", layers=("blocks.2", "blocks.4"))


def test_low_rank_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="low_rank must be True or False, got 1"):
        ModelSpec(low_rank=1)  # type: ignore[arg-type]
    data = ModelSpec().to_json()
    data["low_rank"] = "yes"
    with pytest.raises(TypeError, match="spec.low_rank must be bool"):
        ModelSpec.from_json(data)
