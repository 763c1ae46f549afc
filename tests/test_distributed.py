"""Several processes under torchrun (DistributedDataParallel), on the CPU with gloo: 2 processes on the demo data."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, read_csv
from test_reliability import wait_for_epochs

SCRIPT = ROOT / "light-weight-vlm.py"


def torchrun(workdir: Path, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(SCRIPT), "--DEVICE", "cpu", *args]
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[Path, str, str]:
    """The demo on 2 processes of 16 samples a batch: the global batch of the 1-process demo run (32)."""
    workdir = tmp_path_factory.mktemp("torchrun")
    done = torchrun(workdir, "--demo", "--BATCH_SIZE", "16")
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done.stdout, done.stderr


def test_two_processes_train_one_model_and_write_every_output_once(lvm, two_processes, demo_run):
    workdir, out, err = two_processes
    assert out.count("done in ") == 1 and out.count("epoch   1 | loss") == 1  # process 0 alone prints
    assert "train:" not in err  # no progress bars where the output is not a terminal
    epochs = [int(row[0]) for row in read_csv(workdir / "logs" / "training_log.csv")[1:]]
    assert epochs == list(range(1, lvm.DEMO["EPOCHS"] + 1))
    assert not list(workdir.rglob(".*.tmp"))
    metrics = json.loads((workdir / "results" / "metrics.json").read_text())
    single = demo_run[1]
    for key in ("modality_acc", "location_acc"):  # other BatchNorm batches and augmentation pairings: close, not equal
        assert abs(metrics["student"]["dev"][key] - single["student"]["dev"][key]) <= 0.1, key
        assert metrics["teacher"]["dev"][key] == pytest.approx(single["teacher"]["dev"][key], abs=0.02)
    vision = next((workdir / "cache").glob("vision-*.pt"))  # computed in two shares, saved once, complete
    assert len(torch.load(vision, weights_only=True)) == 318


def test_killed_under_torchrun_then_resumed_finishes_each_epoch_once(lvm, tmp_path):
    workdir = tmp_path / "killed"
    workdir.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
               "--demo", "--DEVICE", "cpu", "--BATCH_SIZE", "16"]
    process = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    wait_for_epochs(process, workdir / "logs" / "training_log.csv", 2)
    os.killpg(process.pid, signal.SIGKILL)  # torchrun and both processes at once
    process.wait(timeout=30)
    assert len(read_csv(workdir / "logs" / "training_log.csv")) - 1 < lvm.DEMO["EPOCHS"]
    stores = {p: p.stat().st_mtime_ns for p in (workdir / "cache").glob("*.pt")}

    done = torchrun(workdir, "--demo", "--BATCH_SIZE", "16", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("resumed from results/checkpoint.pt: ") == 1
    epochs = [int(row[0]) for row in read_csv(workdir / "logs" / "training_log.csv")[1:]]
    assert epochs == list(range(1, lvm.DEMO["EPOCHS"] + 1))
    assert {p: p.stat().st_mtime_ns for p in (workdir / "cache").glob("*.pt")} == stores  # nothing computed again
    metrics = json.loads((workdir / "results" / "metrics.json").read_text())
    assert metrics["student"]["dev"]["modality_acc"] > 0.8 and metrics["student"]["dev"]["location_acc"] > 0.6

    done = torchrun(workdir, "--demo", "--BATCH_SIZE", "16", "--resume", processes=1)
    assert done.returncode != 0
    assert "other settings (processes): processes 2 there, 1 now" in done.stderr


def test_a_process_that_fails_stops_the_others(tmp_path):
    done = torchrun(tmp_path, "--DATA_ROOT", "nowhere")  # process 0 stops; process 1 waits for it at a barrier
    assert done.returncode != 0
    assert done.stderr.count("light-weight-vlm: error: MedPix 2.0 data not found: nowhere/images is missing") == 1
    assert "[rank1]: Traceback" not in done.stderr  # the process it stopped says so in one line, too
