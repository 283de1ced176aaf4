"""The evaluation harness end to end on real, offline data, and against CLIP_benchmark as an oracle.

Data: scikit-learn's 1,797 handwritten digits (8x8, upscaled to 32 px PNGs) as image folders and as a
CLIP_benchmark-style WebDataset with train/test splits, and real photos bundled with scikit-image, captioned by
hand, as JSONL, CSV, COCO-Karpathy, Flickr30k-Karpathy and WebDataset retrieval sets. Every run goes through
the CLI (`clipserve.cli.main.main`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipserve.cli.main import main

torch.set_num_threads(1)

# Hand-written captions for photos bundled in scikit-image 0.26 (no download).
PHOTOS: dict[str, list[str]] = {
    "astronaut": ["a portrait of an astronaut in a spacesuit", "a smiling woman astronaut in front of a flag"],
    "chelsea": ["a photo of a tabby cat", "an orange cat looking to the side"],
    "coffee": ["a cup of coffee on a saucer", "a red coffee cup seen from above", "espresso in a cup"],
    "rocket": ["a rocket on the launch pad", "a space shuttle ready for launch"],
    "camera": ["a man with a camera on a tripod", "a black and white photo of a cameraman"],
    "coins": ["old coins on a dark background", "a grayscale photo of many coins"],
    "horse": ["the black silhouette of a horse"],
    "moon": ["the cratered surface of the moon", "a grayscale photo of the moon"],
    "hubble_deep_field": ["many galaxies in deep space", "the hubble deep field"],
    "retina": ["a photograph of a human retina", "the blood vessels at the back of an eye"],
    "page": ["a scanned page of printed text"],
    "immunohistochemistry": ["a microscope image of stained tissue", "cells stained brown and blue"],
}
DIGIT_TEMPLATES = ['a photo of the number: "{c}".', "a handwritten digit {c}."]
N_TRAIN_DIGITS = 1200


def _png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _tar(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    # 0..16 gray levels -> 0..255, each pixel a 4x4 block: 32 px, the tiny model's input size.
    images = (data.images * (255 / 16)).round().astype(np.uint8).repeat(4, axis=1).repeat(4, axis=2)
    return images, data.target


@pytest.fixture(scope="module")
def digits_folders(tmp_path_factory: pytest.TempPathFactory, digits) -> Path:
    """all/, train/ and test/ image folders, one sub-directory per digit."""
    images, targets = digits
    root = tmp_path_factory.mktemp("digits")
    for i, (image, target) in enumerate(zip(images, targets, strict=True)):
        _png(image, root / "all" / str(target) / f"{i:04d}.png")
        _png(image, root / ("train" if i < N_TRAIN_DIGITS else "test") / str(target) / f"{i:04d}.png")
    (root / "templates.txt").write_text("\n".join(DIGIT_TEMPLATES) + "\n")
    return root


@pytest.fixture(scope="module")
def digits_wds(tmp_path_factory: pytest.TempPathFactory, digits) -> Path:
    """CLIP_benchmark's wds layout: train split in two shards, test split in one, plus metadata files."""
    images, targets = digits
    root = tmp_path_factory.mktemp("digits-wds")
    # Samples in image-folder order (by class, then index), so both layouts give the same sequence.
    train = sorted(range(N_TRAIN_DIGITS), key=lambda i: (targets[i], i))
    test = sorted(range(N_TRAIN_DIGITS, len(images)), key=lambda i: (targets[i], i))
    splits = {"train": [train[:600], train[600:]], "test": [test]}
    for split, shards in splits.items():
        for n, indices in enumerate(shards):
            members = {}
            for i in indices:
                members[f"s{i:04d}.png"] = _png_bytes(images[i])
                members[f"s{i:04d}.cls"] = str(int(targets[i])).encode()
            _tar(root / split / f"{n}.tar", members)
        (root / split / "nshards.txt").write_text(str(len(shards)))
    (root / "classnames.txt").write_text("\n".join(str(d) for d in range(10)) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(DIGIT_TEMPLATES) + "\n")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The photos as PNGs under val2014/ (COCO's folder) and flickr30k-images/, with every caption file."""
    import skimage.data

    root = tmp_path_factory.mktemp("photos")
    coco, flickr, jsonl, rows, members = [], [], [], [], {}
    for name, captions in PHOTOS.items():
        image = getattr(skimage.data, name)()
        image = (image * 255).astype(np.uint8) if image.dtype == bool else image
        _png(image, root / "val2014" / f"{name}.png")
        _png(image, root / "flickr30k-images" / f"{name}.png")
        sentences = [{"raw": caption} for caption in captions]
        coco.append({"filepath": "val2014", "filename": f"{name}.png", "split": "test", "sentences": sentences})
        flickr.append({"filename": f"{name}.png", "split": "test", "sentences": sentences})
        jsonl.append({"image": f"val2014/{name}.png", "captions": captions})
        rows += [{"filepath": f"val2014/{name}.png", "title": caption} for caption in captions]
        members[f"{name}.png"] = (root / "val2014" / f"{name}.png").read_bytes()
        members[f"{name}.txt"] = "\n".join(captions).encode()
    # A training-split entry the test split must ignore.
    coco.append({"filepath": "val2014", "filename": "astronaut.png", "split": "train", "sentences": [{"raw": "x"}]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": coco}))
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": flickr}))
    (root / "photos.jsonl").write_text("".join(json.dumps(row) + "\n" for row in jsonl))
    with open(root / "photos.tsv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["filepath", "title"], delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    _tar(root / "wds" / "test" / "0.tar", members)
    (root / "wds" / "test" / "nshards.txt").write_text("1")
    (root / "wds" / "dataset_type.txt").write_text("retrieval\n")
    return root


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_eval(capsys, tmp_path: Path, model: Path, task: str, dataset: str, *extra: str) -> tuple[dict, str]:
    output = tmp_path / f"{task}.json"
    code, out, err = run_cli(
        capsys, "eval", "--model", str(model), "--task", task, "--dataset", dataset, "--output", str(output),
        "--quiet", *extra,
    )
    assert code == 0, err
    text = output.read_text()
    result = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))
    assert list(result) == ["dataset", "model", "pretrained", "task", "metrics", "language"]
    assert result["task"] == task and result["dataset"] == dataset
    assert result["pretrained"] == str(model)
    for name, value in result["metrics"].items():
        assert math.isfinite(value), name
        assert name in out  # the terminal table lists every metric
    return result, out


def assert_rate(value: float, n: int) -> None:
    """A recall or accuracy: in [0, 1] and a whole number of hits out of n."""
    assert 0.0 <= value <= 1.0
    assert abs(value * n - round(value * n)) < 1e-9


# -- zero-shot classification ------------------------------------------------------------------------------


def test_zeroshot_classification_on_digits_folder(capsys, tmp_path, tiny_checkpoint, digits_folders):
    result, out = run_eval(
        capsys, tmp_path, tiny_checkpoint, "zeroshot_classification", f"imagefolder:{digits_folders / 'all'}",
        "--templates", str(digits_folders / "templates.txt"),
    )
    metrics = result["metrics"]
    assert set(metrics) == {"acc1", "acc5", "mean_per_class_recall"}
    assert_rate(metrics["acc1"], 1797)
    assert_rate(metrics["acc5"], 1797)
    assert metrics["acc5"] >= metrics["acc1"]
    assert 0.0 <= metrics["mean_per_class_recall"] <= 1.0
    assert "zeroshot_classification on imagefolder:" in out


def test_fewer_than_five_classes_has_no_acc5(capsys, tmp_path, tiny_checkpoint, digits_folders):
    three = tmp_path / "three"
    for digit in "012":
        for src in sorted((digits_folders / "all" / digit).iterdir())[:5]:
            _png(np.asarray(Image.open(src)), three / f"digit {digit}" / src.name)
    result, _ = run_eval(capsys, tmp_path, tiny_checkpoint, "zeroshot_classification", f"imagefolder:{three}")
    assert set(result["metrics"]) == {"acc1", "mean_per_class_recall"}  # absent, not NaN
    assert_rate(result["metrics"]["acc1"], 15)


def test_zeroshot_classification_on_wds_uses_its_templates(capsys, tmp_path, tiny_checkpoint, digits_wds):
    result, _ = run_eval(capsys, tmp_path, tiny_checkpoint, "zeroshot_classification", f"wds:{digits_wds}")
    assert_rate(result["metrics"]["acc1"], 1797 - N_TRAIN_DIGITS)

    from clipserve import load
    from clipserve.eval.datasets import load_dataset
    from clipserve.eval.runner import EvalConfig, zero_shot_prompts

    dataset = load_dataset(f"wds:{digits_wds}")
    assert len(dataset.images) == 1797 - N_TRAIN_DIGITS
    assert zero_shot_prompts(dataset, EvalConfig(f"wds:{digits_wds}", "zeroshot_classification")) == (
        [str(d) for d in range(10)], DIGIT_TEMPLATES
    )
    # The same test split given as a shard pattern reads the same samples and metadata.
    pattern = load_dataset(f"wds:{digits_wds}/test/{{0..0}}.tar")
    assert pattern.labels == dataset.labels and pattern.templates == DIGIT_TEMPLATES
    assert load(str(tiny_checkpoint)).preprocessor.batch([dataset.images[0].read()]).shape == (1, 3, 32, 32)


# -- zero-shot retrieval -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    ["jsonl:{root}/photos.jsonl", "csv:{root}/photos.tsv", "coco:{root}", "flickr30k:{root}", "wds:{root}/wds"],
)
def test_zeroshot_retrieval_on_photos(capsys, tmp_path, tiny_checkpoint, photos, spec):
    result, _ = run_eval(capsys, tmp_path, tiny_checkpoint, "zeroshot_retrieval", spec.format(root=photos))
    metrics = result["metrics"]
    n_images, n_captions = len(PHOTOS), sum(len(c) for c in PHOTOS.values())
    assert list(metrics) == [f"{kind}_retrieval_recall@{k}" for k in (1, 5, 10) for kind in ("image", "text")]
    for k in (1, 5, 10):
        assert_rate(metrics[f"image_retrieval_recall@{k}"], n_captions)
        assert_rate(metrics[f"text_retrieval_recall@{k}"], n_images)
    assert metrics["image_retrieval_recall@1"] <= metrics["image_retrieval_recall@5"] <= metrics["image_retrieval_recall@10"]


def test_every_layout_reads_the_same_photos_and_captions(photos):
    from clipserve.eval.datasets import TarMember, load_dataset

    expected = list(PHOTOS.values())
    for spec in ("jsonl:{root}/photos.jsonl", "csv:{root}/photos.tsv", "coco:{root}", "flickr30k:{root}", "wds:{root}/wds"):
        dataset = load_dataset(spec.format(root=photos))
        assert dataset.captions == expected, spec
        first = dataset.images[0]
        data = first.read() if isinstance(first, TarMember) else Path(first).read_bytes()
        assert data == (photos / "val2014" / "astronaut.png").read_bytes(), spec


# -- linear probe ------------------------------------------------------------------------------------------


def test_linear_probe_on_digits_beats_chance(capsys, tmp_path, tiny_checkpoint, digits_wds, digits_folders):
    # wds has train/test splits; the image folders need --train-dataset. Both are the same images.
    result, _ = run_eval(capsys, tmp_path, tiny_checkpoint, "linear_probe", f"wds:{digits_wds}")
    metrics = result["metrics"]
    assert set(metrics) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "weight_decay", "epochs", "seed"}
    from clipserve.eval.linear_probe import WEIGHT_DECAYS

    assert metrics["weight_decay"] in WEIGHT_DECAYS
    assert_rate(metrics["lp_acc1"], 1797 - N_TRAIN_DIGITS)
    # Ten balanced classes: chance is 0.1. The random tiny ViT is a random non-linear projection of the
    # pixels that keeps enough of them for a linear probe to do several times better (0.41 with this seed;
    # a fully converged scikit-learn logistic regression on the same features reaches 0.3-0.6 depending on C).
    assert metrics["lp_acc1"] > 0.3
    assert metrics["lp_mean_per_class_recall"] > 0.3
    assert metrics["lp_acc5"] > metrics["lp_acc1"]

    folders, _ = run_eval(
        capsys, tmp_path, tiny_checkpoint, "linear_probe", f"imagefolder:{digits_folders / 'test'}",
        "--train-dataset", f"imagefolder:{digits_folders / 'train'}",
    )
    assert folders["metrics"] == pytest.approx(metrics, abs=1e-6)  # same features, same seed: same probe


