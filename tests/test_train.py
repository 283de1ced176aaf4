"""Training end to end: the digits CLIP from scratch, checkpoints that load, probes, data specs, CLI errors."""

from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import clipserve
from clipserve.cli.main import main
from clipserve.engine.loading import resolve
from clipserve.train import digits
from clipserve.train.data import DataError, load_image, read_pairs
from clipserve.train.probe import LinearProbe


@pytest.mark.slow
def test_digits_clip_from_scratch_classifies_held_out_digits(tmp_path: Path) -> None:
    """Trains from scratch on every run (the cached copy other tests use is not consulted here)."""
    started = time.perf_counter()
    output = digits.train_digits_model(tmp_path / "digits")
    model = clipserve.load(str(output))
    metrics = digits.evaluate(model)
    elapsed = time.perf_counter() - started
    recorded = json.loads((output / digits.METRICS_FILE).read_text())
    ceiling = 5 / (digits.HELD_OUT / 10)  # ~36 held-out digits per class share each caption's meaning
    print(
        f"\ndigits CLIP: zero-shot accuracy {metrics['zeroshot_accuracy']:.3f}, text->image R@5 "
        f"{metrics['text_to_image_recall@5']:.3f} (class-level ceiling ~{ceiling:.2f}); trained in "
        f"{recorded['train_seconds']:.1f} s, {elapsed:.1f} s in all"
    )
    assert metrics["zeroshot_accuracy"] >= 0.85
    assert metrics["text_to_image_recall@5"] > 3 * 5 / digits.HELD_OUT  # well above random retrieval
    assert elapsed < 180
    assert recorded["zeroshot_accuracy"] == pytest.approx(metrics["zeroshot_accuracy"])


def test_digits_checkpoint_fixture_loads_and_serves_as_is(digits_checkpoint: Path, digits_model) -> None:
    assert (digits_checkpoint / "open_clip_config.json").is_file()
    held_out = digits.load_split("heldout")
    probs = digits_model.classify(held_out.images[:50], digits.CLASSNAMES, digits.TEMPLATES)
    accuracy = (probs.argmax(1) == torch.tensor(held_out.labels[:50])).float().mean().item()
    assert accuracy >= 0.6  # chance is 0.1
    assert digits_model.info.embed_dim == digits.MODEL_CFG["embed_dim"]


def _write_class_folders(root: Path, split: str, count: int) -> Path:
    data = digits.load_split(split)
    for i, (image, label) in enumerate(zip(data.images[:count], data.labels[:count], strict=True)):
        folder = root / digits.WORDS[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i}.png")
    return root


def test_probe_cli_round_trip(tmp_path: Path, digits_checkpoint: Path, digits_model, capsys) -> None:
    data = _write_class_folders(tmp_path / "train", "train", 300)
    code = main([
        "probe", "--model", str(digits_checkpoint), "--data", f"imagefolder:{data}", "--output",
        str(tmp_path / "probe"), "--val-proportion", "0",
    ])
    assert code == 0, capsys.readouterr().err
    probe = LinearProbe.load(tmp_path / "probe")
    assert probe.classes == tuple(sorted(digits.WORDS))
    held_out = digits.load_split("heldout")
    probs = probe.classify(digits_model, held_out.images)
    predicted = [probe.classes[i] for i in probs.argmax(1).tolist()]
    accuracy = sum(p == digits.WORDS[label] for p, label in zip(predicted, held_out.labels, strict=True)) / len(predicted)
    print(f"\nlinear probe on digits features: held-out accuracy {accuracy:.3f}")
    assert accuracy >= 0.85
    # Saving and loading keeps the probe exactly.
    probe.save(tmp_path / "again")
    assert torch.equal(LinearProbe.load(tmp_path / "again").weight, probe.weight)


