"""Training data: records from data specs, decoding with the runtime's preprocessing, augmentation, sharding.

Every source is indexed up front into a list of `Record`s (an image reference and a text), so that an epoch
is a seeded permutation of indices. That makes three things simple and exact:
- sharding: global batch b of an epoch is `perm[b*G:(b+1)*G]` and rank r takes its r-th slice, so ranks never
  overlap; the DataLoader hands whole batches to its workers, so workers never overlap either;
- resume: the data position is (epoch, batch index), nothing else;
- augmentation: each sample's random crop comes from a generator seeded by (seed, epoch, index), so it does not
  depend on which worker or rank decodes it.

Specs (`read_pairs`):
- `csv:FILE` (tab-separated when FILE ends in .tsv) and `jsonl:FILE`: columns `image` (or `filepath`, `file`,
  `path`) and `caption` (or `text`, `title`); image paths relative to FILE's folder.
- `folder:DIR` (or a bare directory): every image with a caption file beside it (`a.jpg` + `a.txt`).
- `wds:SHARDS` (or a bare `.tar` path): WebDataset tars, read with the stdlib; SHARDS is a tar file, a folder
  of tars, a glob, or a brace range (`shards-{000..009}.tar`). Members sharing a key form a sample: an image
  (`.jpg`, `.jpeg`, `.png`, `.webp`) and its `.txt` caption.

Labelled images (evaluation, linear probes) are read by the evaluation harness, `clipserve.eval.datasets`.
"""

from __future__ import annotations

import glob
import math
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipserve.config import PreprocessConfig
from clipserve.eval.datasets import DatasetError, TarMember, expand_braces, read_rows
from clipserve.io.images import ImageError, Preprocessor, open_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
IMAGE_COLUMNS = ("image", "filepath", "file", "path")
CAPTION_COLUMNS = ("caption", "text", "title")
SPEC_HELP = "csv:FILE, jsonl:FILE, folder:DIR or wds:SHARDS"


class DataError(ValueError):
    """A data spec or data file that cannot be used; the message is one line naming the culprit."""


ImageRef = str | TarMember | Image.Image


@dataclass(frozen=True)
class Record:
    image: ImageRef
    text: str | tuple[str, ...]  # the caption, or several: each epoch draws one (as COCO's five per image)


# ----------------------------------------------------------------------------------------------------------
# Specs


def _split_spec(spec: str) -> tuple[str, str]:
    scheme, sep, rest = spec.partition(":")
    if sep and scheme in ("csv", "jsonl", "folder", "wds"):
        return scheme, rest
    path = Path(spec)
    if path.is_dir():
        return "folder", spec
    if spec.endswith(".tar") or "{" in spec:
        return "wds", spec
    raise DataError(f"unknown data spec {spec!r}: use {SPEC_HELP}")


def read_pairs(spec: str) -> list[Record]:
    """Image-caption records of a data spec."""
    scheme, location = _split_spec(spec)
    if not location:
        raise DataError(f"data spec {spec!r} names no file or folder")
    if scheme == "csv":
        records = _read_table(Path(location), _rows(Path(location), "csv"))
    elif scheme == "jsonl":
        records = _read_table(Path(location), _rows(Path(location), "jsonl"))
    elif scheme == "folder":
        records = _read_caption_folder(Path(location))
    else:
        records = _read_tars(_expand_shards(location))
    if not records:
        raise DataError(f"data spec {spec!r} holds no usable samples")
    return records


def _rows(path: Path, kind: str) -> list[tuple[int, dict[str, str]]]:
    _check_file(path)
    try:
        return read_rows(path, kind)
    except DatasetError as exc:
        raise DataError(str(exc)) from None


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"no such data file: {path}")


def _pick(row: dict[str, str], names: tuple[str, ...]) -> str | None:
    return next((name for name in names if name in row), None)


def _read_table(path: Path, rows: list[tuple[int, dict[str, str]]]) -> list[Record]:
    records = []
    for line, row in rows:
        image_key, text_key = _pick(row, IMAGE_COLUMNS), _pick(row, CAPTION_COLUMNS)
        if image_key is None or text_key is None:
            raise DataError(
                f"{path}:{line}: needs an image column ({'/'.join(IMAGE_COLUMNS)}) and a "
                f"caption column ({'/'.join(CAPTION_COLUMNS)}); found {sorted(row)}"
            )
        image, text = row[image_key], row[text_key]
        if not isinstance(image, str) or not image or text is None or str(text) == "":
            raise DataError(f"{path}:{line}: empty {image_key!r} or {text_key!r}")
        records.append(Record(str(path.parent / image), str(text)))
    return records


