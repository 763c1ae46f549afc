"""The data stage at scale (not part of the pytest run): a synthetic manifest of --images 256 px PNGs, made here once,
then (1) the peak memory of the data stage (load_data: manifest, content hashes, the decoded image store) in a
process of its own, and (2) images/s of training epochs fed from the memory-mapped store against the same split
held in memory, interleaved, in one process.

    python tests/benchmark_data.py --out /tmp/data50k --images 50000

The epochs train the default student, image only (TEXT_COLUMNS ()), on --epoch-images samples drawn at random from
the whole store, so that the batches read rows spread over all of it; then the batch read alone (32 random samples'
images, median of 300), each way.
"""

import argparse
import csv
import importlib.util
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "light-weight-vlm.py"
CLASSES = ("round", "square")


def script():
    spec = importlib.util.spec_from_file_location("light_weight_vlm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def draw(args: tuple) -> None:
    """One 256 px greyscale PNG: a gradient and a bright round or square shape (its class)."""
    from PIL import Image, ImageDraw
    path, seed = args
    rng = random.Random(seed)
    image = Image.linear_gradient("L").rotate(rng.uniform(0, 360)).point(lambda v: v // 3)
    x, y, r = rng.randint(60, 196), rng.randint(60, 196), rng.randint(20, 50)
    shape = ImageDraw.Draw(image).ellipse if seed % 2 else ImageDraw.Draw(image).rectangle
    shape((x - r, y - r, x + r, y + r), fill=rng.randint(150, 255))
    image.save(path, format="PNG")


def make_manifest(out: Path, n: int) -> None:
    """out/images/<k>.png and out/train.csv (all but every tenth image) and out/dev.csv; kept when already made."""
    if (out / "dev.csv").exists() and sum(1 for _ in (out / "images").iterdir()) == n:
        return
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(out / "images" / f"{k:06d}.png", k) for k in range(n)]
    started = time.time()
    with ProcessPoolExecutor() as pool:
        list(pool.map(draw, jobs, chunksize=256))
    for split, keep in (("train", lambda k: k % 10), ("dev", lambda k: not k % 10)):
        with open(out / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "shape"])
            writer.writerows([f"images/{k:06d}.png", CLASSES[k % 2]] for k in range(n) if keep(k))
    print(f"made {n:,} PNGs in {time.time() - started:.0f} s", flush=True)


def data_stage(out: Path, cache: Path) -> None:
    """Run in a process of its own: load_data, then print its peak memory and the store's size as JSON."""
    lvm = script()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = lvm.parse_config(["--DATA_ROOT", str(out), "--CACHE_DIR", str(cache), "--TASKS", "shape", "--KD_ALPHA",
                            "(0.0,)", "--TEXT_COLUMNS", "()"])
    started = time.time()
    splits, images, skipped = lvm.load_data(cfg)
    print(json.dumps(dict(seconds=round(time.time() - started, 1), samples={k: len(v) for k, v in splits.items()},
                          store_bytes=images.numel(), peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          rss_before_mb=before / 1024, skipped=dict(skipped))))


def epoch_speed(out: Path, cache: Path, n: int, rounds: int) -> dict:
    import torch
    lvm = script()
    cfg = lvm.parse_config(["--DATA_ROOT", str(out), "--CACHE_DIR", str(cache), "--TASKS", "shape", "--KD_ALPHA",
                            "(0.0,)", "--TEXT_COLUMNS", "()", "--DEVICE", "cpu"])
    splits, mapped, _ = lvm.load_data(cfg)
    samples = random.Random(0).sample(splits["train"], n)
    names = {"shape": list(CLASSES)}
    split = lvm.prepare_split(samples, mapped, None, [], names, "train", cfg)
    rows = split.rows
    held = dict(mapped=split, in_memory=lvm.Split(mapped[rows], split.ids, split.mask, split.labels,
                                                  rows=torch.arange(n)))  # the same rows, copied into memory
    student = lvm.Student(**lvm.student_kwargs(cfg, 0, 0, (2,))).to(memory_format=torch.channels_last)
    device, seconds = torch.device("cpu"), {name: [] for name in held}
    for name, data in held.items():
        data.teacher = (torch.zeros(n, 2),)
    distiller = lvm.Distiller(student, torch.nn.ModuleDict(), cfg)
    optimizer = lvm.adamw(list(student.parameters()), cfg.LR, cfg.WEIGHT_DECAY, device)
    scaler, generator = lvm.grad_scaler(device, None), torch.Generator().manual_seed(0)
    for round_ in range(rounds + 1):  # the first round warms up, untimed
        for name, data in (held.items() if round_ % 2 else reversed(held.items())):
            started = time.perf_counter()
            lvm.train_epoch(distiller, data, optimizer, None, scaler, cfg, device, None, generator)
            if round_:
                seconds[name].append(time.perf_counter() - started)
    gather = {name: [] for name in held}  # the batch read alone: 32 random samples' images
    for _ in range(300):
        idx = torch.randint(0, n, (32,))
        for name, data in held.items():
            started = time.perf_counter()
            data.pixels(idx)
            gather[name].append(time.perf_counter() - started)
    return {name: dict(images_per_s=round(n / statistics.median(s), 1), seconds=[round(x, 1) for x in s],
                       batch_read_ms=round(statistics.median(gather[name]) * 1e3, 3)) for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--epoch-images", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-stage", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cache = args.out / "cache"
    if args.data_stage:
        return data_stage(args.out, cache)
    make_manifest(args.out, args.images)
    for when in ("decoding", "cached"):  # the first builds the store, the second finds it built
        done = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--data-stage"], capture_output=True,
                              text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if done.returncode:
            sys.exit(done.stderr[-2000:])
        stage = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"data stage, {when}: {stage['seconds']} s, peak RSS {stage['peak_rss_mb']:,.0f} MB (after imports "
              f"{stage['rss_before_mb']:,.0f} MB), {stage['samples']}, store {stage['store_bytes'] / 2**30:.2f} GiB "
              f"on disk, skipped {stage['skipped']}", flush=True)
    speed = epoch_speed(args.out, cache, args.epoch_images, args.rounds)
    ratio = speed["mapped"]["images_per_s"] / speed["in_memory"]["images_per_s"]
    print(f"training epochs of {args.epoch_images:,} images drawn from {args.images:,}, median of {args.rounds} "
          f"interleaved: memory-mapped {speed['mapped']}, in memory {speed['in_memory']}: ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
