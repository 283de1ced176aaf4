"""Evaluation datasets from local files, named by a spec string (`imagefolder:PATH`, `coco:PATH`, ...).

Every loader returns lists of image references (file paths, or members of a tar read on demand) with labels
or captions; nothing is decoded here, so even ImageNet's 50,000 images index in seconds. Decoding and
preprocessing happen batch by batch in `clipserve.eval.runner`, through the model's own preprocessor.

Layouts follow the conventions the published numbers were computed on:

* ImageNet-1k val: one folder per class named by its synset id (`n01440764/...`), the layout of
  torchvision's `ImageNet` and of `imagenet1k-unverified` in CLIP_benchmark. Class order = sorted synset ids,
  which is the order of the packaged class names.
* COCO and Flickr30k: Karpathy's split files (`dataset_coco.json`, `dataset_flickr30k.json`), the 5k / 1k
  test images with all their captions (about 25k / 5k), as CLIP_benchmark's `mscoco_captions` / `flickr30k`.
* WebDataset: CLIP_benchmark's `wds_*` layout (`ROOT/{split}/nshards.txt`, `ROOT/{split}/{0..n-1}.tar`,
  `ROOT/classnames.txt`, `ROOT/zeroshot_classification_templates.txt`, `ROOT/dataset_type.txt`), samples keyed
  WebDataset-style with `webp`/`png`/`jpg`/`jpeg` images and `cls` (class index) or `txt` (captions, one per
  line). Tars are read with the standard library.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipserve.eval import prompts

SPEC_KINDS: tuple[str, ...] = ("imagefolder", "csv", "jsonl", "wds", "imagenet", "coco", "flickr30k")
SPEC_HELP = (
    "imagefolder:PATH, csv:FILE, jsonl:FILE, wds:DIR_OR_PATTERN, wds/NAME (Hugging Face clip-benchmark/wds_NAME), "
    "imagenet:PATH, coco:PATH, flickr30k:PATH"
)
# torchvision's ImageFolder extensions.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"})
# WebDataset image keys, in CLIP_benchmark's order of preference.
WDS_IMAGE_KEYS: tuple[str, ...] = ("webp", "png", "jpg", "jpeg")
WDS_HUB_ORG = "clip-benchmark"
_SYNSET = re.compile(r"n\d{8}")
_IMAGE_COLUMNS = ("image", "filepath", "path", "file", "filename")
_LABEL_COLUMNS = ("label", "class", "target")
_CAPTION_COLUMNS = ("captions", "caption", "title", "text")


class DatasetError(ValueError):
    """A dataset spec or layout that cannot be used; the message names the spec or file and what is wrong."""


@dataclass(frozen=True)
class TarMember:
    """An image stored in a tar file, read on demand by offset (no archive kept open)."""

    tar_path: str
    name: str
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{self.tar_path}:{self.name}"

    def read(self) -> bytes:
        with open(self.tar_path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


ImageRef = str | TarMember


def read_image_source(ref: ImageRef) -> str | bytes:
    """What `Preprocessor.batch` accepts for one reference: a path, or the bytes of a tar member."""
    return ref.read() if isinstance(ref, TarMember) else ref


@dataclass
class ClassificationSet:
    """Images with integer labels indexing `classnames`.

    `templates` are the dataset's own prompts (WebDataset sets ship them), None when it has none.
    `is_imagenet` marks ImageNet-1k (1000 classes in synset order), whose class names and templates exist
    in several languages.
    """

    spec: str
    images: list[ImageRef]
    labels: list[int]
    classnames: list[str]
    templates: list[str] | None = None
    is_imagenet: bool = False


@dataclass
class RetrievalSet:
    """Images, each with one or more captions."""

    spec: str
    images: list[ImageRef]
    captions: list[list[str]]


EvalSet = ClassificationSet | RetrievalSet


# -- spec parsing ----------------------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, str]:
    """`KIND:PATH` or `wds/NAME` -> (kind, argument)."""
    if spec.startswith("wds/"):
        name = spec[len("wds/"):]
        if not name:
            raise DatasetError(f"dataset spec {spec!r}: missing the name after wds/")
        return "wds-hub", name
    kind, sep, argument = spec.partition(":")
    if not sep or kind not in SPEC_KINDS:
        raise DatasetError(f"unknown dataset spec {spec!r}; expected one of {SPEC_HELP}")
    if not argument:
        raise DatasetError(f"dataset spec {spec!r}: missing the path after {kind}:")
    return kind, argument


def has_splits(spec: str) -> bool:
    """Whether the spec's layout holds named splits (`train`, `test`, ...), so one spec serves a linear probe.
    A wds shard pattern names its shards exactly, so only a wds root directory has splits."""
    kind, argument = parse_spec(spec)
    if kind == "wds":
        return Path(argument).expanduser().is_dir()
    return kind in ("wds-hub", "imagenet", "coco", "flickr30k")


def load_dataset(spec: str, split: str = "test", classnames: list[str] | None = None) -> EvalSet:
    """The dataset a spec names. `split` applies to layouts with splits (see `has_splits`);
    `classnames` overrides the names the layout provides (in class-index order)."""
    kind, argument = parse_spec(spec)
    if kind == "imagefolder":
        return _image_folder(spec, _existing(spec, argument, directory=True), classnames)
    if kind in ("csv", "jsonl"):
        path = _existing(spec, argument, directory=False)
        return _table(spec, path, [row for _, row in read_rows(path, kind)], classnames)
    if kind == "imagenet":
        return _imagenet(spec, _existing(spec, argument, directory=True), split, classnames)
    if kind == "coco":
        return _karpathy(spec, _existing(spec, argument, directory=None), "dataset_coco.json", split)
    if kind == "flickr30k":
        return _karpathy(spec, _existing(spec, argument, directory=None), "dataset_flickr30k.json", split)
    if kind == "wds":
        return _webdataset(spec, argument, split, classnames)
    return _webdataset(spec, str(_fetch_wds_from_hub(argument, split)), split, classnames)


def _existing(spec: str, argument: str, directory: bool | None) -> Path:
    path = Path(argument).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset {spec!r}: {path} does not exist")
    if directory is True and not path.is_dir():
        raise DatasetError(f"dataset {spec!r}: {path} is not a directory")
    if directory is False and not path.is_file():
        raise DatasetError(f"dataset {spec!r}: {path} is not a file")
    return path


def _class_index(spec: str, names: list[str], classnames: list[str] | None) -> list[str]:
    """Class names for labels found in the data (`names`, in index order), possibly overridden by the user."""
    if classnames is None:
        return names
    if len(classnames) != len(names):
        raise DatasetError(f"dataset {spec!r} has {len(names)} classes but the class-names file lists {len(classnames)}")
    return classnames


# -- image folders and ImageNet ----------------------------------------------------------------------------


def _image_files(directory: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs.sort()
        found.extend(os.path.join(root, f) for f in sorted(files) if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return found


def _folder_samples(spec: str, directory: Path) -> tuple[list[str], list[str], list[int]]:
    """torchvision `ImageFolder`: classes = sorted sub-directory names; (class folders, images, labels)."""
    folders = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    if not folders:
        raise DatasetError(f"dataset {spec!r}: {directory} has no class sub-directories")
    images: list[str] = []
    labels: list[int] = []
    for index, folder in enumerate(folders):
        files = _image_files(directory / folder)
        images += files
        labels += [index] * len(files)
    if not images:
        raise DatasetError(f"dataset {spec!r}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {directory}")
    return folders, images, labels


def _image_folder(spec: str, directory: Path, classnames: list[str] | None) -> ClassificationSet:
    folders, images, labels = _folder_samples(spec, directory)
    return ClassificationSet(spec, images, labels, _class_index(spec, folders, classnames))


def _imagenet(spec: str, root: Path, split: str, classnames: list[str] | None) -> ClassificationSet:
    # ImageNet's test labels are not public: CLIP_benchmark's "test" split is the 50k validation set.
    split_dir = root / ("val" if split == "test" else split)
    if split_dir.is_dir():
        directory = split_dir
    elif split == "test" and any(_SYNSET.fullmatch(e.name) for e in os.scandir(root) if e.is_dir()):
        directory = root
    else:
        raise DatasetError(f"dataset {spec!r}: no {split_dir.name}/ directory of synset folders under {root}")
    folders, images, labels = _folder_samples(spec, directory)
    if len(folders) != 1000 or not all(_SYNSET.fullmatch(f) for f in folders):
        raise DatasetError(
            f"dataset {spec!r}: {directory} must hold the 1000 ImageNet-1k synset folders (n01440764, ...), "
            f"found {len(folders)} folders"
        )
    names = _class_index(spec, prompts.imagenet_classnames("en"), classnames)
    return ClassificationSet(spec, images, labels, names, is_imagenet=True)


# -- CSV / JSONL -------------------------------------------------------------------------------------------


def read_rows(path: Path, kind: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of a CSV/TSV file (header on line 1; tabs when the file ends in .tsv or its header
    has them) or of a JSONL file (`kind` "jsonl"). Errors name the file and the line."""
    if kind == "csv":
        with open(path, newline="", encoding="utf-8") as f:
            head = f.read(4096)
            f.seek(0)
            delimiter = "\t" if path.suffix.lower() == ".tsv" or ("\t" in head.split("\n", 1)[0]) else ","
            return list(enumerate(csv.DictReader(f, delimiter=delimiter), start=2))
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{number}: each line must be a JSON object")
            rows.append((number, row))
    return rows


