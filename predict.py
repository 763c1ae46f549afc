#!/usr/bin/env python3
"""The class of each task (MedPix 2.0: modality and body-location category) of medical images, from a light-weight-vlm
student file (.onnx) in ONNX Runtime. Needs numpy, Pillow and onnxruntime; pydicom for DICOM files, tokenizers for --text
(requirements-predict.txt). No PyTorch.

    python predict.py --image scan.png
    python predict.py --model results/lightweight_vlm_int8.onnx --image export/ "more/**/*.dcm" \\
        --text "axial CT of the chest" --output rows.csv --explain maps/

Each PATH is an image (PNG, JPEG, ...) or DICOM file, told apart by content, a folder (searched recursively, symlinked
folders followed once) or a glob. One JSON object per image or DICOM frame on stdout, in input order, or one row
each in --output (.csv or .jsonl); an input that cannot be read gets a row too, whose `error` says why. Found in a
folder or by a glob, files that are neither images nor DICOM, and DICOM files without pixels (DICOMDIR, reports,
plans), are counted and ignored. Probabilities are the model's logits divided by the temperature fitted on dev.

Exit status: 0 every input answered; 1 some inputs unreadable (each named on stderr), the rest answered; 2 nothing
could run (bad arguments, unusable model, no input answered).
"""

import argparse
import base64
import csv
import glob
import gzip
import importlib.util
import json
import logging
import math
import os
import signal
import sys
import tempfile
import textwrap
import warnings
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

PROG = "predict.py"
ANSWERED, SOME_UNREADABLE, NOTHING_RAN = 0, 1, 2  # exit codes
METADATA_KEY = "light_weight_vlm"  # the ONNX metadata entry that holds the input contract, labels and tokenizer
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
OCCLUSION_PATCH = 8  # --explain greys patches of 1/8 of the image side, moved by half a patch
IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning)


class Unusable(Exception):
    """An input that gives no image: why (a message), and whether a file found in a folder is merely ignored."""

    def __init__(self, reason: str, ignorable: bool = False):
        super().__init__(reason)
        self.ignorable = ignorable


# -----------------------------------------------------------------------------
# images: the one decoding, which light-weight-vlm.py trains with too


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparency composited over black, 16-bit and float grey stretched from its min..max to 0..255."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(image, dtype=np.float32)
        image = Image.fromarray(((a - a.min()) / max(float(a.max() - a.min()), 1e-6) * 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image.convert("RGBA"))
    return image.convert("RGB")


def resize_square(image: Image.Image, size: int) -> np.ndarray:
    """size x size x 3 uint8, by Pillow's bilinear filter (antialiased when shrinking); the aspect is not kept."""
    return np.array(image.resize((size, size), Image.Resampling.BILINEAR))


def decode_image(path: str, size: int) -> np.ndarray:
    """An image file as the student reads it (size x size x 3 uint8). An image of more pixels than Pillow's
    decompression-bomb limit is refused, not decoded (checked here, not through the warnings filter, which threads
    share)."""
    with Image.open(path) as image:
        if image.width * image.height > Image.MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"{image.width} x {image.height} pixels, more than Pillow's limit of "
                                               f"{Image.MAX_IMAGE_PIXELS:,}")
        return resize_square(to_rgb(image), size)