def test_linear_probe_without_validation_uses_no_weight_decay():
    from clipserve.eval.linear_probe import ProbeSettings, linear_probe

    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=gen)
    labels = torch.arange(200) % 4
    features = torch.nn.functional.normalize(centers[labels] + 0.3 * torch.randn(200, 16, generator=gen), dim=-1)
    metrics = linear_probe(features[:150], labels[:150], features[150:], labels[150:], 4,
                           ProbeSettings(val_proportion=0.0), progress=False)
    assert metrics["weight_decay"] == 0.0
    assert "lp_acc5" not in metrics  # fewer than 5 classes
    assert metrics["lp_acc1"] > 0.9  # well-separated clusters


# -- compare and errors ------------------------------------------------------------------------------------


def test_compare_prints_results_side_by_side(capsys, tmp_path):
    a = {"dataset": "wds/imagenet1k", "model": "ViT-B-32", "pretrained": "a", "task": "zeroshot_classification",
         "metrics": {"acc1": 0.6917, "acc5": 0.9, "mean_per_class_recall": 0.69}, "language": "en"}
    # CLIP_benchmark's own output: NaN acc5 (not strict JSON) must be read and shown as absent.
    b_text = ('{"dataset": "dummy", "model": "toy", "pretrained": "none", "task": "zeroshot_classification", '
              '"metrics": {"acc1": 0.25, "acc5": NaN, "mean_per_class_recall": 0.5}, "language": "en"}')
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(b_text)
    code, out, err = run_cli(capsys, "eval", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert code == 0, err
    lines = out.splitlines()
    assert str(tmp_path / "a.json") in lines[0] and str(tmp_path / "b.json") in lines[0]
    row = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert row["acc1"] == ["0.6917", "0.2500"]
    assert row["acc5"] == ["0.9000", "-"]
    assert row["model"] == ["ViT-B-32", "toy"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "zeroshot_classification", "--dataset", "nosuchkind:/x"], "unknown dataset spec 'nosuchkind:/x'"),
        (["--task", "zeroshot_classification", "--dataset", "imagefolder:/no/such/dir"], "/no/such/dir does not exist"),
        (["--task", "captioning", "--dataset", "imagefolder:/x"], "task: unknown 'captioning'"),
        (["--dataset", "imagefolder:/x"], "--task"),
        (["--task", "zeroshot_classification", "--dataset", "wds/imagenet1k"], "clip-benchmark/wds_imagenet1k"),
        (["--task", "zeroshot_retrieval", "--dataset", "imagefolder:{digits}/all"], "has labels, not captions"),
        (["--task", "zeroshot_retrieval", "--dataset", "coco:{photos}", "--recall-k", "50"], "exceeds the 12 images"),
        (["--task", "linear_probe", "--dataset", "imagefolder:{digits}/test"], "--train-dataset"),
        (["--task", "linear_probe", "--dataset", "wds:{wds}/test/0.tar"], "--train-dataset"),  # no splits in a pattern
        (["--task", "zeroshot_classification", "--dataset", "imagefolder:{digits}/all", "--templates", "/no/t.txt"],
         "/no/t.txt: templates file not found"),
        (["--task", "zeroshot_classification", "--dataset", "imagefolder:{digits}/all", "--language", "xx"],
         "language 'xx'"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(
    capsys, tiny_checkpoint, digits_folders, digits_wds, photos, argv, message
):
    argv = [a.format(digits=digits_folders, wds=digits_wds, photos=photos) for a in argv]
    code, out, err = run_cli(capsys, "eval", "--model", str(tiny_checkpoint), "--quiet", *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("clipserve eval: error: "), err
    assert message in err


def test_compare_rejects_a_file_that_is_not_a_result(capsys, tmp_path):
    (tmp_path / "x.json").write_text('{"acc1": 1}')
    code, _, err = run_cli(capsys, "eval", "compare", str(tmp_path / "x.json"))
    assert code == 2 and err.count("\n") == 1
    assert "not an evaluation result, missing dataset" in err


# -- packaged prompts --------------------------------------------------------------------------------------


def test_packaged_imagenet_prompts():
    from clipserve.eval.prompts import LANGUAGES, imagenet_classnames, imagenet_templates

    assert len(imagenet_templates("en")) == 80 and imagenet_templates("en")[0] == "a bad photo of a {c}."
    assert imagenet_classnames("en")[:2] == ["tench", "goldfish"]
    assert (len(imagenet_templates("it")), len(imagenet_templates("jp"))) == (49, 37)
    assert imagenet_classnames("it")[0] == "una tinca" and imagenet_classnames("jp")[1] == "金魚"
    for language in LANGUAGES:
        assert len(imagenet_classnames(language)) == 1000
        assert all("{c}" in t for t in imagenet_templates(language))


def test_imagenet_layout_uses_packaged_names_in_the_requested_language(tmp_path, digits):
    from clipserve.eval.datasets import load_dataset
    from clipserve.eval.prompts import imagenet_classnames, imagenet_templates
    from clipserve.eval.runner import EvalConfig, zero_shot_prompts

    images, _ = digits
    synsets = [f"n{i:08d}" for i in range(1000)]
    for i, synset in enumerate(synsets[:3]):
        _png(images[i], tmp_path / "val" / synset / f"ILSVRC2012_val_{i:08d}.JPEG.png")
    for synset in synsets[3:]:
        (tmp_path / "val" / synset).mkdir(parents=True)
    dataset = load_dataset(f"imagenet:{tmp_path}")
    assert dataset.is_imagenet and dataset.labels == [0, 1, 2] and len(dataset.images) == 3
    names, templates = zero_shot_prompts(dataset, EvalConfig(f"imagenet:{tmp_path}", "zeroshot_classification", "it"))
    assert names == imagenet_classnames("it") and templates == imagenet_templates("it")


# -- oracle: CLIP_benchmark 1.6.2's own metric code on open_clip's own model ----------------------------------


@pytest.fixture(scope="module")
def oracle_model(tmp_path_factory: pytest.TempPathFactory):
    """A random tiny open_clip CLIP, and the same weights written in open_clip's layout for clipserve."""
    from checkpoint_factory import open_clip_model, write_open_clip_dir
    from conftest import TINY_CONFIG

    model = open_clip_model(TINY_CONFIG, seed=1)
    return model, write_open_clip_dir(tmp_path_factory.mktemp("oracle") / "tiny-open-clip", model, TINY_CONFIG)


def _accuracy_for_numpy_2_4(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """CLIP_benchmark's `accuracy` with `.item()` in place of `float(<1-element ndarray>)`, which numpy >= 2.4
    rejects (LAION-AI/CLIP_benchmark#147). Same arithmetic otherwise; the product's numpy is not downgraded."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).item()) / len(target) for k in topk]


def _open_clip_parts():
    from oracles import open_clip

    oc = open_clip()
    transform = oc.image_transform(32, is_train=False, mean=oc.OPENAI_DATASET_MEAN, std=oc.OPENAI_DATASET_STD)
    return transform, oc.tokenize


def test_zeroshot_classification_equals_clip_benchmark(monkeypatch, capsys, tmp_path, oracle_model, digits_folders):
    from clip_benchmark.metrics import zeroshot_classification

    transform, tokenize = _open_clip_parts()
    from torchvision.datasets import ImageFolder  # CLIP_benchmark's `imagenet1k-unverified` loader

    monkeypatch.setattr(zeroshot_classification, "accuracy", _accuracy_for_numpy_2_4)
    folder = digits_folders / "test"
    dataset = ImageFolder(str(folder), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=False)
    model, checkpoint = oracle_model
    expected = zeroshot_classification.evaluate(
        model, loader, tokenize, dataset.classes, DIGIT_TEMPLATES, "cpu", amp=False
    )

    result, _ = run_eval(
        capsys, tmp_path, checkpoint, "zeroshot_classification", f"imagefolder:{folder}",
        "--templates", str(digits_folders / "templates.txt"),
    )
    assert set(result["metrics"]) == set(expected)
    assert result["metrics"] == pytest.approx(expected, abs=1e-6, rel=0)


def test_zeroshot_retrieval_equals_clip_benchmark(capsys, tmp_path, oracle_model, photos):
    from clip_benchmark.metrics import zeroshot_retrieval

    from clipserve.eval.datasets import load_dataset

    transform, tokenize = _open_clip_parts()
    coco = load_dataset(f"coco:{photos}")
    samples = [
        (transform(Image.open(path).convert("RGB")), captions)  # as torchvision's CocoCaptions loads them
        for path, captions in zip(coco.images, coco.captions, strict=True)
    ]
    loader = torch.utils.data.DataLoader(
        samples, batch_size=5, shuffle=False,  # several batches, and batched recall in CLIP_benchmark
        collate_fn=lambda batch: (torch.stack([image for image, _ in batch]), [captions for _, captions in batch]),
    )
    model, checkpoint = oracle_model
    expected = zeroshot_retrieval.evaluate(model, loader, tokenize, "cpu", amp=False, recall_k_list=[1, 5, 10])

    result, _ = run_eval(capsys, tmp_path, checkpoint, "zeroshot_retrieval", f"coco:{photos}", "--batch-size", "5")
    assert set(result["metrics"]) == set(expected)
    assert result["metrics"] == pytest.approx(expected, abs=1e-6, rel=0)


# -- metric and layout details -----------------------------------------------------------------------------


def test_retrieval_recall_counts_captions_and_images_as_clip_benchmark_does():
    from clipserve.eval.metrics import retrieval_metrics

    # Image 0 has captions 0 and 1, image 1 has caption 2; captions 1 and 2 each lean towards the other image.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    metrics = retrieval_metrics(images, texts, torch.tensor([0, 0, 1]), ks=(1, 2))
    assert metrics["image_retrieval_recall@1"] == pytest.approx(1 / 3)  # one query per caption: only caption 0
    assert metrics["image_retrieval_recall@2"] == 1.0
    # Image 0 ranks its caption 0 first (hit); image 1 ranks caption 1 (image 0's) first, its own second.
    assert metrics["text_retrieval_recall@1"] == 0.5
    assert metrics["text_retrieval_recall@2"] == 1.0


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_mean_per_class_recall_is_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score

    from clipserve.eval.metrics import classification_metrics

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 7, generator=gen)
    targets = torch.randint(0, 6, (300,), generator=gen)  # class 6 never occurs: excluded, as sklearn does
    metrics = classification_metrics(logits, targets, num_classes=7)
    assert metrics["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(targets, logits.argmax(1)), abs=1e-12)
    assert metrics["acc1"] == pytest.approx(float((logits.argmax(1) == targets).double().mean()), abs=1e-12)


def test_shard_patterns_expand_like_webdataset():
    from clipserve.eval.datasets import expand_braces

    assert expand_braces("a/{000..002}.tar") == ["a/000.tar", "a/001.tar", "a/002.tar"]
    assert expand_braces("{train,test}/{0..1}.tar") == ["train/0.tar", "train/1.tar", "test/0.tar", "test/1.tar"]


def test_table_files_with_labels(tmp_path, digits_folders):
    from clipserve.eval.datasets import DatasetError, load_dataset

    zero = sorted((digits_folders / "all" / "0").iterdir())[0]
    one = sorted((digits_folders / "all" / "1").iterdir())[0]
    (tmp_path / "named.jsonl").write_text(
        json.dumps({"image": str(zero), "label": "zero"}) + "\n" + json.dumps({"image": str(one), "label": "one"}) + "\n"
    )
    named = load_dataset(f"jsonl:{tmp_path / 'named.jsonl'}")
    assert named.classnames == ["one", "zero"] and named.labels == [1, 0]  # sorted names, as image folders
    (tmp_path / "indexed.csv").write_text(f"image,label\n{zero},0\n{one},1\n")
    with pytest.raises(DatasetError, match="integer labels need --classnames"):
        load_dataset(f"csv:{tmp_path / 'indexed.csv'}")
    indexed = load_dataset(f"csv:{tmp_path / 'indexed.csv'}", classnames=["zero", "one"])
    assert indexed.labels == [0, 1] and indexed.images == [str(zero), str(one)]


def test_reduced_precision_runs_through_the_same_engine(capsys, tmp_path, tiny_checkpoint, photos):
    fp32, _ = run_eval(capsys, tmp_path, tiny_checkpoint, "zeroshot_retrieval", f"coco:{photos}")
    bf16, _ = run_eval(capsys, tmp_path, tiny_checkpoint, "zeroshot_retrieval", f"coco:{photos}", "--precision", "bf16")
    assert set(bf16["metrics"]) == set(fp32["metrics"])
    # bf16 moves scores by ~1e-2: rankings, and so recalls, stay close to fp32's.
    for name, value in fp32["metrics"].items():
        assert abs(bf16["metrics"][name] - value) <= 0.25, name


def test_a_corrupt_image_is_named_in_one_line(capsys, tmp_path, tiny_checkpoint, digits_folders):
    for digit in "01":
        src = sorted((digits_folders / "all" / digit).iterdir())[0]
        _png(np.asarray(Image.open(src)), tmp_path / "set" / digit / src.name)
    (tmp_path / "set" / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, _, err = run_cli(capsys, "eval", "--model", str(tiny_checkpoint), "--quiet", "--task",
                           "zeroshot_classification", "--dataset", f"imagefolder:{tmp_path / 'set'}")
    assert code == 2 and err.count("\n") == 1
    assert f"{tmp_path / 'set' / '1' / 'broken.png'}: " in err