def _column(rows: list[dict[str, Any]], candidates: tuple[str, ...]) -> str | None:
    present = set(rows[0]) if rows else set()
    return next((c for c in candidates if c in present), None)


def _table(spec: str, path: Path, rows: list[dict[str, Any]], classnames: list[str] | None) -> EvalSet:
    """Rows with an image path (relative to the file) and either a label or one or more captions.

    Captions may be a list (JSONL) or repeated rows for the same image (one caption per row, as COCO-style
    CSVs are written); rows for one image are merged in order of first appearance.
    """
    if not rows:
        raise DatasetError(f"{path}: no rows")
    image_key = _column(rows, _IMAGE_COLUMNS)
    label_key = _column(rows, _LABEL_COLUMNS)
    caption_key = _column(rows, _CAPTION_COLUMNS)
    if image_key is None:
        raise DatasetError(f"{path}: needs an image column ({', '.join(_IMAGE_COLUMNS)})")
    if (label_key is None) == (caption_key is None):
        raise DatasetError(
            f"{path}: needs exactly one of a label column ({', '.join(_LABEL_COLUMNS)}) "
            f"or a caption column ({', '.join(_CAPTION_COLUMNS)})"
        )
    images = []
    for number, row in enumerate(rows, 1):
        value = row.get(image_key)
        if not isinstance(value, str) or not value:
            raise DatasetError(f"{path}: row {number}: empty {image_key!r}")
        images.append(str((path.parent / value).resolve()) if not os.path.isabs(value) else value)
    if caption_key is not None:
        return _caption_table(spec, path, images, [row.get(caption_key) for row in rows], caption_key)
    return _label_table(spec, path, images, [row.get(label_key) for row in rows], label_key, classnames)


