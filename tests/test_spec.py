"""spec: ModelSpec validation and its JSON round trip, including specs of the previous version."""

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
    assert data["spec_version"] == SPEC_VERSION == 2
    assert (data["aggregation"], data["frame"]) == (aggregation, frame)
    assert ModelSpec.from_json(data) == spec


def test_version_1_spec_reads_as_the_authors_aggregation_on_the_crop() -> None:
    # Version-1 artifacts were built before these settings existed, with the authors' unfold + pool.
    data = ModelSpec(backbone="resnet18").to_json()
    del data["aggregation"], data["frame"]
    data["spec_version"] = 1
    spec = ModelSpec.from_json(data)
    assert (spec.aggregation, spec.frame) == ("authors", "crop")


@pytest.mark.parametrize(("field", "value"), [("aggregation", "mean"), ("frame", "tiles")])
def test_unknown_aggregation_or_frame_is_refused_naming_the_choices(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be one of .*got '{value}'"):
        ModelSpec(**{field: value})


def test_other_spec_versions_are_refused() -> None:
    data = ModelSpec().to_json()
    data["spec_version"] = 3
    with pytest.raises(ValueError, match="version 3 is not supported"):
        ModelSpec.from_json(data)