def _read_caption_folder(directory: Path) -> list[Record]:
    if not directory.is_dir():
        raise DataError(f"no such data folder: {directory}")
    records = []
    for image in sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise DataError(f"{image}: no caption file {caption.name} beside it")
        records.append(Record(str(image), caption.read_text(encoding="utf-8").strip()))
    return records


def _expand_shards(location: str) -> list[Path]:
    if "{" in location:
        paths = [Path(name) for name in expand_braces(location)]
    elif Path(location).is_dir():
        paths = sorted(Path(location).glob("*.tar"))
    elif any(c in location for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(location))
    else:
        paths = [Path(location)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise DataError(f"WebDataset shards not found: {', '.join(missing) or location}")
    return paths


def _read_tars(paths: list[Path]) -> list[Record]:
    records = []
    for path in paths:
        images: dict[str, TarMember] = {}
        texts: dict[str, str] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    directory, _, base = member.name.rpartition("/")
                    stem, dot, extension = base.partition(".")  # WebDataset: the key ends at the first dot
                    if not dot:
                        continue
                    key = f"{directory}/{stem}"
                    if extension.lower() in WDS_IMAGE_EXTENSIONS:
                        images[key] = TarMember(str(path), member.name, member.offset_data, member.size)
                    elif extension == "txt":
                        texts[key] = tar.extractfile(member).read().decode("utf-8").strip()
        except (tarfile.TarError, OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read tar shard: {exc}") from None
        records.extend(Record(images[key], texts[key]) for key in sorted(images) if key in texts)
    return records


# ----------------------------------------------------------------------------------------------------------
# Decoding and augmentation


def load_image(ref: ImageRef) -> Image.Image:
    """Decode one record's image with the runtime's decoder (limits, EXIF orientation, one-line errors)."""
    if isinstance(ref, Image.Image):
        return ref
    try:
        return open_image(ref.read() if isinstance(ref, TarMember) else ref)
    except ImageError as exc:
        raise DataError(f"{ref}: {exc}") from None


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a crop as torchvision's RandomResizedCrop.get_params picks it (same algorithm)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return left, top, w, h
    # Fallback to a central crop with the aspect ratio clamped into range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class TrainTransform:
    """Random resized crop to the model's size, then the runtime's normalisation (open_clip's train transform,
    without color jitter). With scale (1, 1) and ratio (1, 1) on square images it equals the eval transform."""

    def __init__(
        self,
        cfg: PreprocessConfig,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        # The crop is resized to exactly size x size, so the Preprocessor only converts and normalises it.
        self.preprocessor = Preprocessor(cfg)
        self.size = cfg.size
        self.scale = scale
        self.ratio = ratio
        self.resample = Image.Resampling.BICUBIC if cfg.interpolation == "bicubic" else Image.Resampling.BILINEAR

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        left, top, w, h = random_resized_crop_box(image.width, image.height, self.scale, self.ratio, generator)
        crop = image.resize((self.size, self.size), self.resample, box=(left, top, left + w, top + h))
        return self.preprocessor(crop)


def derived_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (seed, epoch[, index])."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset keyed by (epoch, index): returns (pixels [3, S, S], text)."""

    def __init__(self, records: Sequence[Record], transform: TrainTransform, seed: int) -> None:
        self.records = records
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, str]:
        epoch, index = key
        record = self.records[index]
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, index))
        pixels = self.transform(load_image(record.image), generator)
        if isinstance(record.text, str):
            return pixels, record.text
        return pixels, record.text[int(torch.randint(len(record.text), (1,), generator=generator))]


def collate(items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([pixels for pixels, _ in items]), [text for _, text in items]


class ShardedBatchSampler(torch.utils.data.Sampler):
    """This rank's micro-batches of one epoch, from `start` on: lists of (epoch, index) keys.

    The epoch's permutation is seeded by (seed, epoch); global batch b is `perm[b*G:(b+1)*G]` with
    G = batch_size * world_size, and rank r takes `[r*batch_size:(r+1)*batch_size]` of it. The tail that does
    not fill a global batch is dropped, so every rank runs the same number of equal batches.
    """

    def __init__(
        self, size: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int, start: int, stop: int
    ) -> None:
        self.size = size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = epoch
        self.start = start
        self.stop = stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        global_batch = self.batch_size * self.world_size
        for b in range(self.start, self.stop):
            first = b * global_batch + self.rank * self.batch_size
            yield [(self.epoch, i) for i in order[first : first + self.batch_size]]