def _caption_table(spec: str, path: Path, images: list[str], values: list[Any], key: str) -> RetrievalSet:
    merged: dict[str, list[str]] = {}
    for number, (image, value) in enumerate(zip(images, values, strict=True), 1):
        captions = value if isinstance(value, list) else [value]
        if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            raise DatasetError(f"{path}: row {number}: {key!r} must be a non-empty string or list of strings")
        merged.setdefault(image, []).extend(captions)
    return RetrievalSet(spec, list(merged), list(merged.values()))


def _label_table(
    spec: str, path: Path, images: list[str], values: list[Any], key: str, classnames: list[str] | None
) -> ClassificationSet:
    as_text = [str(v).strip() if v is not None else "" for v in values]
    if any(not v for v in as_text):
        raise DatasetError(f"{path}: row {as_text.index('') + 1}: empty {key!r}")
    if all(re.fullmatch(r"\d+", v) for v in as_text):
        if classnames is None:
            raise DatasetError(f"{path}: integer labels need --classnames FILE (one name per class index)")
        labels = [int(v) for v in as_text]
        bad = next((v for v in labels if v >= len(classnames)), None)
        if bad is not None:
            raise DatasetError(f"{path}: label {bad} is out of range for {len(classnames)} class names")
        return ClassificationSet(spec, images, labels, classnames)
    names = classnames or sorted(set(as_text))
    index = {name: i for i, name in enumerate(names)}
    unknown = next((v for v in as_text if v not in index), None)
    if unknown is not None:
        raise DatasetError(f"{path}: label {unknown!r} is not in the class-names file")
    return ClassificationSet(spec, images, [index[v] for v in as_text], names)


