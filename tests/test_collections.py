"""Collections: store, ingest, search, delete, durability, index maintenance, Parquet, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from clipserve.collections import (
    CollectionError,
    CollectionExists,
    CollectionNotFound,
    CollectionStore,
    FilterError,
    Manifest,
    NewItem,
    Source,
    expand,
    ingest,
    manifest_for,
    query_vector,
    url_fetcher,
)
from clipserve.collections import index as faiss_index
from clipserve.collections.store import INDEX_FILE

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "horse")
TEXTS = [f"a photo of a {thing}" for thing in ("cat", "dog", "rocket", "cup of coffee", "moon", "coin", "horse")]


def write_photos(directory: Path, names: tuple[str, ...] = PHOTOS) -> list[Path]:
    """Real photographs from scikit-image, written as PNG/JPEG files (nested one level for recursion)."""
    import skimage.data
    from PIL import Image

    paths = []
    for i, name in enumerate(names):
        folder = directory / ("nested" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.{'jpg' if i % 3 else 'png'}"
        Image.fromarray(getattr(skimage.data, name)()).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("photos")
    write_photos(directory)
    return directory


@pytest.fixture
def store(tmp_path: Path) -> CollectionStore:
    store = CollectionStore(tmp_path / "collections")
    yield store
    store.close()


@pytest.fixture
def collection(store: CollectionStore, tiny_model, tiny_checkpoint: Path):
    return store.create(manifest_for("things", tiny_model, str(tiny_checkpoint)))


def add_texts(collection, model, texts, metadata=None):
    return ingest(collection, model, [Source(text=t, metadata=(metadata or {})) for t in texts])


def test_add_search_get_delete_round_trip(collection, tiny_model, photos: Path) -> None:
    sources, not_images = expand([str(photos)])
    assert not not_images and len(sources) == len(PHOTOS)
    report = ingest(collection, tiny_model, sources + [Source(text=t) for t in TEXTS], batch_size=5)
    assert len(report.added) == len(PHOTOS) + len(TEXTS) and not report.skipped
    assert collection.count() == len(PHOTOS) + len(TEXTS)

    chelsea = next(s for s in sources if "chelsea" in s.path)
    query = query_vector(tiny_model, collection.manifest, image=chelsea.path)
    best = collection.search(query, top_k=3)
    assert best[0].item.source == chelsea.path and best[0].item.kind == "image"
    assert best[0].score == pytest.approx(1.0, abs=1e-5)

    item = collection.get(best[0].item.id, with_embedding=True)
    assert np.allclose(item.embedding, query, atol=1e-6)
    assert collection.delete(ids=[item.id]) == 1
    assert collection.get(item.id) is None
    assert all(hit.item.id != item.id for hit in collection.search(query, top_k=20))
    assert collection.count() == len(PHOTOS) + len(TEXTS) - 1
    assert list(collection.indexed_ids()) == sorted(i.id for b in collection.iter_items() for i in b)


def test_text_search_equals_brute_force_cosine_over_all_items(collection, tiny_model, photos: Path) -> None:
    """The ranking and scores of a text query are those of cosines against every item, each item embedded
    on its own by the model (not read back from the store)."""
    sources, _ = expand([str(photos)])
    ingest(collection, tiny_model, sources + [Source(text=t) for t in TEXTS], batch_size=4)
    items = [i for batch in collection.iter_items(with_embedding=False) for i in batch]
    reference = torch.cat([
        tiny_model.encode_text([i.text], normalize=True) if i.kind == "text"
        else tiny_model.encode_image([i.source], normalize=True)
        for i in items
    ]).numpy()  # fmt: skip
    query = tiny_model.encode_text(["a photo of a cat"], normalize=True)[0].numpy()
    cosines = reference @ query
    order = np.argsort(-cosines, kind="stable")
    hits = collection.search(query_vector(tiny_model, collection.manifest, text="a photo of a cat"), top_k=len(items))
    assert [h.item.id for h in hits] == [items[i].id for i in order]
    assert np.allclose([h.score for h in hits], cosines[order], atol=1e-5)
    # a threshold halfway between two scores, so float rounding cannot move an item across it
    middle = len(order) // 2
    threshold = float(cosines[order[middle - 1]] + cosines[order[middle]]) / 2
    above = collection.search(query, top_k=len(items), min_score=threshold)
    assert [h.item.id for h in above] == [items[i].id for i in order[:middle]]


def test_metadata_filters_in_search_and_delete(collection, tiny_model) -> None:
    rng = np.random.default_rng(0)
    items = [
        NewItem("text", f"h{i}", rng.normal(size=64), text=f"t{i}",
                metadata={"year": 2015 + i % 10, "tag": ["cat", "dog", "bird"][i % 3], "exif": {"iso": 100 * (i % 4)},
                          **({"label": "x"} if i % 5 == 0 else {})})
        for i in range(60)
    ]  # fmt: skip
    ids = collection.add(items)
    meta = {i: item.metadata for i, item in zip(ids, items, strict=True)}
    query = rng.normal(size=64)

    def expect(pred) -> set[int]:
        return {i for i, m in meta.items() if pred(m)}

    cases = [
        ({"tag": "cat"}, lambda m: m["tag"] == "cat"),
        ({"tag": {"$in": ["dog", "bird"]}}, lambda m: m["tag"] in ("dog", "bird")),
        ({"year": {"$gte": 2018, "$lt": 2021}}, lambda m: 2018 <= m["year"] < 2021),
        ({"exif.iso": 300, "tag": {"$ne": "bird"}}, lambda m: m["exif"]["iso"] == 300 and m["tag"] != "bird"),
        ({"label": None}, lambda m: "label" not in m),
    ]
    for spec, pred in cases:
        hits = collection.search(query, top_k=100, filter=spec)
        assert {h.item.id for h in hits} == expect(pred), spec
        assert all(pred(h.item.metadata) for h in hits)
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
    with pytest.raises(FilterError, match="unknown operator"):
        collection.search(query, filter={"year": {"$regex": "x"}})
    with pytest.raises(FilterError, match="filter field"):
        collection.search(query, filter={"a') OR 1=1 --": 1})

    assert collection.delete(filter={"tag": "cat"}) == len(expect(lambda m: m["tag"] == "cat"))
    assert collection.count() == 60 - 20
    assert collection.search(query, top_k=100, filter={"tag": "cat"}) == []
    with pytest.raises(CollectionError, match="refusing"):
        collection.delete()


def test_duplicates_are_skipped_and_rerun_resumes(collection, tiny_model, photos: Path, monkeypatch) -> None:
    sources, _ = expand([str(photos)])
    first = ingest(collection, tiny_model, sources[:5] + [Source(text="hello"), Source(text="hello")])
    assert len(first.added) == 6 and first.skip_counts() == {"duplicate": 1}

    encoded: list[int] = []
    original = type(tiny_model).encode_image
    monkeypatch.setattr(type(tiny_model), "encode_image", lambda self, images, **kw: encoded.append(len(images)) or original(self, images, **kw))
    again = ingest(collection, tiny_model, sources + [Source(text="hello")])
    assert len(again.added) == len(sources) - 5
    assert again.skip_counts() == {"duplicate": 6}
    assert sum(encoded) == len(sources) - 5  # stored items were not decoded or embedded again
    assert collection.count() == len(sources) + 1


def test_corrupt_image_in_folder_is_skipped_and_reported(collection, tiny_model, photos: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in sorted(photos.rglob("*.*"))[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    sources, skipped = expand([str(folder)])
    report = ingest(collection, tiny_model, sources)
    report.skipped += skipped
    assert len(report.added) == 3 and collection.count() == 3
    assert report.skip_counts() == {"unreadable": 1, "not an image file": 1}
    broken = next(s for s in report.skipped if s.reason == "unreadable")
    assert broken.source.endswith("broken.jpg") and "image" in broken.detail


def test_too_large_image_is_reported(collection, tiny_model, photos: Path) -> None:
    from clipserve.io.images import ImageLimits

    sources, _ = expand([str(photos)])
    report = ingest(collection, tiny_model, sources[:2], limits=ImageLimits(max_bytes=1000))
    assert report.skip_counts() == {"too large": 2} and collection.count() == 0


def test_index_is_rebuilt_or_caught_up_when_missing_stale_or_corrupt(store, tiny_model, tiny_checkpoint) -> None:
    collection = store.create(manifest_for("idx", tiny_model, str(tiny_checkpoint)))
    rng = np.random.default_rng(1)
    ids = collection.add([NewItem("text", f"h{i}", rng.normal(size=64)) for i in range(30)])
    collection.save_index()
    saved = collection.index_state()
    assert (saved.max_id, saved.count) == (max(ids), 30)

    # Stale: another process (a second handle) adds and deletes behind this index file.
    other = CollectionStore(store.root).open("idx")
    more = other.add([NewItem("text", f"g{i}", rng.normal(size=64)) for i in range(10)])
    other.delete(ids=ids[:4])
    other.close(save_index=False)
    assert collection.indexed_ids().tolist() == sorted(ids[4:] + more)  # live handle catches up before use

    fresh = CollectionStore(store.root).open("idx")
    assert faiss_index.load(fresh.index_path)[1].count == 30  # the file on disk is stale...
    assert fresh.indexed_ids().tolist() == sorted(ids[4:] + more)  # ...and caught up on open
    fresh.save_index()
    fresh.close()

    path = store.root / "idx" / INDEX_FILE
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(faiss_index.IndexFileError, match="checksum"):
        faiss_index.load(path)
    reopened = CollectionStore(store.root).open("idx")
    assert reopened.indexed_ids().tolist() == sorted(ids[4:] + more)
    reopened.close()
    path.unlink()
    reopened = CollectionStore(store.root).open("idx")
    assert reopened.indexed_ids().tolist() == sorted(ids[4:] + more)
    reopened.close()
    assert path.is_file()


def test_store_create_list_drop_and_errors(store, tiny_model, tiny_checkpoint) -> None:
    assert store.names() == []
    store.create(manifest_for("a", tiny_model, str(tiny_checkpoint)))
    store.create(manifest_for("b", tiny_model, str(tiny_checkpoint), dtype="float16"))
    assert store.names() == ["a", "b"]
    with pytest.raises(CollectionExists):
        store.create(manifest_for("a", tiny_model, str(tiny_checkpoint)))
    for bad in ("../x", "", "a/b", ".hidden"):
        with pytest.raises(CollectionError, match="invalid collection name"):
            store.open(bad)
    store.drop("a")
    assert store.names() == ["b"]
    with pytest.raises(CollectionNotFound):
        store.open("a")
    b = store.open("b")
    vec = np.random.default_rng(2).normal(size=64)
    [item_id] = b.add([NewItem("text", "x", vec)])
    assert np.allclose(b.get(item_id, with_embedding=True).embedding, vec / np.linalg.norm(vec), atol=1e-3)
    with pytest.raises(CollectionError, match="64"):
        b.add([NewItem("text", "y", np.ones(3))])
    with pytest.raises(CollectionError, match="dtype"):
        Manifest(name="c", model_source="m", model_name="m", embed_dim=4, dtype="int8")


def test_model_mismatch_is_refused(store, tiny_model) -> None:
    other = store.create(Manifest(name="other", model_source="x", model_name="another-model", embed_dim=64))
    with pytest.raises(CollectionError, match="belongs to model 'another-model'"):
        ingest(other, tiny_model, [Source(text="hi")])


_INGEST_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    import clipserve
    from clipserve.collections import CollectionStore, Source, ingest

    root, checkpoint = sys.argv[1], sys.argv[2]
    model = clipserve.load(checkpoint)
    collection = CollectionStore(root).open("crash")
    for round in range(1000):
        def acknowledge(n, added):
            for item_id, source in added:
                print(item_id, source.text, flush=True)
        ingest(collection, model, [Source(text=f"item {round} {i}") for i in range(8)], batch_size=4,
               on_batch=acknowledge)
        if round % 3 == 0:
            collection.save_index()  # leave index files of various staleness behind
    """
)


