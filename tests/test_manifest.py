"""Your own data: a CSV or JSON-lines manifest, any number of tasks, image-only data sets."""
import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch
from PIL import Image

import demo
from benchmark_accuracy import write_manifest, write_manifest_folds

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--EPOCHS", "2", "--FREEZE_EPOCHS", "1", "--HEAD_EPOCHS", "20", "--PRUNE_FINETUNE_EPOCHS", "1",
         "--SPEED_REPEATS", "1", "--CALIBRATION_IMAGES", "32", "--IMAGE_SIZE", "32", "--BACKBONE_WEIGHTS", "None",
         "--DEVICE", "cpu"]


@pytest.fixture(scope="module")
def demo_data(lvm, tmp_path_factory):
    """The demo data set in the MedPix 2.0 layout, the same as a CSV manifest (with a third task, region: upper for
    head and thorax, else lower), and the demo's tiny teachers."""
    root = tmp_path_factory.mktemp("data")
    demo.make_demo_data(root / "medpix", 7, dict(train=90, dev=30, test=30))
    demo.make_demo_teachers(root / "clip", root / "bert", 7)
    manifest = write_manifest(root / "medpix", root / "manifest", ("train", "dev", "test"))
    for split in ("train", "dev", "test"):
        with open(manifest / f"{split}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            row["region"] = "upper" if row["location"] in ("Head", "Thorax") else "lower"
        with open(manifest / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return root


def train(lvm, root: Path, workdir: Path, *args: str) -> dict:
    return lvm.main([*SMALL, "--CACHE_DIR", str(root / "cache"), "--LOG_DIR", str(workdir / "logs"),
                     "--RESULTS_DIR", str(workdir / "results"), "--VISION_TEACHER", str(root / "clip"), *args])


def test_the_demo_as_a_manifest_trains_exactly_as_its_medpix_layout(lvm, demo_data, tmp_path):
    runs = {}
    for layout in ("medpix", "manifest"):  # case texts are a MedPix-only extra: off in both
        runs[layout] = train(lvm, demo_data, tmp_path / layout, "--DATA_ROOT", str(demo_data / layout),
                             "--TEXT_TEACHER", str(demo_data / "bert"), "--CASE_TEXT_LOSS", "0")
    different = lambda key: key in ("seconds", "speed")  # timings
    assert {k: v for k, v in runs["medpix"].items() if not different(k)} == \
           {k: v for k, v in runs["manifest"].items() if not different(k)}
    assert runs["manifest"]["student"]["dev"]["modality_acc"] > 0.5  # it learned something: the check is not vacuous
    saved = [torch.load(tmp_path / layout / "results" / "lightweight_vlm.pth", weights_only=True) for layout in runs]
    assert saved[0].keys() == saved[1].keys()
    assert all(torch.equal(a, b) for a, b in zip(saved[0]["state_dict"].values(), saved[1]["state_dict"].values()))
    assert {k: v for k, v in saved[0].items() if k != "state_dict"} == {k: v for k, v in saved[1].items()
                                                                         if k != "state_dict"}


def test_three_tasks_image_only_train_and_predict_without_a_tokenizer(lvm, demo_data, tmp_path):
    metrics = train(lvm, demo_data, tmp_path, "--DATA_ROOT", str(demo_data / "manifest"), "--TEXT_COLUMNS", "()",
                    "--TASKS", "('modality', 'location', 'region')", "--KD_ALPHA", "(0, 0.5, 0.5)")
    assert set(metrics["student"]["dev"]) == {f"{t}_{k}" for t in ("modality", "location", "region") for k in ("acc", "f1")}
    with open(demo_data / "manifest" / "dev.csv", newline="") as f:  # the third task's labels are its column's
        assert metrics["labels"]["dev"]["region"] == dict(sorted(Counter(r["region"] for r in csv.DictReader(f)).items()))
    header = (tmp_path / "logs" / "training_log.csv").read_text().splitlines()[0].split(",")
    assert [c for c in header if c.startswith("val_")] == ["val_modality_acc", "val_location_acc", "val_region_acc"]
    assert (tmp_path / "results" / "confusion_region.png").is_file()
    assert (tmp_path / "logs" / "confusion_region_epoch_2.csv").is_file()
    assert set(metrics["calibration"]["student_onnx_int8"]) == {"modality", "location", "region"}
    model = onnx.load(str(tmp_path / "results" / "lightweight_vlm_int8.onnx"))
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["modality", "location", "region"]
    student, meta = lvm.load_student(tmp_path / "results" / "lightweight_vlm.pth")
    assert not student.reads_text and meta["tokenizer_json"] is None and meta["tokenizer"] is None
    assert metrics["max_tokens"] is None and "CPU, 1 thread, images only: batch 1" in (tmp_path / "results" / "report.md").read_text()
    assert not any("lstm" in k or "embedding" in k for k in student.state_dict())

    image = demo_data / "medpix" / "images" / "DEMOdev0000_synpic0.png"
    command = [sys.executable, str(ROOT / "predict.py"), "--model", str(tmp_path / "results" / "lightweight_vlm_int8.onnx"),
               "--image", str(image)]
    # tokenizers cannot be imported: the image-only file answers without it
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "no-tokenizers"))
    (tmp_path / "no-tokenizers" / "tokenizers").mkdir(parents=True)
    (tmp_path / "no-tokenizers" / "tokenizers" / "__init__.py").write_text("raise ImportError('no tokenizers here')")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)
    assert {row["modality"], row["location"], row["region"]} <= {"CT", "MR", *demo.LOCATIONS, "upper", "lower"}
    assert not row["with_text"]
    done = subprocess.run(command + ["--text", "axial ct of the brain"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"predict.py: error: {tmp_path / 'results' / 'lightweight_vlm_int8.onnx'} was trained on images alone (no text "
        "columns): drop --text and --tokenizer"]


def write_table(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_a_manifest_reads_paths_texts_and_labels_and_names_what_is_wrong(lvm, tmp_path, capsys):
    (tmp_path / "pictures").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "pictures" / "a.png")
    cfg = lvm.parse_config(["--TASKS", "('kind', 'site')", "--TEXT_COLUMNS", "('note', 'extra')", "--KD_ALPHA", "(0, 0)"])
    row = lambda **values: dict(image="pictures/a.png", note="first note", extra="", kind="x", site="s", group="p1") | values
    write_table(tmp_path / "train.csv", [row(), row(image=str(tmp_path / "pictures" / "a.png"), extra=" more ", kind="y"),
                                         row(site=""), row(image="")])
    write_table(tmp_path / "dev.jsonl", [row(kind=1), row(kind="y", note=None)])
    skipped = Counter()
    train = lvm.load_split(tmp_path, "train", cfg, skipped)
    assert [(s["image"], s["text"], s["kind"], s["site"], s["group"]) for s in train] == [
        (str(tmp_path / "pictures" / "a.png"), "first note", "x", "s", "p1"),
        (str(tmp_path / "pictures" / "a.png"), "first note more", "y", "s", "p1")]
    assert skipped == Counter({"row without an image or a label": 2})
    assert capsys.readouterr().out.splitlines() == [f"skipped: {tmp_path / 'train.csv'}:4: no site",
                                                     f"skipped: {tmp_path / 'train.csv'}:5: no image"]
    dev = lvm.load_split(tmp_path, "dev", cfg, skipped)
    assert [(s["kind"], s["text"]) for s in dev] == [("1", "first note"), ("y", "")]
    with pytest.raises(SystemExit, match=r"split 'dev' has kind label\(s\) \['1'\] that the train split never has"):
        lvm.encode_labels(dev, "kind", lvm.label_names(train, "kind"), "dev")
    assert "warning: kind class(es) ['x', 'y'] have one train image each" in capsys.readouterr().err

    with pytest.raises(SystemExit, match=rf"{tmp_path / 'train.csv'}: no column 'site' \(its columns: extra, group, "
                                         r"image, kind, note\)"):
        write_table(tmp_path / "train.csv", [{k: v for k, v in row().items() if k != "site"}])
        lvm.load_split(tmp_path, "train", cfg, Counter())
    write_table(tmp_path / "train.jsonl", [row()])
    with pytest.raises(SystemExit, match="train.csv and .*train.jsonl both exist: keep one"):
        lvm.data_layout(tmp_path)
    (tmp_path / "train.csv").unlink()
    (tmp_path / "dev.jsonl").unlink()
    with pytest.raises(SystemExit, match=rf"{tmp_path / 'dev.csv'} is missing: a manifest needs train and dev"):
        lvm.data_layout(tmp_path)
    (tmp_path / "train.jsonl").unlink()
    with pytest.raises(SystemExit, match=rf"no data at {tmp_path}: neither a manifest .* nor MedPix 2.0"):
        lvm.data_layout(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--TASKS", "('modality', 'error')", "--KD_ALPHA", "(0, 0)"], "--TASKS must be a tuple of distinct label column"),
    (["--TASKS", "('modality', 'location', 'plane')"], "--KD_ALPHA must be a tuple of 3 weights in [0, 1], one per task"),
    (["--TASKS", "('a/b',)", "--KD_ALPHA", "(0,)"], "--TASKS must be a tuple of distinct label column names"),
    (["--TASKS", "('caption',)", "--KD_ALPHA", "(0,)"], "--TASKS must be a tuple of distinct label column names"),
    (["--TEXT_COLUMNS", "('image',)"], "--TEXT_COLUMNS must be a tuple of distinct column names"),
])
def test_tasks_and_text_columns_are_checked_before_any_work(lvm, capsys, args, message):
    with pytest.raises(SystemExit):
        lvm.parse_config(args)
    assert message in capsys.readouterr().err


