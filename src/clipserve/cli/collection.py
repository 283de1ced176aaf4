"""`clipserve collection ...` and `clipserve embed-dataset`: retrieval collections from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipserve.cli.common import add_runtime_arguments, runtime_options
from clipserve.cli.main import CLIError

SHOWN_SKIPS = 20


def _json_arg(what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{what} is not valid JSON: {exc.msg} at column {exc.colno}") from None

    return parse


def _store(args: argparse.Namespace):
    from clipserve.collections import CollectionStore

    return CollectionStore(args.root)


def _load_model(source: str, args: argparse.Namespace):
    import clipserve

    return clipserve.load(source, **runtime_options(args))


def _print_report(report, extra_skipped=()) -> None:
    skipped = [*extra_skipped, *report.skipped]
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s.reason] = counts.get(s.reason, 0) + 1
    # by reason, not by first occurrence: the order items finish in varies from run to run
    summary = ", ".join(f"{counts[reason]} {reason}" for reason in sorted(counts))
    print(f"added {len(report.added)}, skipped {len(skipped)}" + (f" ({summary})" if summary else ""), file=sys.stderr)
    shown = [s for s in skipped if s.reason != "duplicate"]
    for s in shown[:SHOWN_SKIPS]:
        print(f"  skipped {s.source}: {s.reason}" + (f": {s.detail}" if s.detail else ""), file=sys.stderr)
    if len(shown) > SHOWN_SKIPS:
        print(f"  ... and {len(shown) - SHOWN_SKIPS} more", file=sys.stderr)


def cmd_create(args: argparse.Namespace) -> int:
    from clipserve.collections import manifest_for

    model = _load_model(args.model, args)
    collection = _store(args).create(manifest_for(args.name, model, args.model, dtype=args.dtype, index=args.index))
    print(f"created collection {collection.name!r} for {model.info.name} ({model.embed_dim}-d, {args.dtype}) "
          f"in {collection.directory}")  # fmt: skip
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store = _store(args)
    rows = []
    for name in store.names():
        collection = store.open(name)
        rows.append({**collection.manifest.as_dict(), "items": collection.count()})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['name']}\t{row['items']} items\t{row['model_name']} ({row['embed_dim']}-d, {row['dtype']})")
    return 0


def cmd_drop(args: argparse.Namespace) -> int:
    _store(args).drop(args.name)
    print(f"dropped collection {args.name!r}")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from clipserve.collections import Source, expand, ingest, url_fetcher
    from clipserve.io.fetch import FetchPolicy
    from clipserve.io.images import ImageLimits

    if args.metadata is not None and not isinstance(args.metadata, dict):
        raise CLIError("--metadata must be a JSON object")
    texts = list(args.text or [])
    if args.texts_file:
        texts += [line.strip() for line in Path(args.texts_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not args.inputs and not texts:
        raise CLIError("nothing to add: give files, folders, globs, URLs, --text or --texts-file")
    sources, not_found = expand(args.inputs, args.metadata)
    sources += [Source(text=t, metadata=args.metadata or {}) for t in texts]
    collection = _store(args).open(args.name)
    model = _load_model(collection.manifest.model_source, args)
    policy = FetchPolicy(enabled=True, allowed_hosts=tuple(args.allow_host or ["*"]), timeout_s=args.fetch_timeout)
    with tqdm(total=len(sources), unit="item", desc=f"adding to {args.name}", file=sys.stderr) as bar:
        report = ingest(
            collection, model, sources, batch_size=args.batch_size, fetch=url_fetcher(policy),
            limits=ImageLimits(max_bytes=args.max_image_bytes), on_batch=lambda n, _: bar.update(n),
        )  # fmt: skip
    collection.save_index()
    collection.close()
    _print_report(report, not_found)
    return 0


def _read_vector(text: str):
    import numpy as np

    value = np.load(text) if text.endswith(".npy") else json.loads(text)
    try:
        return np.asarray(value, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise CLIError("--vector must be a JSON list of numbers or a .npy file") from None


def cmd_search(args: argparse.Namespace) -> int:
    from clipserve.collections import query_vector

    collection = _store(args).open(args.name)
    if args.vector is not None:
        vector = _read_vector(args.vector)
    else:
        model = _load_model(collection.manifest.model_source, args)
        vector = query_vector(model, collection.manifest, text=args.text, image=args.image)
    hits = collection.search(vector, top_k=args.top_k, filter=args.filter, min_score=args.min_score)
    for hit in hits:
        if args.json:
            print(json.dumps({"score": hit.score, **hit.item.as_dict()}, ensure_ascii=False))
        else:
            what = hit.item.source if hit.item.kind != "text" else repr(hit.item.text)
            meta = f"\t{json.dumps(hit.item.metadata, ensure_ascii=False)}" if hit.item.metadata else ""
            print(f"{hit.score:.4f}\t{hit.item.id}\t{hit.item.kind}\t{what}{meta}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    if not args.id and not args.filter:
        raise CLIError("give --id and/or --filter (deleting everything is `collection drop`)")
    collection = _store(args).open(args.name)
    deleted = collection.delete(ids=args.id or None, filter=args.filter)
    collection.close()
    print(f"deleted {deleted} item(s)")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    item = _store(args).open(args.name).get(args.id, with_embedding=args.embedding)
    if item is None:
        raise CLIError(f"no item {args.id} in collection {args.name!r}", code=1)
    print(json.dumps(item.as_dict(), ensure_ascii=False, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from clipserve.collections.parquet import export_parquet

    rows = export_parquet(_store(args).open(args.name), args.output)
    print(f"exported {rows} items to {args.output}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from clipserve.collections import CollectionNotFound, Manifest
    from clipserve.collections.parquet import import_parquet, model_of, parquet_files

    files = parquet_files(args.inputs)
    store = _store(args)
    try:
        collection = store.open(args.name)
    except CollectionNotFound:
        model = model_of(files)
        if model is None and args.model is None:
            raise CLIError("these files do not say which model embedded them: pass --model") from None
        model = model or {}
        collection = store.create(Manifest(
            name=args.name, model_source=args.model or str(model["source"]), model_name=str(model.get("name", args.model)),
            embed_dim=int(model.get("embed_dim") or _embed_dim(files)), dtype=args.dtype, index=args.index,
        ))  # fmt: skip
    report = import_parquet(collection, files)
    print(f"building the {collection.index_state().kind} index over {collection.count()} items", file=sys.stderr)
    collection.save_index()
    collection.close()
    _print_report(report)
    return 0


def _embed_dim(files: list[Path]) -> int:
    import pyarrow.parquet as pq

    field = pq.read_schema(files[0]).field("embedding")
    size = getattr(field.type, "list_size", None)
    if not size or size < 0:
        raise CLIError(f"{files[0]}: cannot tell the embedding width; pass --model")
    return size


def cmd_embed_dataset(args: argparse.Namespace) -> int:
    from clipserve.collections.distributed import EmbedJob, run_embed_job

    job = EmbedJob(
        inputs=tuple(args.inputs), model_source=args.model, output=args.output, input_format=args.format,
        column=args.column, batch_size=args.batch_size, concurrency=args.concurrency, threads=args.threads,
        address=args.address, allow_hosts=tuple(args.allow_host or ["*"]), load_options=runtime_options(args),
    )  # fmt: skip
    result = run_embed_job(job)
    print(f"embedded {result.embedded} items into {len(result.shards)} shard(s) in {args.output}"
          f" ({result.failed} unreadable, recorded with their error)", file=sys.stderr)  # fmt: skip
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from clipserve.collections.index import INDEX_KINDS
    from clipserve.collections.store import DTYPES, ENV_ROOT

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=None, help=f"collections directory (default: ${ENV_ROOT} or ~/.local/share/clipserve/collections)")
    parser = subparsers.add_parser("collection", help="durable, searchable image and text collections")
    commands = parser.add_subparsers(dest="collection_command", metavar="ACTION", required=True)

    p = commands.add_parser("create", parents=[common], help="create an empty collection for a model")
    p.add_argument("name")
    p.add_argument("--model", required=True, help="pretrained name, hf-hub:ORG/REPO or checkpoint directory")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="how embeddings are stored")
    p.add_argument("--index", default="auto", choices=("auto", *INDEX_KINDS), help="FAISS index kind (auto: by size)")
    add_runtime_arguments(p)
    p.set_defaults(func=cmd_create)

    p = commands.add_parser("list", parents=[common], help="list collections")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = commands.add_parser("drop", parents=[common], help="delete a collection and everything in it")
    p.add_argument("name")
    p.set_defaults(func=cmd_drop)

    p = commands.add_parser("add", parents=[common], help="add images (files, folders, globs, URLs) and texts")
    p.add_argument("name")
    p.add_argument("inputs", nargs="*", help="image files, folders (recursive), globs or http(s) URLs")
    p.add_argument("--text", action="append", help="a text item (repeatable)")
    p.add_argument("--texts-file", help="a file with one text item per line")
    p.add_argument("--metadata", type=_json_arg("--metadata"), help="JSON object stored with every item added")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-image-bytes", type=int, default=50 * 2**20)
    p.add_argument("--allow-host", action="append", help="hosts URLs may be fetched from (default: any public host)")
    p.add_argument("--fetch-timeout", type=float, default=10.0, help="seconds per URL")
    add_runtime_arguments(p)
    p.set_defaults(func=cmd_add)

    p = commands.add_parser("search", parents=[common], help="search by text, image or raw vector")
    p.add_argument("name")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text")
    query.add_argument("--image", help="an image file")
    query.add_argument("--vector", help="a JSON list of numbers or a .npy file")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--filter", type=_json_arg("--filter"), help='metadata filter, e.g. \'{"year": {"$gte": 2020}}\'')
    p.add_argument("--min-score", type=float, help="drop results with a lower cosine similarity")
    p.add_argument("--json", action="store_true", help="one JSON object per result")
    add_runtime_arguments(p)
    p.set_defaults(func=cmd_search)

    p = commands.add_parser("delete", parents=[common], help="delete items by id and/or metadata filter")
    p.add_argument("name")
    p.add_argument("--id", type=int, action="append")
    p.add_argument("--filter", type=_json_arg("--filter"))
    p.set_defaults(func=cmd_delete)

    p = commands.add_parser("get", parents=[common], help="show one item")
    p.add_argument("name")
    p.add_argument("id", type=int)
    p.add_argument("--embedding", action="store_true", help="include the stored embedding")
    p.set_defaults(func=cmd_get)

    p = commands.add_parser("export", parents=[common], help="write id, source, metadata, embedding to Parquet")
    p.add_argument("name")
    p.add_argument("output")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("import", parents=[common], help="build or extend a collection from Parquet shards")
    p.add_argument("name")
    p.add_argument("inputs", nargs="+", help="Parquet files or directories of shards")
    p.add_argument("--model", help="model source, when the shards do not record it")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--index", default="auto", choices=("auto", *INDEX_KINDS))
    p.set_defaults(func=cmd_import)

    p = subparsers.add_parser("embed-dataset", help="batch-embed an image dataset on Ray into Parquet shards")
    p.add_argument("inputs", nargs="+", help="image folders, WebDataset .tar files, or Parquet files of paths/URLs")
    p.add_argument("--model", required=True)
    p.add_argument("--output", required=True, help="directory for the Parquet shards")
    p.add_argument("--format", default="auto", choices=("auto", "folder", "webdataset", "parquet"))
    p.add_argument("--column", default=None, help="Parquet input: column holding paths or URLs (default: path or url)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=1, help="model actors")
    p.add_argument("--threads", type=int, default=1, help="torch threads per actor")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray instance)")
    p.add_argument("--allow-host", action="append", help="hosts URLs may be fetched from (default: any public host)")
    add_runtime_arguments(p)
    p.set_defaults(func=cmd_embed_dataset)
