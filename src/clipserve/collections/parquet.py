"""Parquet in and out of collections.

Export writes one file: id, kind, source, text, content_hash, metadata (a JSON string), embedding
(fixed-size list of float32), with the manifest in the schema metadata. Import reads those files, or the
shards `clipserve embed-dataset` writes (id, source, content_hash, embedding, error), and stores them
without touching a model; rows with an error or no embedding are counted as skipped, never silently lost.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipserve.collections.embedding import text_hash
from clipserve.collections.ingest import IngestReport, Skipped
from clipserve.collections.store import Collection, CollectionError, Manifest, NewItem

MANIFEST_KEY = b"clipserve.manifest"
MODEL_FILE = "clipserve-model.json"  # {"source", "name", "embed_dim"}: written by embed-dataset beside its shards


def export_schema(manifest: Manifest) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.int64()),
            ("kind", pa.string()),
            ("source", pa.string()),
            ("text", pa.string()),
            ("content_hash", pa.string()),
            ("metadata", pa.string()),
            ("embedding", pa.list_(pa.float32(), manifest.embed_dim)),
        ],
        metadata={MANIFEST_KEY: json.dumps(manifest.as_dict()).encode()},
    )


def export_parquet(collection: Collection, path: str | Path, batch_size: int = 4096) -> int:
    """Write every item to `path` (replaced atomically); returns the number of rows."""
    path = Path(path)
    schema = export_schema(collection.manifest)
    tmp = path.with_name(f".{path.name}.tmp")
    rows = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for items in collection.iter_items(batch_size):
            vectors = np.stack([item.embedding for item in items]).astype(np.float32)
            columns = {
                "id": [item.id for item in items],
                "kind": [item.kind for item in items],
                "source": [item.source for item in items],
                "text": [item.text for item in items],
                "content_hash": [item.content_hash for item in items],
                "metadata": [json.dumps(item.metadata, ensure_ascii=False) for item in items],
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), collection.manifest.embed_dim),
            }
            writer.write_table(pa.table(columns, schema=schema))
            rows += len(items)
    tmp.replace(path)
    return rows


def parquet_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files given directly, and the *.parquet files inside given directories (sorted)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(path.rglob("*.parquet"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")
    if not files:
        raise CollectionError(f"no Parquet files in {', '.join(map(str, paths))}")
    return files


def model_of(files: Sequence[Path]) -> dict[str, object] | None:
    """The model a set of shards or an export was embedded with: embed-dataset's `MODEL_FILE` beside the
    first file, or the manifest in an export's schema metadata."""
    sidecar = files[0].parent / MODEL_FILE
    if sidecar.is_file():
        return json.loads(sidecar.read_text(encoding="utf-8"))
    meta = pq.read_schema(files[0]).metadata or {}
    if MANIFEST_KEY in meta:
        manifest = json.loads(meta[MANIFEST_KEY])
        return {"source": manifest["model_source"], "name": manifest["model_name"], "embed_dim": manifest["embed_dim"]}
    return None


def _batches(files: Sequence[Path], batch_size: int) -> Iterator[tuple[Path, pa.RecordBatch]]:
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_size):
            yield file, batch


def import_parquet(collection: Collection, files: Sequence[Path], batch_size: int = 4096) -> IngestReport:
    """Store the rows of `files` (exports or embed-dataset shards). Without a content_hash column an item
    is identified by its source (or dataset id), so importing the same shards twice adds nothing."""
    report = IngestReport()
    for file, batch in _batches(files, batch_size):
        table = batch.to_pydict()
        if "embedding" not in table:
            raise CollectionError(f"{file}: no 'embedding' column")
        n = batch.num_rows
        column = {name: table.get(name) or [None] * n for name in ("id", "kind", "source", "text", "content_hash", "metadata", "error")}
        items: list[NewItem] = []
        for i in range(n):
            label = str(column["source"][i] or column["id"][i] or f"{file.name}#{i}")
            embedding = table["embedding"][i]
            if column["error"][i] or embedding is None:
                report.skipped.append(Skipped(label, "unreadable", column["error"][i] or "no embedding"))
                continue
            metadata = json.loads(column["metadata"][i]) if column["metadata"][i] else {}
            if column["metadata"][i] is None and column["id"][i] is not None:
                metadata = {"dataset_id": column["id"][i]}
            items.append(NewItem(
                kind=column["kind"][i] or "image",
                content_hash=column["content_hash"][i] or text_hash(f"import:{label}"),
                embedding=np.asarray(embedding, dtype=np.float32),
                source=column["source"][i], text=column["text"][i], metadata=metadata,
            ))  # fmt: skip
        for item, item_id in zip(items, collection.add(items), strict=True):
            if item_id is None:
                report.skipped.append(Skipped(item.source or item.content_hash, "duplicate", "already in the collection"))
            else:
                report.added.append(item_id)
    return report