# -- Karpathy splits (COCO, Flickr30k) ----------------------------------------------------------------------


def _karpathy(spec: str, path: Path, filename: str, split: str) -> RetrievalSet:
    annotation = path if path.is_file() else path / filename
    if not annotation.is_file():
        raise DatasetError(f"dataset {spec!r}: no {filename} in {path}")
    try:
        entries = json.loads(annotation.read_text(encoding="utf-8"))["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DatasetError(f"{annotation}: not a Karpathy split file ({type(exc).__name__}: {exc})") from None
    root = annotation.parent
    # Flickr30k images usually sit in flickr30k-images/; COCO entries carry their folder (val2014/).
    bases = [root, root / "flickr30k-images", root / "images", root / "Images"]
    images: list[str] = []
    captions: list[list[str]] = []
    for entry in entries:
        if entry.get("split") != split:
            continue
        relative = os.path.join(entry.get("filepath", ""), entry["filename"])
        found = next((base / relative for base in bases if (base / relative).is_file()), None)
        if found is None:
            raise DatasetError(f"dataset {spec!r}: image {relative} not found under {root}")
        images.append(str(found))
        captions.append([sentence["raw"].strip() for sentence in entry["sentences"]])
    if not images:
        raise DatasetError(f"{annotation}: no images in split {split!r}")
    return RetrievalSet(spec, images, captions)


# -- WebDataset --------------------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard notation: `{0..9}` (zero padding kept, as in `{000..099}`) and `{a,b}`."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end():], match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def _shards(spec: str, argument: str, split: str) -> tuple[list[Path], Path]:
    """(tar files, metadata directory) for a wds root directory or a shard pattern."""
    path = Path(argument).expanduser()
    if path.is_dir():
        split_dir = path / split
        nshards = split_dir / "nshards.txt"
        if nshards.is_file():
            count = int(nshards.read_text().strip())
            return [split_dir / f"{i}.tar" for i in range(count)], path
        directory = split_dir if split_dir.is_dir() else path
        tars = sorted(directory.glob("*.tar"))
        if not tars:
            raise DatasetError(f"dataset {spec!r}: no {split}/nshards.txt and no .tar files in {directory}")
        return tars, path
    tars = sorted({Path(p) for expanded in expand_braces(argument) for p in glob.glob(os.path.expanduser(expanded))})
    if not tars:
        raise DatasetError(f"dataset {spec!r}: no tar files match {argument}")
    # Shards usually sit in ROOT/{split}/ with the metadata files in ROOT.
    parent = tars[0].parent
    has_metadata = (parent / "classnames.txt").exists() or (parent / "dataset_type.txt").exists()
    return tars, parent if has_metadata or parent.parent == parent else parent.parent


def _tar_samples(path: Path) -> Iterable[dict[str, Any]]:
    """Samples of one tar, WebDataset-style: files grouped by key = path up to the first dot of the name."""
    sample: dict[str, Any] = {}
    current = None
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, _, name = member.name.rpartition("/")
            stem, dot, extension = name.partition(".")
            if not dot:
                continue
            key = f"{directory}/{stem}" if directory else stem
            if key != current:
                if sample:
                    yield sample
                sample, current = {"__key__": key}, key
            extension = extension.lower()
            if extension in WDS_IMAGE_KEYS:
                sample[extension] = TarMember(str(path), member.name, member.offset_data, member.size)
            elif extension in ("cls", "txt"):
                sample[extension] = tar.extractfile(member).read().decode("utf-8")
    if sample:
        yield sample


def _webdataset(spec: str, argument: str, split: str, classnames: list[str] | None) -> EvalSet:
    tars, metadata = _shards(spec, argument, split)
    type_file = metadata / "dataset_type.txt"
    dataset_type = type_file.read_text().strip().lower() if type_file.is_file() else None
    images: list[ImageRef] = []
    labels: list[int] = []
    captions: list[list[str]] = []
    for tar_path in tars:
        if not tar_path.is_file():
            raise DatasetError(f"dataset {spec!r}: shard {tar_path} is missing")
        try:
            samples = list(_tar_samples(tar_path))
        except (tarfile.TarError, OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"dataset {spec!r}: cannot read {tar_path}: {exc}") from None
        for sample in samples:
            image = next((sample[k] for k in WDS_IMAGE_KEYS if k in sample), None)
            if image is None:
                continue
            if dataset_type == "retrieval" or (dataset_type is None and "txt" in sample and "cls" not in sample):
                if "txt" not in sample:
                    raise DatasetError(f"{tar_path}: sample {sample['__key__']} has no .txt captions")
                images.append(image)
                captions.append([line for line in sample["txt"].splitlines() if line.strip()])
            else:
                if "cls" not in sample:
                    raise DatasetError(f"{tar_path}: sample {sample['__key__']} has no .cls label")
                images.append(image)
                labels.append(int(sample["cls"].strip()))
    if not images:
        raise DatasetError(f"dataset {spec!r}: no samples with a {'/'.join(WDS_IMAGE_KEYS)} image in {len(tars)} tar(s)")
    if captions:
        return RetrievalSet(spec, images, captions)
    names = classnames or _metadata_lines(metadata / "classnames.txt")
    if names is None:
        raise DatasetError(f"dataset {spec!r}: no classnames.txt in {metadata}; pass --classnames FILE")
    if max(labels) >= len(names):
        raise DatasetError(f"dataset {spec!r}: label {max(labels)} is out of range for {len(names)} class names")
    templates = _metadata_lines(metadata / "zeroshot_classification_templates.txt")
    is_imagenet = names == prompts.imagenet_classnames("en")
    return ClassificationSet(spec, images, labels, names, templates, is_imagenet)


def _metadata_lines(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _fetch_wds_from_hub(name: str, split: str) -> Path:
    """Download CLIP_benchmark's `clip-benchmark/wds_<name>` dataset repository (one split) into the HF cache."""
    from clipserve.io.hub import HubError

    repo_id = f"{WDS_HUB_ORG}/wds_{name.replace('/', '-')}"
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise HubError(f"huggingface_hub is required to download {repo_id}: {exc}") from None
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=[f"{split}/*", "*.txt"]))
    except LocalEntryNotFoundError:
        raise HubError(
            f"cannot get dataset {repo_id}: offline (HF_HUB_OFFLINE) or the Hub is unreachable, "
            "and it is not in the Hugging Face cache"
        ) from None
    except RepositoryNotFoundError:
        raise HubError(f"no Hub dataset {repo_id}") from None
    except OSError as exc:
        raise HubError(f"cannot get dataset {repo_id}: {exc}") from None


__all__ = [
    "ClassificationSet",
    "DatasetError",
    "EvalSet",
    "ImageRef",
    "RetrievalSet",
    "TarMember",
    "expand_braces",
    "has_splits",
    "load_dataset",
    "parse_spec",
    "read_image_source",
]