def test_sigkill_mid_ingest_keeps_every_acknowledged_item(store, tiny_model, tiny_checkpoint, tmp_path: Path) -> None:
    store.create(manifest_for("crash", tiny_model, str(tiny_checkpoint))).close()
    script = tmp_path / "ingest.py"
    script.write_text(_INGEST_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(store.root), str(tiny_checkpoint)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    acknowledged: dict[int, str] = {}
    try:
        for line in proc.stdout:
            item_id, text = line.rstrip("\n").split(" ", 1)
            acknowledged[int(item_id)] = text
            if len(acknowledged) >= 60:
                break
        else:
            pytest.fail(f"ingest process ended early: {proc.stderr.read()}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    reopened = CollectionStore(store.root).open("crash")
    stored = {i.id: i.text for batch in reopened.iter_items(with_embedding=False) for i in batch}
    assert acknowledged.items() <= stored.items()
    assert reopened.indexed_ids().tolist() == sorted(stored)
    probe = next(iter(acknowledged))
    vector = reopened.get(probe, with_embedding=True).embedding
    assert reopened.search(vector, top_k=1)[0].item.id == probe
    reopened.close()


def clustered_vectors(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around random centres: the structure CLIP embeddings have, which IVF relies on."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.slow
def test_ivf_recall_at_10_against_exact_on_100k_vectors() -> None:
    import faiss

    faiss.omp_set_num_threads(1)
    n, dim = 100_000, 64
    vectors = clustered_vectors(n, dim, clusters=500, seed=0)
    queries = clustered_vectors(n + 200, dim, clusters=500, seed=0)[n:]  # same centres, unseen points
    ids = np.arange(1, n + 1, dtype=np.int64)
    exact, exact_state = faiss_index.build("flat", vectors, ids)
    ann, ann_state = faiss_index.build(faiss_index.choose_kind(n), vectors, ids)
    assert ann_state.kind == "ivf" and ann_state.nprobe < ann_state.nlist / 8  # really approximate
    _, truth = exact.search(queries, 10, params=faiss_index.search_params(exact_state))
    _, found = ann.search(queries, 10, params=faiss_index.search_params(ann_state))
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)])
    assert recall >= 0.95, recall


