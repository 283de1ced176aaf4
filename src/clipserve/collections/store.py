"""Collections on disk: one directory per collection, SQLite (the truth) + a FAISS index (a cache).

    <root>/<name>/items.sqlite3   manifest, items (with their normalised embeddings), deletion log
    <root>/<name>/index.faiss     `clipserve.collections.index` file, rebuilt or caught up when stale

Durability: SQLite runs in WAL mode with ``synchronous=FULL``, so a call that returned (an "acknowledged"
add or delete) has been fsynced and survives ``kill -9`` and power loss; ingest batches many items per
transaction to amortise the fsync. Nothing about the FAISS file needs to be durable: on open and before each
search the in-memory index is compared with SQLite's high-water marks (the items id sequence, which
AUTOINCREMENT never reuses, and the deletion log's sequence) and caught up, or rebuilt when it cannot be.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clipserve.collections import index as faiss_index
from clipserve.collections.filters import compile_filter

log = logging.getLogger(__name__)

DB_FILE = "items.sqlite3"
INDEX_FILE = "index.faiss"
DTYPES = {"float32": np.float32, "float16": np.float16}
ITEM_KINDS = ("image", "text", "both")
ENV_ROOT = "CLIPSERVE_COLLECTIONS"
# Filtered searches over at most this many matching items score them exactly from SQLite; larger subsets go
# through the ANN index restricted to the matching ids.
EXACT_FILTER_MAX = 20_000
# ivfpq scores are approximate: fetch this many times top_k candidates and re-score them exactly.
RERANK_FACTOR = 10
# Save the index after this many unsaved changes (or this fraction of the collection), not after every call.
SAVE_EVERY_CHANGES = 2_000
SAVE_EVERY_FRACTION = 0.1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")

_SCHEMA = """
CREATE TABLE manifest (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('image', 'text', 'both')),
    source TEXT,
    text TEXT,
    content_hash TEXT NOT NULL UNIQUE,
    metadata TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)),
    embedding BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE deletions (seq INTEGER PRIMARY KEY AUTOINCREMENT, item_id INTEGER NOT NULL);
"""


class CollectionError(ValueError):
    """A collection operation the user asked for that cannot be done; one readable line."""


class CollectionNotFound(CollectionError):
    pass


class CollectionExists(CollectionError):
    pass


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise CollectionError(
            f"invalid collection name {name!r}: 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class Manifest:
    """Which model a collection belongs to and how its vectors are stored and indexed."""

    name: str
    model_source: str
    model_name: str
    embed_dim: int
    dtype: str = "float32"
    index: str = "auto"
    created: float = 0.0

    def __post_init__(self) -> None:
        validate_name(self.name)
        if self.dtype not in DTYPES:
            raise CollectionError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.index != "auto" and self.index not in faiss_index.INDEX_KINDS:
            raise CollectionError(f"index must be auto or one of {', '.join(faiss_index.INDEX_KINDS)}, got {self.index!r}")
        if not isinstance(self.embed_dim, int) or self.embed_dim <= 0:
            raise CollectionError(f"embed_dim must be a positive integer, got {self.embed_dim!r}")

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class NewItem:
    """An embedded item ready to store; `embedding` is a normalised vector of the collection's width."""

    kind: str
    content_hash: str
    embedding: np.ndarray
    source: str | None = None
    text: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Item:
    id: int
    kind: str
    source: str | None
    text: str | None
    content_hash: str
    metadata: dict[str, Any]
    created: float
    embedding: np.ndarray | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("id", "kind", "source", "text", "content_hash", "metadata", "created")}
        if self.embedding is not None:
            out["embedding"] = self.embedding.astype(np.float32).tolist()
        return out


@dataclass(frozen=True)
class Hit:
    item: Item
    score: float


UNIT_NORM_TOLERANCE = 1e-6


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); zero rows are an error, not NaNs in the index."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.all(np.isfinite(vectors)) or np.any(norms == 0):
        raise CollectionError("vectors must be finite and non-zero")
    # Rows already of unit length (within float32 rounding) are kept bit for bit: dividing by a norm of
    # 1 +- 1 ulp moves the last bits, and an export -> import round trip must not change stored vectors.
    return vectors / np.where(np.abs(norms - 1) <= UNIT_NORM_TOLERANCE, 1, norms)


