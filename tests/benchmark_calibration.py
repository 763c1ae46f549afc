"""Calibration of finished runs (not part of the pytest run): for each run folder (one that benchmark_accuracy.py or a
plain run wrote, with results/*.onnx), the dev ECE of its ONNX int8 student, before and after a temperature fitted
on all of dev (in-sample, as the run itself reports it) and fitted on one half of the dev cases and scored on the
other (cross-fitted: sklearn's GroupKFold(2) on the case), per task; mean ± sd over the runs.

    python tests/benchmark_calibration.py results/ablation/default/fold{1,2,3,4,5}of5-seed1 \
        --DATA_ROOT results/ablation/folds/fold{1,2,3,4,5}of5
"""

import argparse
import importlib.util
import shutil
import statistics
import tempfile
from collections import Counter
from pathlib import Path

import torch
from sklearn.model_selection import GroupKFold

spec = importlib.util.spec_from_file_location("lvm", Path(__file__).resolve().parents[1] / "light-weight-vlm.py")
lvm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lvm)


def run_errors(run: Path, root: Path, cache: Path) -> dict:
    with tempfile.TemporaryDirectory() as folder:  # calibrate writes the temperature into the file: into a copy
        path = Path(shutil.copy(run / "results" / "lightweight_vlm_int8.onnx", folder))
        model = lvm.OnnxStudent(path)
        meta = model.meta
        samples = lvm.load_split(root, "dev", lvm.parse_config(["--TASKS", repr(tuple(meta["labels"]))]), Counter())
        images = lvm.load_images(samples, meta["image"]["size"], cache, Counter())
        samples = [s for s in samples if s["image_row"] is not None]
        ids, mask = lvm.deployment.text_inputs([s["text"] for s in samples], meta, None)  # as predict.py reads it
        dev = lvm.Split(images, torch.from_numpy(ids), torch.from_numpy(mask), tuple(
            lvm.encode_labels(samples, task, meta["labels"][task], "dev") for task in meta["labels"]),
                        rows=torch.tensor([s["image_row"] for s in samples]))
        logits = lvm.split_logits(model, {"dev": dev}, torch.device("cpu"), taken_apart=False)
        report = lvm.calibrate(logits, {"dev": dev}, path, list(meta["labels"]), lvm.parse_config([]))
    logits, cases = logits["dev"]["fused"], [s["group"] for s in samples]
    errors = {}
    for i, task in enumerate(meta["labels"]):
        labels, crossed = dev.labels[i], []
        for fit, held in GroupKFold(2).split(cases, groups=cases):
            temperature = lvm.fit_temperature(logits[i][fit], labels[fit], lvm.TEMPERATURE_RANGE)
            crossed.append([lvm.calibration_error((logits[i][held] / t).softmax(1), labels[held], lvm.ECE_BINS)
                            for t in (1.0, temperature)])
        errors[task] = dict(before=report[task]["dev_ece_before"], in_sample=report[task]["dev_ece_after"],
                            halves_before=statistics.mean(b for b, _ in crossed),
                            cross_fitted=statistics.mean(a for _, a in crossed),
                            temperature=report[task]["temperature"])
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--DATA_ROOT", type=Path, nargs="+", required=True, help="one for all runs, or one per run")
    parser.add_argument("--CACHE_DIR", type=Path, default=Path("cache"))
    args = parser.parse_args()
    roots = args.DATA_ROOT * len(args.runs) if len(args.DATA_ROOT) == 1 else args.DATA_ROOT
    results = [run_errors(run, root, args.CACHE_DIR) for run, root in zip(args.runs, roots, strict=True)]
    mean_sd = lambda v: f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}"
    print(f"ONNX int8 student, dev ECE ({lvm.ECE_BINS} bins), mean ± sd over {len(results)} run(s)")
    for task in results[0]:
        column = lambda key: mean_sd([r[task][key] for r in results])
        print(f"{task}: before {column('before')}, after T fitted on all of dev {column('in_sample')}; on each half "
              f"of the dev cases: before {column('halves_before')}, after T fitted on the other half "
              f"{column('cross_fitted')}; T {[r[task]['temperature'] for r in results]}")


if __name__ == "__main__":
    main()