def test_filtered_search_on_ivf_collection_is_exact(store) -> None:
    """Above the ANN threshold: small filtered subsets are scored exactly, large ones through the index."""
    collection = store.create(Manifest(name="big", model_source="x", model_name="x", embed_dim=32, index="ivf"))
    vectors = clustered_vectors(3000, 32, clusters=30, seed=3)
    ids = collection.add([NewItem("text", f"h{i}", v, metadata={"part": i % 3, "rare": i % 500 == 0})
                          for i, v in enumerate(vectors)])  # fmt: skip
    assert collection.index_state().kind == "ivf"
    query = vectors[7]
    rare = [i for i, k in zip(ids, range(3000), strict=True) if k % 500 == 0]
    hits = collection.search(query, top_k=10, filter={"rare": True})
    expected = sorted(rare, key=lambda i: -float(vectors[i - ids[0]] @ query))
    assert [h.item.id for h in hits] == expected
    assert collection.search(query, top_k=1, filter={"part": 1})[0].item.id == ids[7]


def test_export_import_parquet_round_trip(collection, store, tiny_model, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from clipserve.collections.parquet import export_parquet, import_parquet

    add_texts(collection, tiny_model, TEXTS[:4], metadata={"lang": "en"})
    path = tmp_path / "things.parquet"
    assert export_parquet(collection, path) == 4
    table = pq.read_table(path).to_pylist()
    originals = {i.id: i for batch in collection.iter_items() for i in batch}
    for row in table:
        item = originals[row["id"]]
        assert row["text"] == item.text and json.loads(row["metadata"]) == {"lang": "en"}
        np.testing.assert_array_equal(np.asarray(row["embedding"], dtype=np.float32), item.embedding)
    copy = store.create(Manifest(**{**collection.manifest.as_dict(), "name": "copy"}))
    report = import_parquet(copy, [path])
    assert len(report.added) == 4
    copies = sorted((i.text, i.content_hash, i.embedding.tobytes()) for b in copy.iter_items() for i in b)
    assert copies == sorted((i.text, i.content_hash, i.embedding.tobytes()) for i in originals.values())
    assert import_parquet(copy, [path]).skip_counts() == {"duplicate": 4}


def test_cli_collection_commands(tiny_checkpoint: Path, photos: Path, tmp_path: Path, capsys) -> None:
    from clipserve.cli.main import main

    root = ["--root", str(tmp_path / "cols")]
    assert main(["collection", "create", "pics", "--model", str(tiny_checkpoint), *root]) == 0
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnope")
    assert main(["collection", "add", "pics", str(photos), str(broken), str(tmp_path / "missing.jpg"),
                 "--text", "a cat", "--metadata", '{"set": "a"}', *root]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "added 9, skipped 2 (1 not found, 1 unreadable)" in err and "broken.png: unreadable" in err
    assert main(["collection", "add", "pics", str(photos), *root]) == 0
    assert "added 0, skipped 8 (8 duplicate)" in capsys.readouterr().err
    assert main(["collection", "search", "pics", "--text", "a cat", "--top-k", "3", "--json", *root]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(results) == 3 and results[0]["text"] == "a cat" and results[0]["metadata"] == {"set": "a"}
    assert main(["collection", "list", *root]) == 0
    assert "pics\t9 items" in capsys.readouterr().out
    assert main(["collection", "delete", "pics", "--id", str(results[0]["id"]), *root]) == 0
    assert main(["collection", "get", "pics", str(results[0]["id"]), *root]) == 1
    assert "no item" in capsys.readouterr().err
    assert main(["collection", "export", "pics", str(tmp_path / "out.parquet"), *root]) == 0
    assert main(["collection", "search", "nope", "--text", "x", *root]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("clipserve collection: error: collection 'nope' not found")
    assert main(["collection", "search", "pics", "--text", "x", "--filter", '{"a": {"$x": 1}}', *root]) == 2
    assert "unknown operator" in capsys.readouterr().err
    assert main(["collection", "drop", "pics", *root]) == 0


def test_add_urls_over_loopback(collection, tiny_model, photos: Path) -> None:
    import http.server
    import threading
    from functools import partial

    from clipserve.io.fetch import FetchPolicy

    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(photos))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        urls = [f"{base}/astronaut.png", f"{base}/nested/coffee.jpg", f"{base}/missing.png"]
        allowed = FetchPolicy(enabled=True, allowed_hosts=("127.0.0.1",), allow_loopback=True)
        report = ingest(collection, tiny_model, [Source(url=u) for u in urls], fetch=url_fetcher(allowed))
        assert len(report.added) == 2 and report.skip_counts() == {"fetch failed": 1}
        assert "404" in report.skipped[0].detail
        refused = FetchPolicy(enabled=True, allowed_hosts=("*",))  # the server's rules: loopback is refused
        report = ingest(collection, tiny_model, [Source(url=f"{base}/rocket.png")], fetch=url_fetcher(refused))
        assert report.skip_counts() == {"fetch failed": 1} and "loopback" in report.skipped[0].detail
    finally:
        server.shutdown()


def test_ivfpq_collection_reranks_with_exact_scores(store) -> None:
    """IVF-PQ (compressed codes) finds candidates; the stored vectors give the exact scores and order."""
    collection = store.create(Manifest(name="pq", model_source="x", model_name="x", embed_dim=64, index="ivfpq"))
    vectors = clustered_vectors(20_000, 64, clusters=100, seed=5)
    ids = collection.add([NewItem("text", f"v{i}", v) for i, v in enumerate(vectors)])
    assert collection.index_state().kind == "ivfpq"
    queries = clustered_vectors(20_050, 64, clusters=100, seed=5)[20_000:]
    recalls = []
    for query in queries:
        exact = ids[0] + np.argsort(-(vectors @ query))[:10]
        hits = collection.search(query, top_k=10)
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
        for hit in hits:  # re-ranked: each score is the exact cosine, not the PQ estimate
            assert hit.score == pytest.approx(float(vectors[hit.item.id - ids[0]] @ query), abs=1e-3)
        recalls.append(len(set(exact.tolist()) & {h.item.id for h in hits}) / 10)
    assert np.mean(recalls) >= 0.9, np.mean(recalls)