def model_input(images: np.ndarray, normalization: list[float]) -> np.ndarray:
    """N x S x S x 3 uint8 to the model's N x 3 x S x S float32: pixel / 255, then (x - mean) / std."""
    mean, std = normalization
    return ((images.astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2).copy()


# -----------------------------------------------------------------------------
# DICOM


def dicom_kind(path: str) -> str | None:
    """'part10' for DICOM with its 128-byte preamble and 'DICM'; 'bare' for a data set saved without them (its first
    element in group 0002 or 0008, little endian); None otherwise."""
    with open(path, "rb") as f:
        head = f.read(132)
    if head[128:] == b"DICM":
        return "part10"
    return "bare" if head[:2] in (b"\x02\x00", b"\x08\x00") and head[3:4] == b"\x00" else None


def read_dicom(path: str, size: int, window: tuple[float, float] | None, frames: str, bare: bool) -> list[dict]:
    """Each asked frame of a DICOM file as the student's input, shown as a viewer would: pixel values through the
    modality LUT (rescale), then the window (--window, else the file's VOI LUT or first window, else the 0.5-99.5
    percentiles) to 8 bits, MONOCHROME1 inverted; colour as RGB, palette colour through its lookup table. The
    header's Modality and BodyPartExamined are reported beside the answer, never model input."""
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
    ds = pydicom.dcmread(path, force=bare)
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if bare and "SOPClassUID" not in ds:
            raise Unusable("neither an image nor a DICOM file", ignorable=True)
        raise Unusable(f"no pixel data ({ds.SOPClassUID.name if 'SOPClassUID' in ds else 'no image'})", ignorable=True)
    if window:
        ds.WindowCenter, ds.WindowWidth = window
        ds.pop("VOILUTSequence", None)
    count = int(ds.get("NumberOfFrames") or 1)
    fields = dict(dicom_modality=header_text(ds, "Modality"), dicom_body_part=header_text(ds, "BodyPartExamined"))
    out = []
    for frame in range(count) if frames == "all" else [count // 2]:
        pixels = pixel_array(ds, index=frame if count > 1 else None)  # colour comes as RGB, YBR converted
        if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
            shown = apply_color_lut(pixels, ds) / (2 ** int(ds.RedPaletteColorLookupTableDescriptor[2]) - 1)
        elif ds.get("SamplesPerPixel", 1) > 1:
            shown = pixels.astype(np.float64) / (2 ** ds.BitsStored - 1)
        else:
            values = apply_modality_lut(pixels, ds).astype(np.float64)
            if "WindowCenter" in ds or "VOILUTSequence" in ds:  # the window's output range: its value at the ends
                low, high = apply_voi_lut(np.array([-1e30, 1e30]), ds, index=0)
                values = apply_voi_lut(values, ds, index=0)
            else:
                low, high = np.percentile(values, (0.5, 99.5))
            shown = (values - low) / max(high - low, 1e-6)
            shown = 1 - shown if ds.get("PhotometricInterpretation") == "MONOCHROME1" else shown
        rgb = np.broadcast_to(shown[..., None], (*shown.shape[:2], 3)) if shown.ndim == 2 else shown
        image = Image.fromarray(np.ascontiguousarray((rgb.clip(0, 1) * 255).round().astype(np.uint8)))
        out.append(dict(frame=frame, image=resize_square(image, size), **fields))
    return out


def header_text(ds, keyword: str) -> str | None:
    """A header value as text; several values joined by DICOM's backslash."""
    value = ds.get(keyword)
    if not value:
        return None
    return "\\".join(map(str, value)) if isinstance(value, Sequence) and not isinstance(value, str) else str(value)


# -----------------------------------------------------------------------------
# inputs


def folder_files(folder: str, unreadable: list) -> list[str]:
    """Every file below folder, sorted; a symlinked folder is followed, each real folder entered once (no loops).
    A subfolder that cannot be listed goes to unreadable."""
    seen, found = set(), []
    for root, dirs, files in os.walk(folder, followlinks=True, onerror=unreadable.append):
        dirs.sort()
        if os.path.realpath(root) in seen:
            dirs.clear()
            continue
        seen.add(os.path.realpath(root))
        found += [os.path.join(root, f) for f in files]
    return sorted(found)


def find_inputs(patterns: list[str]) -> list[dict]:
    """One entry per file to read: its path, which PATH it came from (source), whether it was named itself, and an
    error already known (a glob that matches nothing). Folders and globs expand in sorted order, each real file
    once per PATH."""
    entries = []
    for source, pattern in enumerate(patterns):
        unreadable = []
        if os.path.isdir(pattern):
            paths = folder_files(pattern, unreadable)
        elif glob.has_magic(pattern) and not os.path.exists(pattern):
            paths = [p for match in sorted(glob.iglob(pattern, recursive=True))
                     for p in (folder_files(match, unreadable) if os.path.isdir(match) else [match])]
        else:
            entries.append(dict(path=pattern, source=source, named=True, error=None))
            continue
        entries += [dict(path=e.filename, source=source, named=True, error=e.strerror or str(e)) for e in unreadable]
        if not paths and not unreadable:
            entries.append(dict(path=pattern, source=source, named=True, error="no file matches this pattern"
                                if not os.path.isdir(pattern) else "an empty folder"))
        shortest = {}  # per real file, the shortest of its paths (a symlink loop reaches it ever deeper)
        for path in paths:
            shortest[os.path.realpath(path)] = min(shortest.get(os.path.realpath(path), path), path,
                                                   key=lambda p: (p.count(os.sep), p))
        entries += [dict(path=path, source=source, named=False, error=None) for path in sorted(shortest.values())]
    return entries


def read_entry(entry: dict, size: int, window: tuple[float, float] | None, frames: str) -> list[dict] | Unusable:
    """The images of one file (one per asked DICOM frame), or why there are none."""
    if entry["error"]:
        return Unusable(entry["error"])
    path = entry["path"]
    try:
        kind = dicom_kind(path)
        if kind == "part10":
            return read_dicom(path, size, window, frames, bare=False)
        try:
            return [dict(frame=None, image=decode_image(path, size), dicom_modality=None, dicom_body_part=None)]
        except UnidentifiedImageError:
            if kind == "bare":
                return read_dicom(path, size, window, frames, bare=True)
            return Unusable("neither an image nor a DICOM file", ignorable=True)
    except Unusable as e:
        return e
    except IMAGE_ERRORS as e:
        return Unusable(getattr(e, "strerror", None) or reason(e))
    except Exception as e:  # pydicom and its plugins raise many kinds; whatever it is, the file is skipped
        return Unusable(reason(e))


def read_ahead(entries: list[dict], read, ahead: int):
    """(entry, what read(entry) gave) in input order, read by two threads at most `ahead` entries in front of the
    caller (decoding releases the GIL), so memory stays flat however many files there are."""
    with ThreadPoolExecutor(2) as pool:
        pending = deque()
        for entry in entries:
            pending.append((entry, pool.submit(read, entry)))
            if len(pending) > ahead:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


# -----------------------------------------------------------------------------
# the model and its text


def open_model(path: str, threads: int = 0):
    """A student .onnx file in an ONNX Runtime session, and the metadata that light-weight-vlm.py wrote into it.
    ONNX Runtime gets the file's bytes, not its path: a file that refers to data in other files is refused, and
    nothing in it runs as code. threads: ONNX Runtime's intra-op threads (0: one per core)."""
    import onnxruntime
    onnxruntime.set_default_logger_severity(4)  # its own log lines: failures come as exceptions
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    model, here = Path(path).read_bytes(), os.getcwd()
    with tempfile.TemporaryDirectory() as empty:  # it would look for external data in the working folder
        os.chdir(empty)
        try:
            session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        finally:
            os.chdir(here)
    meta = json.loads(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "{}"))
    if not {"labels", "image", "text", "tokenizer_json"} <= meta.keys():
        raise ValueError("no input contract in its metadata: an ONNX file of another program, or of an older "
                         "light-weight-vlm (train it again)")
    return session, meta


def load_tokenizer(meta: dict, override: str | None):
    """The tokenizer the model was trained with (in its file), or a tokenizer.json file or folder given instead.
    A tokenizer is data that the Rust `tokenizers` library parses: no code in it runs."""
    from tokenizers import Tokenizer
    if override:
        path = Path(override) / "tokenizer.json" if Path(override).is_dir() else Path(override)
        tokenizer = Tokenizer.from_file(str(path))
        tokenizer.no_padding()  # encode_texts truncates and pads as training did
        tokenizer.no_truncation()
        return tokenizer
    return Tokenizer.from_str(gzip.decompress(base64.b64decode(meta["tokenizer_json"])).decode())


def encode_texts(tokenizer, texts: list[str], max_tokens: int, vocab: list[int], unk_index: int,
                 pad_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Token indexes in the student's vocabulary (vocab[i] is the tokenizer's id of index i; any other id reads as
    unk_index), no special tokens, truncated and padded to max_tokens; and the mask (1 for a token)."""
    index = {token: i for i, token in enumerate(vocab)}
    ids, mask = np.full((len(texts), max_tokens), pad_index, np.int64), np.zeros((len(texts), max_tokens), np.int64)
    for row, encoding in enumerate(tokenizer.encode_batch(texts, add_special_tokens=False)):
        tokens = encoding.ids[:max_tokens]
        ids[row, :len(tokens)] = [index.get(t, unk_index) for t in tokens]
        mask[row, :len(tokens)] = 1
    return ids, mask


def text_inputs(texts: list[str], meta: dict, override: str | None) -> tuple[np.ndarray, np.ndarray]:
    """ids and mask for each --image PATH's text; with no text at all, N x 1 zeros, and no tokenizer is opened."""
    if not any(t.strip() for t in texts):
        return np.zeros((len(texts), 1), np.int64), np.zeros((len(texts), 1), np.int64)
    text = meta["text"]
    return encode_texts(load_tokenizer(meta, override), texts, text["max_tokens"], text["vocab"], text["unk_index"],
                        text["pad_index"])


def probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    scaled = logits.astype(np.float64) / temperature
    scaled = np.exp(scaled - scaled.max(-1, keepdims=True))
    return scaled / scaled.sum(-1, keepdims=True)


# -----------------------------------------------------------------------------
# heat maps


def occlusion_maps(run, image: np.ndarray, classes: list[int], temperatures: list[float],
                   batch_size: int) -> list[np.ndarray]:
    """Per task, how much the probability of classes[task] drops when a patch of the model's input image (3 x S x S)
    is set to 0, the mean grey, averaged per pixel over the patches that cover it; map[y, x] as the image's rows and
    columns. run(images) gives the logits per task; every occluded copy is one more sample of a batched call."""
    side = image.shape[-1]
    patch = max(side // OCCLUSION_PATCH, 2)
    corners = [(y, x) for y in range(0, side - patch + 1, patch // 2) for x in range(0, side - patch + 1, patch // 2)]
    copies = np.repeat(image[None], len(corners) + 1, axis=0)
    for k, (y, x) in enumerate(corners, 1):
        copies[k, :, y:y + patch, x:x + patch] = 0
    outputs = [run(copies[i:i + batch_size]) for i in range(0, len(copies), batch_size)]
    maps = []
    for task, (c, temperature) in enumerate(zip(classes, temperatures)):
        p = probabilities(np.concatenate([out[task] for out in outputs]), temperature)[:, c]
        drop, covered = np.zeros((side, side)), np.zeros((side, side))
        for (y, x), d in zip(corners, p[0] - p[1:]):
            drop[y:y + patch, x:x + patch] += d
            covered[y:y + patch, x:x + patch] += 1
        maps.append(drop / np.maximum(covered, 1))
    return maps


def diverging(x: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] to RGB: blue, white at 0, red."""
    x = np.clip(x, -1, 1)[..., None]
    white, red, blue = np.array([247.0, 247, 247]), np.array([178.0, 24, 43]), np.array([33.0, 102, 172])
    return np.where(x >= 0, white + x * (red - white), white - x * (blue - white))


def draw_explanation(image: np.ndarray, maps: list[np.ndarray], titles: list[str], heading: str, path: Path) -> None:
    """The image as the model saw it, then each map over its grey: red where greying a patch lowers the predicted
    class's probability, blue where it raises it, one scale for all maps; side by side under a heading."""
    from PIL import ImageDraw, ImageFont
    side, gap, top, bottom = 256, 10, 62, 30
    limit = max(float(np.abs(np.stack(maps)).max()), 1e-3)
    grey = np.repeat(image.mean(2, keepdims=True), 3, axis=2)
    panels = [image.astype(np.float64)] + [0.45 * grey + 0.55 * diverging(m / limit) for m in maps]
    canvas = Image.new("RGB", (gap + len(panels) * (side + gap), top + side + bottom), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=13)
    draw.text((gap, 4), heading if len(heading) <= 110 else "..." + heading[-107:], fill="black", font=font)
    for k, (panel, title) in enumerate(zip(panels, ["as the model saw it", *titles])):
        picture = Image.fromarray(panel.clip(0, 255).round().astype(np.uint8))
        picture = picture.resize((side, side), Image.Resampling.BILINEAR)
        canvas.paste(picture, (gap + k * (side + gap), top))
        draw.multiline_text((gap + k * (side + gap), top - 36), textwrap.fill(title, 36), fill="black", font=font)
    draw.text((gap, top + side + 8), f"red: greying that patch lowers the probability of the predicted class (by up to "
                                      f"{limit:.3f}); blue: raises it", fill="black", font=font)
    canvas.save(path)


# -----------------------------------------------------------------------------
# output


def open_output(output: Path | None, tasks: dict[str, list[str]]):
    """(write(row), finish(), abandon()): JSON lines on stdout, or rows of --output (.jsonl, or .csv with a column per
    class probability) written to a temporary file beside it and renamed into place by finish(), so a run that is
    stopped leaves no half table under the final name."""
    if output is None:
        return lambda row: print(json.dumps(row)), lambda: None, lambda: None
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as open() would make it, not mkstemp's owner-only
    f = os.fdopen(handle, "w", newline="")
    if output.suffix == ".jsonl":
        write = lambda row: f.write(json.dumps(row) + "\n")
    else:
        columns = ["image", "frame", "with_text", *tasks, *(f"{task}_p_{name}" for task, names in tasks.items()
                                                            for name in names), "dicom_modality", "dicom_body_part",
                   "error"]
        table = csv.DictWriter(f, columns)
        table.writeheader()
        write = lambda row: table.writerow({k: v for k, v in row.items() if not k.endswith("_probabilities")} | {
            f"{task}_p_{name}": p for task in tasks for name, p in (row[f"{task}_probabilities"] or {}).items()})

    def finish():
        f.close()
        os.replace(tmp, output)

    def abandon():
        f.close()
        Path(tmp).unlink(missing_ok=True)
    return write, finish, abandon


def reason(error: Exception) -> str:
    """An exception's message on one line, shortened at a word to 300 characters."""
    return textwrap.shorten(" ".join(str(error).split()), 300, placeholder=" ...") or type(error).__name__


def say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def stop(message: str) -> None:
    say(f"error: {message}")
    raise SystemExit(NOTHING_RAN)


# -----------------------------------------------------------------------------
# command line


def parse_window(text: str) -> tuple[float, float]:
    try:
        center, width = (float(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CENTER,WIDTH such as 40,400 or -600,1500, got {text!r}")
    if not (math.isfinite(center) and math.isfinite(width)):
        raise argparse.ArgumentTypeError(f"the window must be finite numbers, got {text!r}")
    if not width >= 1:
        raise argparse.ArgumentTypeError(f"the window width must be >= 1 (DICOM's smallest), got {text!r}")
    return center, width


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="Exit status: 0 every input answered; 1 some inputs unreadable, the rest "
                                            "answered; 2 nothing could run.")
    parser.add_argument("--model", default="results/lightweight_vlm_int8.onnx",
                        help="a student .onnx file written by light-weight-vlm.py (default: %(default)s)")
    parser.add_argument("--image", nargs="+", action="extend", required=True, metavar="PATH",
                        help="image or DICOM files, folders (searched recursively) or glob patterns")
    parser.add_argument("--text", action="append", default=[],
                        help="caption (then history): once for every image, or once per --image PATH (a folder's "
                             "images share its text); none: the image alone decides")
    parser.add_argument("--tokenizer", help="a tokenizer.json (or its folder) to use instead of the model's own")
    parser.add_argument("--window", type=parse_window, metavar="CENTER,WIDTH",
                        help="DICOM: show the pixels through this window (40,400 soft tissue; -600,1500 lung) instead "
                             "of the file's own")
    parser.add_argument("--frames", choices=("middle", "all"), default="middle",
                        help="multi-frame DICOM: the middle frame, or one answer per frame (default: %(default)s)")
    parser.add_argument("--output", type=Path, metavar="FILE.csv|FILE.jsonl",
                        help="write the rows there instead of printing JSON lines")
    parser.add_argument("--explain", type=Path, metavar="DIR",
                        help="write a PNG per image there: what the model saw, and where greying a patch lowers the "
                             "probability of each predicted class (an occlusion heat map)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per model call; the answers do not depend on it (default: %(default)s)")
    # argparse reads "-600,1500" as an option: "--window=-600,1500" it reads as a value
    argv = [f"--window={next(it, '')}" if a == "--window" else a for it in [iter(argv)] for a in it]
    args = parser.parse_args(argv)
    if len(args.text) not in (0, 1, len(args.image)):
        parser.error(f"give --text once, or once per --image ({len(args.image)} paths, {len(args.text)} texts)")
    if args.output and args.output.suffix not in (".csv", ".jsonl"):
        parser.error(f"--output must end in .csv or .jsonl, got {args.output}")
    if args.output and args.output.is_dir():
        parser.error(f"--output {args.output} is a folder; name a file in it")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def check_model(path: str) -> None:
    if Path(path).suffix in (".pth", ".pt"):
        onnx = [p for p in (Path(path).with_name("lightweight_vlm_int8.onnx"), Path(path).with_suffix(".onnx"))
                if p.is_file()]
        stop(f"{path} is a PyTorch file; predict.py runs the .onnx students: --model "
             f"{onnx[0] if onnx else Path(path).with_name('lightweight_vlm_int8.onnx')}")
    if not Path(path).is_file():
        stop(f"{path}: no such model file (train one with: python light-weight-vlm.py)")


def writable_folder(folder: Path, option: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        stop(f"{option} {folder}: {e.strerror or e}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if importlib.util.find_spec("onnxruntime") is None:
        stop("onnxruntime is not installed: python -m pip install -r requirements-predict.txt")
    check_model(args.model)
    try:
        session, meta = open_model(args.model)
    except Exception as e:  # whatever a load raises means the same here; the file ran nothing
        stop(f"{args.model}: not a light-weight-vlm student file ({reason(e)}); nothing in it was run")
    tasks = meta["labels"]
    temperatures = [meta.get("temperature", {}).get(task, 1.0) for task in tasks]
    texts = args.text * len(args.image) if len(args.text) == 1 else args.text or [""] * len(args.image)
    if meta["text"] is None and (any(t.strip() for t in texts) or args.tokenizer):
        stop(f"{args.model} was trained on images alone (no text columns): drop --text and --tokenizer")
    try:
        ids, mask = text_inputs(texts, meta, args.tokenizer)
    except Exception as e:
        stop(f"the tokenizer {args.tokenizer or 'of ' + args.model} does not load ({reason(e)})")
    if args.explain:
        writable_folder(args.explain, "--explain")
    entries = find_inputs(args.image)
    bar = progress_bar(len(entries))
    try:
        write, finish, abandon = open_output(args.output, tasks)
    except OSError as e:
        stop(f"--output {args.output}: {e.strerror or e}")
    size, normalization = meta["image"]["size"], meta["image"]["normalization"]
    inputs = lambda images, rows: (images, ids[rows], mask[rows]) if meta["text"] else (images,)
    run = lambda images, rows: session.run(list(tasks), dict(zip(ONNX_INPUTS, inputs(images, rows))))
    counts, batch = Counter(), []

    def answer(batch: list[tuple[dict, dict]]) -> None:
        images = model_input(np.stack([item["image"] for _, item in batch]), normalization)
        rows = np.array([entry["source"] for entry, _ in batch])
        for i, ((entry, item), *logits) in enumerate(zip(batch, *run(images, rows))):
            row = dict(image=entry["path"], frame=item["frame"], with_text=bool(texts[entry["source"]].strip()))
            for task, task_logits, temperature in zip(tasks, logits, temperatures):
                p = probabilities(task_logits, temperature)
                row[task] = tasks[task][int(p.argmax())]
                row[f"{task}_probabilities"] = {name: round(float(v), 4) for name, v in zip(tasks[task], p)}
            write(row | {key: item[key] for key in ("dicom_modality", "dicom_body_part")} | dict(error=None))
            counts["answered"] += 1
            if args.explain:
                explain(lambda x: run(x, rows[i:i + 1].repeat(len(x))), images[i], item, entry, row, tasks,
                        temperatures, args, counts["answered"])

    read = lambda entry: read_entry(entry, size, args.window, args.frames)
    try:
        for entry, result in read_ahead(entries, read, ahead=2 * args.batch_size):
            bar.update(1)
            if isinstance(result, Unusable) and result.ignorable and not entry["named"]:
                counts["ignored"] += 1
            elif isinstance(result, Unusable):
                if batch:
                    answer(batch)
                    batch = []
                counts["failed"] += 1
                say(f"skipped {entry['path']}: {result}")
                write(dict(image=entry["path"], frame=None, with_text=bool(texts[entry["source"]].strip()),
                           **{key: None for task in tasks for key in (task, f"{task}_probabilities")},
                           dicom_modality=None, dicom_body_part=None, error=str(result)))
            else:
                batch += [(entry, item) for item in result]
                while len(batch) >= args.batch_size:
                    answer(batch[:args.batch_size])
                    batch = batch[args.batch_size:]
        if batch:
            answer(batch)
        finish()
    except BaseException:
        abandon()
        raise
    finally:
        bar.close()
    if counts["ignored"]:
        say(f"ignored {counts['ignored']} file(s) that are neither images nor DICOM with pixels")
    if not counts["answered"]:
        stop(f"no image answered ({counts['failed']} input(s) unreadable, {counts['ignored']} ignored)")
    if counts["failed"]:
        say(f"{counts['failed']} of {counts['failed'] + counts['answered']} input(s) could not be read (each named "
            f"above); {counts['answered']} answered")
        return SOME_UNREADABLE
    return ANSWERED


def explain(run, image: np.ndarray, item: dict, entry: dict, row: dict, tasks: dict, temperatures: list[float],
            args: argparse.Namespace, number: int) -> None:
    classes = [names.index(row[task]) for task, names in tasks.items()]
    maps = occlusion_maps(run, image, classes, temperatures, args.batch_size)
    titles = [f"{task}: {row[task]} ({row[f'{task}_probabilities'][row[task]]:.2f})" for task in tasks]
    frame = "" if item["frame"] is None else f"_frame{item['frame']}"
    heading = entry["path"] + ("" if item["frame"] is None else f", frame {item['frame']}") + (
        "" if row["with_text"] else " (image only)")
    name = f"{number:06d}_{Path(entry['path']).stem}{frame}.png"
    draw_explanation(item["image"], maps, titles, heading, args.explain / name)


def progress_bar(total: int):
    """A bar on stderr when it is a terminal; otherwise nothing is drawn (a log would fill with redraws)."""
    if not sys.stderr.isatty():
        return argparse.Namespace(update=lambda n: None, close=lambda: None)
    from tqdm import tqdm
    return tqdm(total=total, unit="file", file=sys.stderr, leave=False)


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends the program quietly, as it ends cat
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
    warnings.simplefilter("ignore")  # library warnings (pydicom's above all) stay off stderr: one line per problem
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted")
        sys.exit(130)
    except Exception as e:  # a failure no check foresaw: still one line
        say(f"error: {type(e).__name__}: {reason(e)}")
        sys.exit(NOTHING_RAN)
