"""`clipserve embed-dataset` on a local Ray instance, and `collection import` of its shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_collections import write_photos

from clipserve.cli.main import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    import ray

    yield
    ray.shutdown()


def read_shards(directory: Path) -> dict[str, dict]:
    rows = {}
    for shard in sorted(directory.glob("*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            rows[row["id"]] = row
    return rows


def test_embed_folder_matches_encode_image_and_imports(local_ray, tiny_model, tiny_checkpoint, tmp_path: Path, capsys) -> None:
    photos = write_photos(tmp_path / "photos")
    (tmp_path / "photos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "shards"
    assert main(["embed-dataset", str(tmp_path / "photos"), "--model", str(tiny_checkpoint), "--output", str(out),
                 "--batch-size", "3", "--precision", "fp32"]) == 0  # fmt: skip
    rows = read_shards(out)
    assert set(rows) == {str(p) for p in photos} | {str(tmp_path / "photos" / "broken.png")}
    broken = rows.pop(str(tmp_path / "photos" / "broken.png"))
    assert broken["embedding"] is None and "image" in broken["error"]
    expected = tiny_model.encode_image([str(p) for p in photos], normalize=True).numpy()
    got = np.array([rows[str(p)]["embedding"] for p in photos], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert all(rows[str(p)]["error"] is None and rows[str(p)]["content_hash"].startswith("sha256:") for p in photos)
    assert "1 unreadable" in capsys.readouterr().err

    root = tmp_path / "collections"
    assert main(["collection", "import", "photos", str(out), "--root", str(root)]) == 0
    assert "added 8, skipped 1 (1 unreadable)" in capsys.readouterr().err
    assert main(["collection", "search", "photos", "--root", str(root), "--image", str(photos[2]), "--top-k", "1"]) == 0
    assert capsys.readouterr().out.split("\t")[3].strip() == str(photos[2])
    assert main(["collection", "import", "photos", str(out), "--root", str(root)]) == 0
    assert "added 0, skipped 9 (8 duplicate, 1 unreadable)" in capsys.readouterr().err


def test_embed_webdataset_tar(local_ray, tiny_model, tiny_checkpoint, tmp_path: Path) -> None:
    photos = write_photos(tmp_path / "photos", names=("astronaut", "coffee", "chelsea"))
    tar_path = tmp_path / "data-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, path in enumerate(photos):
            for name, data in ((f"sample{i:03d}.{path.suffix[1:]}", path.read_bytes()), (f"sample{i:03d}.txt", b"caption")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "shards"
    assert main(["embed-dataset", str(tar_path), "--model", str(tiny_checkpoint), "--output", str(out),
                 "--precision", "fp32"]) == 0
    rows = read_shards(out)
    assert sorted(rows) == ["sample000", "sample001", "sample002"]
    expected = tiny_model.encode_image([str(p) for p in photos], normalize=True).numpy()
    got = np.array([rows[f"sample{i:03d}"]["embedding"] for i in range(3)], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