def test_one_task_is_given_by_its_name_and_its_one_weight(lvm):
    cfg = lvm.parse_config(["--TASKS", "plane", "--KD_ALPHA", "0.5"])
    assert cfg.TASKS == ("plane",) and cfg.KD_ALPHA == (0.5,)


def test_medpix_names_the_columns_it_has_and_maps_the_plane(lvm, demo_data):
    medpix = demo_data / "medpix"
    cfg = lvm.parse_config(["--TASKS", "('modality', 'site')", "--KD_ALPHA", "(0, 0)"])
    with pytest.raises(SystemExit, match=r"MedPix 2.0: no column 'site' \(its columns: caption, group, history, image, "
                                         r"location, modality, plane; for other texts or labels, write a manifest\)"):
        lvm.load_split(medpix, "dev", cfg, Counter())
    cfg = lvm.parse_config(["--TASKS", "plane", "--KD_ALPHA", "0"])
    assert {s["plane"] for s in lvm.load_split(medpix, "dev", cfg, Counter())} == {"Axial"}  # the demo's only plane


def test_cross_validation_folds_of_a_manifest_keep_each_group_in_one_dev_split(tmp_path):
    rows = [dict(image=f"i{k}.png", label="ab"[k % 2], group=f"p{k // 3}" if k < 12 else "") for k in range(16)]
    write_table(tmp_path / "train.csv", rows[:10])
    write_table(tmp_path / "dev.csv", rows[10:])
    folds = write_manifest_folds(tmp_path, 4, tmp_path / "folds")
    dev = {}
    for fold in folds:
        for split in ("train", "dev"):
            with open(fold / f"{split}.csv", newline="") as f:
                read = list(csv.DictReader(f))
            assert all(Path(r["image"]).is_absolute() for r in read)
            if split == "dev":
                dev[fold.name] = [Path(r["image"]).name for r in read]
    assert sorted(name for names in dev.values() for name in names) == sorted(r["image"] for r in rows)
    for group in range(4):  # p0..p3, three images each: all in one fold's dev split
        members = {f"i{k}.png" for k in range(3 * group, 3 * group + 3)}
        assert sum(bool(members & set(names)) for names in dev.values()) == 1
    loose = {f"i{k}.png" for k in range(12, 16)}  # no group: each a group of its own, spread over the folds
    assert [len(loose & set(names)) for names in dev.values()] == [1, 1, 1, 1]


def test_an_image_only_data_set_needs_a_vision_tower(lvm):
    cfg = lvm.parse_config(["--VISION_TEACHER", "None", "--TEXT_COLUMNS", "()"])  # TEXT_TEACHER stays, unread
    with pytest.raises(SystemExit, match="the teacher needs at least one tower: VISION_TEACHER is None, and "
                                         r"TEXT_TEACHER is None or TEXT_COLUMNS \(\)"):
        lvm.load_teacher(cfg)