class Collection:
    """One collection. Thread-safe (one lock); several processes may use the same collection at once."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        db_path = self.directory / DB_FILE
        if not db_path.is_file():
            raise CollectionNotFound(f"collection {self.directory.name!r} not found in {self.directory.parent}")
        self._lock = threading.RLock()
        self._db = _connect(db_path)
        rows = dict(self._db.execute("SELECT key, value FROM manifest").fetchall())
        try:
            self.manifest = Manifest(**{k: json.loads(v) for k, v in rows.items()})
        except (TypeError, ValueError) as exc:
            raise CollectionError(f"collection {self.directory.name!r} has an unreadable manifest: {exc}") from None
        self._dtype = DTYPES[self.manifest.dtype]
        self._index: faiss.Index | None = None
        self._state: faiss_index.IndexState | None = None
        self._unsaved = 0

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def index_path(self) -> Path:
        return self.directory / INDEX_FILE

    def close(self, save_index: bool = True) -> None:
        with self._lock:
            if save_index and self._unsaved:
                self.save_index()
            self._db.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- items ---------------------------------------------------------------------------------------------

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM items").fetchone()[0]

    def existing_hashes(self, hashes: Sequence[str]) -> set[str]:
        """The subset of `hashes` already stored (how a re-run ingest skips what it has done)."""
        found: set[str] = set()
        with self._lock:
            for start in range(0, len(hashes), 500):
                chunk = list(hashes[start : start + 500])
                marks = ", ".join("?" * len(chunk))
                found.update(r[0] for r in self._db.execute(f"SELECT content_hash FROM items WHERE content_hash IN ({marks})", chunk))
        return found

    def add(self, items: Sequence[NewItem]) -> list[int | None]:
        """Store items in one durable transaction; returns each item's id, or None for a duplicate hash.
        When this returns, the items are acknowledged: committed and fsynced."""
        rows = []
        for item in items:
            if item.kind not in ITEM_KINDS:
                raise CollectionError(f"item kind must be one of {', '.join(ITEM_KINDS)}, got {item.kind!r}")
            vector = np.asarray(item.embedding, dtype=np.float32).reshape(-1)
            if vector.shape[0] != self.manifest.embed_dim:
                raise CollectionError(
                    f"embedding has {vector.shape[0]} dimensions, collection {self.name!r} holds {self.manifest.embed_dim}"
                )
            vector = normalise(vector)[0].astype(self._dtype)
            rows.append((item.kind, item.source, item.text, item.content_hash, _metadata_json(item.metadata), vector.tobytes()))
        ids: list[int | None] = []
        now = time.time()
        with self._lock, _transaction(self._db):
            for row in rows:
                cur = self._db.execute(
                    "INSERT INTO items (kind, source, text, content_hash, metadata, embedding, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (content_hash) DO NOTHING",
                    (*row, now),
                )
                ids.append(cur.lastrowid if cur.rowcount == 1 else None)
            self._unsaved += sum(i is not None for i in ids)
        return ids

    def get(self, item_id: int, with_embedding: bool = False) -> Item | None:
        items = self.get_many([item_id], with_embedding)
        return items[0] if items else None

    def get_many(self, ids: Sequence[int], with_embedding: bool = False) -> list[Item]:
        """Items for the ids that exist, in the order of `ids`."""
        columns = "id, kind, source, text, content_hash, metadata, created" + (", embedding" if with_embedding else "")
        found: dict[int, Item] = {}
        with self._lock:
            for start in range(0, len(ids), 500):
                chunk = [int(i) for i in ids[start : start + 500]]
                marks = ", ".join("?" * len(chunk))
                for row in self._db.execute(f"SELECT {columns} FROM items WHERE id IN ({marks})", chunk):
                    found[row[0]] = self._item(row)
        return [found[int(i)] for i in ids if int(i) in found]

    def iter_items(self, batch_size: int = 1024, with_embedding: bool = True) -> Iterator[list[Item]]:
        """All items in id order, in batches (for export)."""
        columns = "id, kind, source, text, content_hash, metadata, created" + (", embedding" if with_embedding else "")
        last = 0
        while True:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT {columns} FROM items WHERE id > ? ORDER BY id LIMIT ?", (last, batch_size)
                ).fetchall()
            if not rows:
                return
            yield [self._item(r) for r in rows]
            last = rows[-1][0]

    def matching_ids(self, filter: Mapping[str, Any] | None) -> np.ndarray:
        where, params = compile_filter(filter)
        with self._lock:
            rows = self._db.execute(f"SELECT id FROM items WHERE {where}", params).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def delete(self, ids: Sequence[int] | None = None, filter: Mapping[str, Any] | None = None) -> int:
        """Delete items by id, by metadata filter, or those matching both; returns how many were deleted."""
        if ids is None and not filter:
            raise CollectionError("delete needs ids or a filter (refusing to delete everything)")
        where, params = compile_filter(filter)
        if ids is not None:
            ids = [int(i) for i in ids]
            if not ids:
                return 0
            where += f" AND id IN ({', '.join('?' * len(ids))})"
            params += ids
        with self._lock, _transaction(self._db):
            doomed = [r[0] for r in self._db.execute(f"SELECT id FROM items WHERE {where}", params)]
            self._db.executemany("INSERT INTO deletions (item_id) VALUES (?)", [(i,) for i in doomed])
            for start in range(0, len(doomed), 500):
                chunk = doomed[start : start + 500]
                self._db.execute(f"DELETE FROM items WHERE id IN ({', '.join('?' * len(chunk))})", chunk)
            self._unsaved += len(doomed)
        return len(doomed)

    def _item(self, row: tuple) -> Item:
        embedding = np.frombuffer(row[7], dtype=self._dtype).astype(np.float32) if len(row) > 7 else None
        return Item(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], embedding)

    def _vectors(self, where: str, params: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 vectors) of the matching items."""
        rows = self._db.execute(f"SELECT id, embedding FROM items WHERE {where} ORDER BY id", params).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vectors = np.empty((len(rows), self.manifest.embed_dim), dtype=np.float32)
        for i, r in enumerate(rows):
            vectors[i] = np.frombuffer(r[1], dtype=self._dtype)
        return ids, vectors

    # -- index ---------------------------------------------------------------------------------------------

    def _sqlite_marks(self) -> tuple[int, int]:
        """(items id high-water mark, deletion log high-water mark), from AUTOINCREMENT's bookkeeping."""
        seqs = dict(self._db.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
        return seqs.get("items", 0), seqs.get("deletions", 0)

    def _rebuild(self, reason: str) -> None:
        with _transaction(self._db, write=False):
            max_id, deletion_seq = self._sqlite_marks()
            ids, vectors = self._vectors("1", [])
        kind = faiss_index.choose_kind(len(ids), self.manifest.index)
        log.info("collection %s: building %s index over %d items (%s)", self.name, kind, len(ids), reason)
        index, state = faiss_index.build(kind, vectors, ids)
        self._index = index
        self._state = faiss_index.IndexState(**{**state.__dict__, "max_id": max_id, "deletion_seq": deletion_seq})
        self._unsaved += 1

    def _load_or_rebuild(self) -> None:
        try:
            self._index, self._state = faiss_index.load(self.index_path)
        except FileNotFoundError:
            self._rebuild("no index file")
        except faiss_index.IndexFileError as exc:
            self._rebuild(f"unusable index file: {exc}")
        else:
            if self._state.dim != self.manifest.embed_dim:
                self._rebuild("index width differs from the manifest")

    def sync_index(self) -> None:
        """Bring the in-memory index up to SQLite: load it, catch up on adds and deletes, or rebuild."""
        with self._lock:
            if self._index is None:
                self._load_or_rebuild()
            assert self._index is not None and self._state is not None
            state = self._state
            with _transaction(self._db, write=False):
                max_id, deletion_seq = self._sqlite_marks()
                if (max_id, deletion_seq) == (state.max_id, state.deletion_seq):
                    return
                if max_id < state.max_id or deletion_seq < state.deletion_seq:
                    stale = True  # the index is ahead of this database: it belongs to another one
                else:
                    stale = False
                    new_ids, new_vectors = self._vectors("id > ?", [state.max_id])
                    deleted = [r[0] for r in self._db.execute("SELECT item_id FROM deletions WHERE seq > ?", (state.deletion_seq,))]
                    count = self._db.execute("SELECT count(*) FROM items").fetchone()[0]
            if stale:
                self._rebuild("index is ahead of the database")
                return
            if len(new_ids):
                self._index.add_with_ids(new_vectors, new_ids)
            if deleted:
                self._index.remove_ids(np.asarray(deleted, dtype=np.int64))
            if self._index.ntotal != count:
                self._rebuild(f"index holds {self._index.ntotal} vectors after catching up, database {count}")
                return
            self._state = faiss_index.IndexState(
                **{**state.__dict__, "max_id": max_id, "deletion_seq": deletion_seq, "count": count}
            )
            self._unsaved += len(new_ids) + len(deleted)
            if faiss_index.outgrown(self._state, count, self.manifest.index):
                self._rebuild(f"{count} items outgrew the {state.kind} index")

    def save_index(self) -> None:
        """Bring the index up to date and write it (atomically) beside the database."""
        with self._lock:
            self.sync_index()
            assert self._index is not None and self._state is not None
            faiss_index.save(self.index_path, self._index, self._state)
            self._unsaved = 0

    def maybe_save_index(self) -> None:
        """Save when enough changed since the last save that catching up on the next open would be slow."""
        with self._lock:
            if self._unsaved >= min(SAVE_EVERY_CHANGES, max(1, int(SAVE_EVERY_FRACTION * self.count()))):
                self.save_index()

    def rebuild_index(self, kind: str | None = None) -> None:
        """Rebuild now, e.g. as `ivfpq` after a large import (the choice is remembered in the manifest)."""
        with self._lock:
            if kind is not None and kind != self.manifest.index:
                with _transaction(self._db):
                    self._db.execute("UPDATE manifest SET value = ? WHERE key = 'index'", (json.dumps(kind),))
                self.manifest = Manifest(**{**self.manifest.as_dict(), "index": kind})
            self._rebuild("requested")
            self.save_index()

    def index_state(self) -> faiss_index.IndexState:
        with self._lock:
            self.sync_index()
            assert self._state is not None
            return self._state

    def indexed_ids(self) -> np.ndarray:
        """Every id the FAISS index holds (to check it against SQLite)."""
        with self._lock:
            self.sync_index()
            assert self._index is not None
            id_map = faiss.vector_to_array(self._index.id_map)
            return np.sort(id_map)

    # -- search --------------------------------------------------------------------------------------------

    def search(
        self,
        vector: np.ndarray,
        top_k: int = 10,
        filter: Mapping[str, Any] | None = None,
        min_score: float | None = None,
    ) -> list[Hit]:
        """Nearest items by cosine similarity to `vector` (normalised here), best first."""
        if not isinstance(top_k, int) or top_k <= 0:
            raise CollectionError(f"top_k must be a positive integer, got {top_k!r}")
        query = normalise(vector)
        if query.shape != (1, self.manifest.embed_dim):
            raise CollectionError(f"query has shape {query.shape[1:]}, collection {self.name!r} holds {self.manifest.embed_dim}-d vectors")
        with self._lock:
            self.sync_index()
            assert self._index is not None and self._state is not None
            state = self._state
            if filter:
                where, params = compile_filter(filter)
                subset = self.matching_ids(filter)
                if len(subset) == 0:
                    return []
                if state.kind != "flat" and len(subset) <= EXACT_FILTER_MAX:
                    ids, vectors = self._vectors(where, params)
                    scores = vectors @ query[0]
                    order = np.argsort(-scores, kind="stable")[:top_k]
                    return self._hits(ids[order], scores[order], min_score)
                selector = faiss.IDSelectorBatch(subset)
            else:
                selector = None
            fetch = top_k * RERANK_FACTOR if faiss_index.needs_rerank(state.kind) else top_k
            scores, ids = self._index.search(query, fetch, params=faiss_index.search_params(state, selector))
            keep = ids[0] >= 0
            ids, scores = ids[0][keep], scores[0][keep]
            if faiss_index.needs_rerank(state.kind) and len(ids):
                marks = ", ".join("?" * len(ids))
                ids, vectors = self._vectors(f"id IN ({marks})", [int(i) for i in ids])
                scores = vectors @ query[0]
                order = np.argsort(-scores, kind="stable")[:top_k]
                ids, scores = ids[order], scores[order]
            return self._hits(ids, scores, min_score)

    def _hits(self, ids: np.ndarray, scores: np.ndarray, min_score: float | None) -> list[Hit]:
        if min_score is not None:
            keep = scores >= min_score
            ids, scores = ids[keep], scores[keep]
        items = {item.id: item for item in self.get_many([int(i) for i in ids])}
        return [Hit(items[int(i)], float(s)) for i, s in zip(ids, scores, strict=True) if int(i) in items]


def _metadata_json(metadata: Mapping[str, Any] | None) -> str:
    if metadata is None:
        return "{}"
    if not isinstance(metadata, Mapping):
        raise CollectionError(f"metadata must be a JSON object, got {type(metadata).__name__}")
    try:
        return json.dumps(dict(metadata), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CollectionError(f"metadata is not JSON-serialisable: {exc}") from None


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # see module doc: an acknowledged add is on disk
    return db


class _transaction:
    """BEGIN IMMEDIATE (writes) or BEGIN (a consistent read snapshot) ... COMMIT / ROLLBACK."""

    def __init__(self, db: sqlite3.Connection, write: bool = True) -> None:
        self.db = db
        self.begin = "BEGIN IMMEDIATE" if write else "BEGIN"

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute(self.begin)
        return self.db

    def __exit__(self, exc_type: type | None, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


class CollectionStore:
    """The collections under one root directory. Open collections are cached and shared (thread-safe)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self._open: dict[str, Collection] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _NAME.match(p.name) and (p / DB_FILE).is_file())

    def create(self, manifest: Manifest) -> Collection:
        """A new, empty collection. Built in a scratch directory and renamed into place, so a crash never
        leaves a half-created collection behind."""
        final = self.root / validate_name(manifest.name)
        if final.exists():
            raise CollectionExists(f"collection {manifest.name!r} already exists")
        self.root.mkdir(parents=True, exist_ok=True)
        scratch = self.root / f".{manifest.name}.creating-{os.getpid()}-{threading.get_ident()}"
        scratch.mkdir()
        try:
            db = _connect(scratch / DB_FILE)
            with _transaction(db):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                values = {**manifest.as_dict(), "created": manifest.created or time.time()}
                db.executemany("INSERT INTO manifest VALUES (?, ?)", [(k, json.dumps(v)) for k, v in values.items()])
            db.close()
            os.rename(scratch, final)
        except OSError as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            if final.exists():
                raise CollectionExists(f"collection {manifest.name!r} already exists") from None
            raise CollectionError(f"cannot create collection {manifest.name!r}: {exc}") from None
        return self.open(manifest.name)

    def open(self, name: str) -> Collection:
        validate_name(name)
        with self._lock:
            collection = self._open.get(name)
            if collection is None:
                collection = self._open[name] = Collection(self.root / name)
            return collection

    def drop(self, name: str) -> None:
        validate_name(name)
        directory = self.root / name
        if not (directory / DB_FILE).is_file():
            raise CollectionNotFound(f"collection {name!r} not found in {self.root}")
        with self._lock:
            collection = self._open.pop(name, None)
            if collection is not None:
                collection.close(save_index=False)
            # Rename first: the name disappears atomically even if the recursive delete is interrupted.
            trash = self.root / f".{name}.dropping-{os.getpid()}"
            os.rename(directory, trash)
            shutil.rmtree(trash)

    def close(self) -> None:
        with self._lock:
            for collection in self._open.values():
                collection.close()
            self._open.clear()


def default_root() -> Path:
    env = os.environ.get(ENV_ROOT)
    if env:
        return Path(env).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "clipserve" / "collections"
