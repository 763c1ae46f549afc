import csv
import importlib.util
import os
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import jsonlines
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # predict.py
MEDPIX = ROOT.parent / "shared" / "medpix" / "MedPix-2-0"


@pytest.fixture(scope="session")
def lvm():
    """The script as a module (its file name has hyphens, so it cannot be imported by name)."""
    spec = importlib.util.spec_from_file_location("light_weight_vlm", ROOT / "light-weight-vlm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def demo_run(lvm, tmp_path_factory):
    """One full `--demo` run on the CPU with the default output folders, inside a fresh working directory."""
    workdir = tmp_path_factory.mktemp("demo")
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        metrics = lvm.main(["--demo", "--DEVICE", "cpu"])
    finally:
        os.chdir(previous)
    return workdir, metrics


def write_split(root: Path, split: str, cases: list[dict], descriptions: list[dict]) -> None:
    folder = root / "splitted_dataset"
    folder.mkdir(parents=True, exist_ok=True)
    with jsonlines.open(folder / f"data_{split}.jsonl", "w") as w:
        w.write_all(cases)
    with jsonlines.open(folder / f"descriptions_{split}.jsonl", "w") as w:
        w.write_all(descriptions)


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def make_student(lvm, vocab_size: int, n_classes: tuple = (2, 5), **settings):
    """A Student with the CONFIG block's settings, but those given."""
    defaults = dict(backbone_stages=lvm.BACKBONE_STAGES, image_size=lvm.IMAGE_SIZE, cnn_channels=lvm.CNN_CHANNELS,
                    embed_dim=lvm.EMBED_DIM, lstm_hidden=lvm.LSTM_HIDDEN, fusion_dim=lvm.FUSION_DIM, dropout=lvm.DROPOUT)
    return lvm.Student(vocab_size, 0, n_classes, **(defaults | settings))


def student_meta(lvm, path: Path) -> dict:
    """What a student file says of itself: the .onnx's metadata, the .pth's saved dict."""
    return lvm.OnnxStudent(path).meta if path.suffix == ".onnx" else lvm.load_student(path)[1]


def demo_dev_data(lvm, workdir: Path, meta: dict, split: str = "dev"):
    """The demo dev (or another) split of a run in workdir, prepared as a saved student reads it."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(workdir / meta["tokenizer"])
    cfg = lvm.parse_config(["--demo"])
    samples = lvm.load_split(workdir / lvm.DEMO["DATA_ROOT"], split, cfg, Counter())
    images = lvm.load_images(samples, meta["image_size"], workdir / "cache", Counter())
    return lvm.prepare_split(samples, images, tokenizer, meta["vocab"], meta["labels"], split, cfg)


@contextmanager
def head_output_dtypes(lvm):
    """(training, dtype) of every output of the modality head of each Student built meanwhile (a forward hook)."""
    seen, build = [], lvm.Student.__init__

    def build_with_hook(self, *args, **kwargs):
        build(self, *args, **kwargs)
        self.heads[0].register_forward_hook(lambda module, inputs, output: seen.append((module.training,
                                                                                            output.dtype)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lvm.Student, "__init__", build_with_hook)
        yield seen


def dtypes_seen(seen: list, training: bool) -> set:
    return {dtype for in_training, dtype in seen if in_training == training}


def assert_warm_up_then_cosine(lvm, log: Path) -> None:
    """The lr column of a training log (the rate at the end of each epoch): the peak LR after the one warm-up
    epoch, then falling to zero on a cosine: symmetric about its midpoint, and falling slowly at first, fastest in
    the middle, slowly at the end (a straight line would fall evenly)."""
    rows = read_csv(log)
    lr = [float(row[rows[0].index("lr")]) for row in rows[1:]]
    assert lr[0] == pytest.approx(lvm.LR, rel=1e-3) and lr[-1] == pytest.approx(0, abs=1e-9)
    assert all(a + b == pytest.approx(lvm.LR, rel=1e-2) for a, b in zip(lr, reversed(lr)))
    drops = [a - b for a, b in zip(lr, lr[1:])]
    assert all(d > 0 for d in drops) and drops[0] < 0.8 * drops[len(drops) // 2] > 1.25 * drops[-1]