def test_data_specs_read_pairs_from_every_layout(tmp_path: Path) -> None:
    image = Image.new("RGB", (12, 10), (200, 30, 30))
    image.save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square\n")
    (tmp_path / "pairs.csv").write_text("filepath,title\na.png,a red square\n")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a red square"}) + "\n")
    for i in range(2):
        with tarfile.open(tmp_path / f"shard-{i}.tar", "w") as tar:
            tar.add(tmp_path / "a.png", arcname=f"s{i}.png")
            tar.add(tmp_path / "a.txt", arcname=f"s{i}.txt")
    folder = tmp_path / "folder"
    folder.mkdir()
    image.save(folder / "a.png")
    (folder / "a.txt").write_text("a red square")
    for spec, count in [
        (f"csv:{tmp_path / 'pairs.csv'}", 1),
        (f"jsonl:{tmp_path / 'pairs.jsonl'}", 1),
        (f"folder:{folder}", 1),
        (f"wds:{tmp_path}/shard-{{0..1}}.tar", 2),
    ]:
        records = read_pairs(spec)
        assert len(records) == count, spec
        assert all(r.text == "a red square" for r in records)
        assert load_image(records[-1].image).size == (12, 10)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--arch", "ViT-B-32", "--data", "nosuchscheme:x"], "unknown data spec"),
        (["--arch", "ViT-B-32", "--data", "csv:/nonexistent.csv"], "no such data file"),
        (["--arch", "ViT-B-32", "--data", "csv:/nonexistent.csv", "--epochs", "0"], "epochs must be at least 1"),
    ],
)
def test_train_cli_errors_are_one_line_with_exit_2(tmp_path: Path, capsys, argv: list[str], expected: str) -> None:
    code = main(["train", *argv, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1, err


def test_train_cli_fine_tunes_a_checkpoint_and_output_loads(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        Image.new("RGB", (40, 40), (30 * i, 10, 200 - 20 * i)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a colour swatch number {i}")
    output = tmp_path / "out"
    code = main([
        "train", "--model", str(tiny_checkpoint), "--data", f"folder:{images}", "--output", str(output),
        "--batch-size", "4", "--epochs", "1", "--warmup", "1", "--workers", "0", "--no-progress", "--log-every", "1",
        "--freeze", "text",
    ])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert {"loss", "lr", "logit_scale", "samples_per_s"} <= records[0].keys()
    tuned_state, original_state = resolve(str(output)).state, resolve(str(tiny_checkpoint)).state
    assert torch.equal(tuned_state["text.text_projection"], original_state["text.text_projection"])  # frozen
    assert not torch.equal(tuned_state["visual.proj"], original_state["visual.proj"])  # trained
    # Running again into the same directory without --resume is refused in one line.
    code = main(["train", "--model", str(tiny_checkpoint), "--data", f"folder:{images}", "--output", str(output)])
    assert code == 2
    assert "--resume" in capsys.readouterr().err


def test_data_errors_name_the_culprit(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("image,label\na.png,cat\n")
    with pytest.raises(DataError, match="caption column"):
        read_pairs(f"csv:{tmp_path / 'bad.csv'}")
    Image.new("RGB", (4, 4)).save(tmp_path / "orphan.png")
    with pytest.raises(DataError, match="no caption file"):
        read_pairs(f"folder:{tmp_path}")


def test_locked_image_bf16_with_periodic_zero_shot_eval(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    """LiT (image tower locked but its projection), bf16 autocast, and zero-shot eval through the harness."""
    images, labelled = tmp_path / "images", tmp_path / "labelled"
    images.mkdir()
    colours = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220)}
    for i in range(12):
        name, rgb = list(colours.items())[i % 3]
        Image.new("RGB", (40, 40), rgb).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a {name} square")
        (labelled / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), rgb).save(labelled / name / f"{i}.png")
    output = tmp_path / "out"
    code = main([
        "train", "--model", str(tiny_checkpoint), "--data", f"folder:{images}", "--output", str(output),
        "--batch-size", "4", "--epochs", "2", "--warmup", "1", "--workers", "0", "--no-progress",
        "--lock-image", "--lock-image-unlocked-groups", "1", "--precision", "bf16",
        "--eval-data", f"imagefolder:{labelled}", "--eval-every", "1",
    ])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    evals = [r["eval"] for r in records if "eval" in r]
    assert len(evals) == 2 and all(0.0 <= e["acc1"] <= 1.0 for e in evals)
    tuned, original = resolve(str(output)).state, resolve(str(tiny_checkpoint)).state
    assert torch.equal(tuned["visual.conv1.weight"], original["visual.conv1.weight"])  # locked
    assert torch.equal(tuned["visual.transformer.resblocks.1.mlp.c_fc.weight"],
                       original["visual.transformer.resblocks.1.mlp.c_fc.weight"])
    assert not torch.equal(tuned["visual.proj"], original["visual.proj"])  # the unlocked last group
    assert not torch.equal(tuned["text.text_projection"], original["text.text_projection"])
