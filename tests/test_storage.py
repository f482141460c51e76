"""storage: feature shards, image listings, manifests (commit points), banks (DESIGN.md §4)."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from patchcore_core import storage
from patchcore_core.bank import Bank
from patchcore_core.spec import ModelSpec

SPEC = ModelSpec(
    backbone="efficientnet_lite0", weights="none", layers=("blocks.2", "blocks.4"),
    resize=72, crop=64, embed_dim=16,
)  # fmt: skip


def _touch(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _bank(num_entries: int = 30, seed: int = 0, spec: ModelSpec = SPEC) -> Bank:
    gen = torch.Generator().manual_seed(seed)
    return Bank(
        spec=spec,
        features=torch.randn(num_entries, spec.embed_dim, generator=gen),
        image_ids=tuple(f"s3://bucket/img-{i % 7}.png" for i in range(num_entries)),
        ys=torch.randint(0, 8, (num_entries,), generator=gen),
        xs=torch.randint(0, 8, (num_entries,), generator=gen),
        projection_seed=seed,
        coverage_radius=1.25,
        image_threshold=3.5,
        pixel_threshold=None,
        info={"counts": {"num_images": 7}, "config": {"ratio": 0.1}},
    )


# ----------------------------------------------------------------------------- feature shards


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("given", [torch.float16, torch.float32])
def test_feature_shard_round_trip_keeps_rows_and_stored_precision(
    tmp_path: Path, dtype: str, given: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(1)
    n, dim = 50, 24
    features = torch.randn(n, dim, generator=gen).to(given)
    ids = [f"/data/img-{i // 10}.png" for i in range(n)]
    ys, xs = torch.arange(n) // 5, torch.arange(n) % 5
    uri = str(tmp_path / "features" / "part-00000.parquet")

    storage.write_feature_shard(uri, ids, ys, xs, features, dtype=dtype)

    # The schema is the public contract: check it with pyarrow directly.
    schema = pq.read_schema(uri)
    assert schema.field("image_id").type == pa.string()
    assert schema.field("y").type == pa.int16() and schema.field("x").type == pa.int16()
    assert schema.field("feature").type == pa.list_(getattr(pa, dtype)(), dim)
    assert pq.read_metadata(uri).num_rows == n

    rows = storage.read_feature_shard(uri)
    assert rows["image_id"] == ids
    torch.testing.assert_close(rows["y"], ys, rtol=0, atol=0)
    torch.testing.assert_close(rows["x"], xs, rtol=0, atol=0)
    expected = features.to(getattr(torch, dtype)).float()  # exactly the stored precision
    assert rows["feature"].dtype == torch.float32 and rows["feature"].shape == (n, dim)
    torch.testing.assert_close(rows["feature"], expected, rtol=0, atol=0)


def test_feature_shard_encodes_and_summarises_only_the_key_columns(tmp_path: Path) -> None:
    n = storage.FEATURE_ROW_GROUP + 10
    uri = str(tmp_path / "part-00000.parquet")
    ids = [f"/data/img-{i // 100}.png" for i in range(n)]
    storage.write_feature_shard(uri, ids, torch.arange(n) % 7, torch.arange(n) % 5, torch.rand(n, 4))
    meta = pq.read_metadata(uri)
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [n - 10, 10]
    columns = {meta.row_group(0).column(c).path_in_schema: meta.row_group(0).column(c)
               for c in range(meta.num_columns)}
    feature = next(c for name, c in columns.items() if name.startswith("feature"))
    assert "RLE_DICTIONARY" in columns["image_id"].encodings
    assert "RLE_DICTIONARY" not in feature.encodings and not feature.is_stats_set
    assert all(columns[name].is_stats_set for name in ("image_id", "y", "x"))


def test_read_feature_shard_returns_only_requested_columns(tmp_path: Path) -> None:
    uri = str(tmp_path / "part-00001.parquet")
    storage.write_feature_shard(
        uri, ["a", "b"], torch.tensor([0, 1]), torch.tensor([2, 3]), torch.ones(2, 4)
    )
    rows = storage.read_feature_shard(uri, columns=["image_id", "x"])
    assert set(rows) == {"image_id", "x"}
    assert rows["x"].tolist() == [2, 3]
    with pytest.raises(ValueError, match="unknown feature-shard columns"):
        storage.read_feature_shard(uri, columns=["pixels"])


def test_write_feature_shard_rejects_mismatched_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one image_id, y and x per feature row"):
        storage.write_feature_shard(
            str(tmp_path / "p.parquet"), ["a"], torch.zeros(2), torch.zeros(2), torch.zeros(2, 4)
        )
    assert not (tmp_path / "p.parquet").exists()


# ----------------------------------------------------------------------------- atomic writes


def test_write_bytes_replaces_whole_file_and_leaves_no_temp_files(tmp_path: Path) -> None:
    uri = str(tmp_path / "sub" / "blob.bin")
    storage.write_bytes(uri, b"first")
    storage.write_bytes(uri, b"second")
    assert storage.read_bytes(uri) == b"second"
    assert sorted(os.listdir(tmp_path / "sub")) == ["blob.bin"]


def test_failed_write_keeps_previous_file_intact(tmp_path: Path, monkeypatch) -> None:
    uri = str(tmp_path / "blob.bin")
    storage.write_bytes(uri, b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(storage.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk went away"):
        storage.write_bytes(uri, b"new")
    assert (tmp_path / "blob.bin").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["blob.bin"]


def test_read_bytes_of_missing_file_names_the_uri(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        storage.read_bytes(missing)


# ----------------------------------------------------------------------------- image listings


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for rel in ["b.png", "a.JPG", "sub/c.jpeg", "sub/deeper/d.tiff", "sub/e.webp", "f.bmp"]:
        _touch(root / rel)
    for rel in ["notes.txt", "sub/labels.csv", "sub/model.npy"]:
        _touch(root / rel)
    return root


def test_list_images_folder_is_recursive_sorted_and_filters_extensions(image_tree: Path) -> None:
    found = storage.list_images(str(image_tree))
    expected = sorted(
        str(image_tree / rel)
        for rel in ["b.png", "a.JPG", "sub/c.jpeg", "sub/deeper/d.tiff", "sub/e.webp", "f.bmp"]
    )
    assert found == expected
    assert storage.list_images(str(image_tree) + "/") == expected
    assert storage.list_images("file://" + str(image_tree)) == expected  # local stays a plain path


def test_list_images_glob(image_tree: Path) -> None:
    found = storage.list_images(str(image_tree / "sub" / "*"))
    assert found == [str(image_tree / "sub" / "c.jpeg"), str(image_tree / "sub" / "e.webp")]


def test_list_images_txt_manifest_resolves_relative_entries_and_deduplicates(
    image_tree: Path, tmp_path: Path
) -> None:
    lines = ["# nominal images", "images/b.png", "", str(image_tree / "f.bmp"), "./images/b.png",
             "s3://bucket/x/y.png", "file://" + str(image_tree / "a.JPG")]  # fmt: skip
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    found = storage.list_images(str(tmp_path / "list.txt"))
    assert found == sorted(
        [str(image_tree / "b.png"), str(image_tree / "f.bmp"), "s3://bucket/x/y.png",
         str(image_tree / "a.JPG")]
    )  # fmt: skip


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_list_images_table_manifest_reads_uri_column(
    image_tree: Path, tmp_path: Path, suffix: str
) -> None:
    table = pa.table(
        {"label": [1, 0, 1], "uri": ["images/sub/c.jpeg", "images/b.png", "images/b.png"]}
    )
    path = tmp_path / f"manifest{suffix}"
    if suffix == ".csv":
        path.write_text(
            "label,uri\n"
            + "\n".join(
                f"{label},{uri}" for label, uri in zip(*table.to_pydict().values(), strict=True)
            )
        )
    else:
        pq.write_table(table, path)
    found = storage.list_images(str(path))
    assert found == [str(image_tree / "b.png"), str(image_tree / "sub" / "c.jpeg")]


def test_list_images_table_manifest_without_uri_column_raises(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("path\na.png\n")
    with pytest.raises(ValueError, match="no 'uri' column"):
        storage.list_images(str(path))


def test_list_images_empty_or_missing_folder_raises_naming_uri_and_forms(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    _touch(empty / "readme.txt")
    for uri in (str(empty), str(tmp_path / "does-not-exist"), str(empty / "*.png")):
        with pytest.raises(ValueError) as err:
            storage.list_images(uri)
        assert uri in str(err.value) and "manifest" in str(err.value) and "glob" in str(err.value)


# ----------------------------------------------------------------------------- manifests


def test_reader_refuses_folder_with_shards_but_no_manifest(tmp_path: Path) -> None:
    folder = str(tmp_path / "features")
    storage.write_feature_shard(
        storage.join_uri(folder, "part-00000.parquet"), ["a"], torch.tensor([0]), torch.tensor([0]),
        torch.zeros(1, 4),
    )  # fmt: skip
    with pytest.raises(FileNotFoundError) as err:
        storage.read_manifest(folder, "features")
    assert (
        folder in str(err.value)
        and "did not finish" in str(err.value)
        and "rerun" in str(err.value)
    )
    assert not storage.is_committed(folder)

    storage.write_manifest(folder, {"shards": {"part-00000.parquet": 1}}, kind="features")
    assert storage.is_committed(folder)
    manifest = storage.read_manifest(folder, "features")
    assert manifest["shards"] == {"part-00000.parquet": 1}
    assert manifest["kind"] == "features" and manifest["format_version"] == storage.FORMAT_VERSION


def test_reader_refuses_other_kind_or_version(tmp_path: Path) -> None:
    folder = str(tmp_path / "out")
    storage.write_manifest(folder, {"counts": {}}, kind="results")
    with pytest.raises(ValueError, match="'results' artifact, expected 'bank'"):
        storage.read_manifest(folder, "bank")

    path = tmp_path / "out" / "manifest.json"
    body = json.loads(path.read_text())
    body["format_version"] = storage.FORMAT_VERSION + 1
    path.write_text(json.dumps(body))
    with pytest.raises(ValueError, match="format_version"):
        storage.read_manifest(folder, "results")

    path.write_text("{ truncated")
    with pytest.raises(ValueError, match="not valid JSON"):
        storage.read_manifest(folder, "results")


def test_write_manifest_rejects_unknown_kind_and_credentials(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="artifact kind"):
        storage.write_manifest(str(tmp_path), {}, kind="model")
    config = {"config": {"storage_options": {"key": "AKIA", "secret": "shh"}}}
    with pytest.raises(ValueError, match="credentials"):
        storage.write_manifest(str(tmp_path), config, kind="results")
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY"):
        storage.write_manifest(
            str(tmp_path), {"env": {"AWS_SECRET_ACCESS_KEY": "x"}}, kind="results"
        )
    assert not (tmp_path / "manifest.json").exists()


# ----------------------------------------------------------------------------- bank artifact


def test_save_bank_load_bank_round_trip(tmp_path: Path) -> None:
    bank = _bank()
    uri = str(tmp_path / "bank")
    storage.save_bank(uri, bank)
    loaded = storage.load_bank(uri, expected_spec=SPEC)

    assert loaded.spec == bank.spec
    torch.testing.assert_close(loaded.features, bank.features, rtol=0, atol=0)
    assert loaded.image_ids == bank.image_ids
    assert loaded.ys.tolist() == bank.ys.tolist() and loaded.xs.tolist() == bank.xs.tolist()
    assert (loaded.projection_seed, loaded.coverage_radius) == (
        bank.projection_seed,
        bank.coverage_radius,
    )
    assert (loaded.image_threshold, loaded.pixel_threshold) == (3.5, None)
    assert loaded.info == bank.info


def test_bank_files_are_plain_npy_parquet_and_json(tmp_path: Path) -> None:
    bank = _bank(num_entries=12)
    uri = tmp_path / "bank"
    storage.save_bank(str(uri), bank)

    assert sorted(os.listdir(uri)) == ["features.npy", "manifest.json", "provenance.parquet"]
    features = np.load(uri / "features.npy", allow_pickle=False)  # refuses pickled object arrays
    assert features.dtype == np.float32 and features.shape == (12, SPEC.embed_dim)
    np.testing.assert_array_equal(features, bank.features.numpy())
    provenance = pq.read_table(uri / "provenance.parquet")
    assert provenance.column_names == ["image_id", "y", "x"]
    assert provenance.column("image_id").to_pylist() == list(bank.image_ids)
    manifest = json.loads((uri / "manifest.json").read_text())
    assert manifest["kind"] == "bank" and manifest["spec"] == SPEC.to_json()
    assert manifest["counts"] == {
        "num_entries": 12, "embed_dim": SPEC.embed_dim, "feature_width": SPEC.embed_dim,
    }  # fmt: skip
    assert manifest["projection_seed"] == 0 and manifest["coverage_radius"] == 1.25
    assert {"torch", "numpy", "patchcore-at-scale"} <= set(manifest["versions"])
    assert any(name.startswith("faiss") for name in manifest["versions"])


def test_bank_written_before_low_rank_storage_loads_by_its_embed_dim(tmp_path: Path) -> None:
    # Such manifests have a version-2 spec and counts without feature_width.
    old_spec = dataclasses.replace(SPEC, low_rank=False)
    uri = tmp_path / "bank"
    storage.save_bank(str(uri), _bank(spec=old_spec))
    manifest = json.loads((uri / "manifest.json").read_text())
    del manifest["counts"]["feature_width"], manifest["spec"]["low_rank"]
    manifest["spec"]["spec_version"] = 2
    (uri / "manifest.json").write_text(json.dumps(manifest))
    loaded = storage.load_bank(str(uri))
    assert loaded.spec == old_spec and loaded.features.shape == (30, SPEC.embed_dim)


def test_bank_of_another_width_than_its_spec_stores_is_refused() -> None:
    spec = dataclasses.replace(SPEC, embed_dim=256)  # efficientnet_lite0: stored 152 wide
    with pytest.raises(ValueError, match="are 256 wide but the spec stores 152-wide"):
        _bank(spec=spec)


def test_load_bank_with_other_spec_names_both_specs(tmp_path: Path) -> None:
    uri = str(tmp_path / "bank")
    storage.save_bank(uri, _bank())
    other = ModelSpec(
        backbone="efficientnet_lite0", weights="none", layers=("blocks.2", "blocks.4"),
        resize=72, crop=64, embed_dim=16, sigma=2.0,
    )  # fmt: skip
    with pytest.raises(ValueError) as err:
        storage.load_bank(uri, expected_spec=other)
    assert "sigma=4.0" in str(err.value) and "sigma=2.0" in str(err.value)


def test_load_bank_refuses_uncommitted_or_corrupt_folder(tmp_path: Path) -> None:
    uri = tmp_path / "bank"
    storage.save_bank(str(uri), _bank())
    np.save(uri / "features.npy", np.zeros((3, SPEC.embed_dim), dtype=np.float32))
    with pytest.raises(ValueError, match="corrupt"):
        storage.load_bank(str(uri))
    np.save(uri / "features.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="is object .* corrupt"):  # only the header is read
        storage.load_bank(str(uri))
    (uri / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="rerun"):
        storage.load_bank(str(uri))


def _mapped_from(tensor: torch.Tensor, path: Path) -> bool:
    """Whether `tensor`'s data lies in a memory mapping of the file `path` (/proc/self/maps)."""
    address, target = tensor.data_ptr(), str(path.resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            lo, hi = (int(part, 16) for part in fields[0].split("-"))
            if lo <= address < hi:
                return True
    return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_load_bank_memory_maps_local_features_without_a_warning(tmp_path: Path) -> None:
    bank = _bank(num_entries=700)
    uri = tmp_path / "bank"
    storage.save_bank(str(uri), bank)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy warns on read-only arrays
        loaded = storage.load_bank(str(uri))
    assert _mapped_from(loaded.features, uri / "features.npy")
    torch.testing.assert_close(loaded.features, bank.features, rtol=0, atol=0)
    torch.testing.assert_close(storage.load_bank(str(uri)).features, bank.features, rtol=0, atol=0)


def test_load_bank_refuses_a_truncated_features_file(tmp_path: Path) -> None:
    uri = tmp_path / "bank"
    storage.save_bank(str(uri), _bank())
    path = uri / "features.npy"
    os.truncate(path, path.stat().st_size - 4)
    with pytest.raises(ValueError, match=r"is \d+ bytes.*need \d+; the folder is corrupt"):
        storage.load_bank(str(uri))
    path.write_bytes(b"not an npy file")
    with pytest.raises(ValueError, match="no valid .npy header.*corrupt"):
        storage.load_bank(str(uri))
    path.unlink()
    with pytest.raises(FileNotFoundError, match="features.npy"):
        storage.load_bank(str(uri))


def test_save_bank_over_existing_bank_replaces_it(tmp_path: Path) -> None:
    uri = str(tmp_path / "bank")
    storage.save_bank(uri, _bank(num_entries=30, seed=0))
    storage.save_bank(uri, _bank(num_entries=20, seed=1))
    loaded = storage.load_bank(uri)
    torch.testing.assert_close(
        loaded.features, _bank(num_entries=20, seed=1).features, rtol=0, atol=0
    )


# -------------------------------------------------------------------------- S3 (moto on loopback)


@pytest.fixture
def s3_env(s3_server: str) -> str:
    """A bucket on the session's moto server; only the standard AWS_* variables point at it
    (conftest.py), so this checks that botocore picks up AWS_ENDPOINT_URL_S3 by itself."""
    return f"s3://{s3_server}"


def test_s3_bytes_listing_manifest_and_bank_use_the_aws_endpoint_variable(
    s3_env: str, node_cache: tuple[Path, list[str]]
) -> None:
    for rel in ["imgs/a.png", "imgs/sub/b.jpg", "imgs/notes.txt"]:
        storage.write_bytes(f"{s3_env}/{rel}", b"img")
    assert storage.read_bytes(f"{s3_env}/imgs/a.png") == b"img"
    expected = [f"{s3_env}/imgs/a.png", f"{s3_env}/imgs/sub/b.jpg"]
    assert storage.list_images(f"{s3_env}/imgs") == expected
    assert storage.list_images(f"{s3_env}/imgs/*.png") == expected[:1]
    # Another process (boto3 here, a Ray worker in a job) adds an object: no stale cached listing.
    bucket = s3_env[len("s3://") :]
    boto3.client("s3").put_object(Bucket=bucket, Key="imgs/c.png", Body=b"img")
    assert f"{s3_env}/imgs/c.png" in storage.list_images(f"{s3_env}/imgs")
    assert storage.exists(f"{s3_env}/imgs/c.png")
    storage.write_bytes(f"{s3_env}/lists/l.txt", b"../imgs/a.png\nsub/x.png\n")
    assert storage.list_images(f"{s3_env}/lists/l.txt") == [
        f"{s3_env}/imgs/a.png",
        f"{s3_env}/lists/sub/x.png",
    ]

    bank = _bank(num_entries=9)
    with pytest.raises(FileNotFoundError):
        storage.load_bank(f"{s3_env}/bank")
    storage.save_bank(f"{s3_env}/bank", bank)
    loaded = storage.load_bank(f"{s3_env}/bank", expected_spec=SPEC)
    torch.testing.assert_close(loaded.features, bank.features, rtol=0, atol=0)
    manifest_text = storage.read_bytes(f"{s3_env}/bank/manifest.json").decode()
    assert "testing" not in manifest_text and "127.0.0.1" not in manifest_text


@pytest.fixture
def node_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[str]]:
    """The node's temporary folder moved under tmp_path, and a log of the bank downloads."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node-tmp"))
    (tmp_path / "node-tmp").mkdir()
    downloads: list[str] = []
    download = storage._download

    def counted(fs, path: str, local: str) -> None:
        downloads.append(path)
        download(fs, path, local)

    monkeypatch.setattr(storage, "_download", counted)
    return tmp_path / "node-tmp" / storage.BANK_CACHE, downloads


def test_remote_bank_is_downloaded_once_per_node_and_a_truncated_copy_replaced(
    s3_env: str, node_cache: tuple[Path, list[str]]
) -> None:
    cache, downloads = node_cache
    bank = _bank(num_entries=50, seed=3)
    storage.save_bank(f"{s3_env}/cached-bank", bank)
    first = storage.load_bank(f"{s3_env}/cached-bank")
    (copy,) = cache.glob("*/features.npy")
    assert _mapped_from(first.features, copy)
    torch.testing.assert_close(first.features, bank.features, rtol=0, atol=0)
    stat = copy.stat()
    second = storage.load_bank(f"{s3_env}/cached-bank")
    assert len(downloads) == 1 and (copy.stat().st_ino, copy.stat().st_mtime_ns) == (
        stat.st_ino, stat.st_mtime_ns)
    torch.testing.assert_close(second.features, bank.features, rtol=0, atol=0)

    os.truncate(copy, stat.st_size // 2)  # e.g. a full disk or a killed copy made by hand
    third = storage.load_bank(f"{s3_env}/cached-bank")
    assert len(downloads) == 2 and copy.stat().st_size == stat.st_size
    torch.testing.assert_close(third.features, bank.features, rtol=0, atol=0)
    assert sorted(p.name for p in copy.parent.iterdir()) == [".lock", "features.npy"]

    storage.save_bank(f"{s3_env}/cached-bank", _bank(num_entries=40, seed=4))  # a refit
    refit = storage.load_bank(f"{s3_env}/cached-bank")
    assert len(downloads) == 3 and len(list(cache.glob("*/features.npy"))) == 2
    torch.testing.assert_close(refit.features, _bank(num_entries=40, seed=4).features,
                               rtol=0, atol=0)


def test_concurrent_loads_of_a_remote_bank_download_it_once(
    s3_env: str, node_cache: tuple[Path, list[str]]
) -> None:
    _, downloads = node_cache
    bank = _bank(num_entries=60, seed=5)
    storage.save_bank(f"{s3_env}/shared-bank", bank)
    loaded: list[Bank] = []
    threads = [threading.Thread(target=lambda: loaded.append(
        storage.load_bank(f"{s3_env}/shared-bank"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loaded) == 4 and len(downloads) == 1
    for got in loaded:
        torch.testing.assert_close(got.features, bank.features, rtol=0, atol=0)


def test_remote_bank_whose_features_disagree_with_the_manifest_is_refused(
    s3_env: str, node_cache: tuple[Path, list[str]]
) -> None:
    storage.save_bank(f"{s3_env}/bad-bank", _bank())
    data = storage.read_bytes(f"{s3_env}/bad-bank/features.npy")
    storage.write_bytes(f"{s3_env}/bad-bank/features.npy", data[:-8])
    with pytest.raises(ValueError, match="bytes.*corrupt"):
        storage.load_bank(f"{s3_env}/bad-bank")
    storage.remove(f"{s3_env}/bad-bank/features.npy")
    with pytest.raises(FileNotFoundError, match="bad-bank/features.npy"):
        storage.load_bank(f"{s3_env}/bad-bank")
