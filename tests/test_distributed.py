"""Several processes under torchrun (DistributedDataParallel), on the CPU with gloo: 2 processes on the demo data."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_warm_up_then_cosine, read_csv
from test_reliability import wait_for_epochs

SCRIPT = ROOT / "light-weight-vlm.py"


def torchrun(workdir: Path, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(SCRIPT), "--DEVICE", "cpu", *args]
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=300)


RECORDER = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("lvm", sys.argv[1])
lvm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lvm)
import demo  # beside the script, on the path it set
make_demo_data, epoch_plan, train_epoch = demo.make_demo_data, lvm.epoch_plan, lvm.train_epoch
shares, steps = [], []

def recording_plan(*args, **kwargs):
    plan = epoch_plan(*args, **kwargs)
    shares.append(plan["order"].tolist())
    return plan

def recording_epoch(model, data, optimizer, *args, **kwargs):  # after each epoch under DistributedDataParallel
    loss = train_epoch(model, data, optimizer, *args, **kwargs)
    if isinstance(model, lvm.DistributedDataParallel):
        parameters = {k: v.detach().clone() for k, v in model.module.student.named_parameters()}
        steps.append(max(int(state["step"]) for state in optimizer.state.values()))  # AdamW counts its steps
        torch.save(dict(shares=shares, parameters=parameters, steps=steps), f"rank{lvm.rank_and_world()[0]}.pt")
    return loss

demo.make_demo_data = lambda root, seed: make_demo_data(root, seed, dict(train=201, dev=60, test=60))
lvm.epoch_plan, lvm.train_epoch = recording_plan, recording_epoch
lvm.main(sys.argv[2:])
"""


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[Path, str, str]:
    """The demo on 2 processes, with 201 train images (so one process's share is padded by one), batches of 8
    and GRAD_ACCUM_STEPS 2: the global batch of the 1-process demo run (32). Each process records its share of
    every epoch and its parameters at the end of it."""
    workdir = tmp_path_factory.mktemp("torchrun")
    (workdir / "recorder.py").write_text(RECORDER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "recorder.py", str(SCRIPT), "--demo", "--DEVICE", "cpu", "--BATCH_SIZE", "8", "--GRAD_ACCUM_STEPS", "2"]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done.stdout, done.stderr


def test_two_processes_train_one_model_and_write_every_output_once(lvm, two_processes):
    workdir, out, err = two_processes
    assert out.count("done in ") == 1 and out.count("epoch   1 | loss") == 1  # process 0 alone prints
    assert "train:" not in err  # no progress bars where the output is not a terminal
    epochs = [int(row[0]) for row in read_csv(workdir / "logs" / "training_log.csv")[1:]]
    assert epochs == list(range(1, lvm.DEMO["EPOCHS"] + 1))
    assert not list(workdir.rglob(".*.tmp"))
    metrics = json.loads((workdir / "results" / "metrics.json").read_text())
    assert metrics["student"]["dev"]["modality_acc"] > 0.8 and metrics["student"]["dev"]["location_acc"] > 0.6
    vision = next((workdir / "cache").glob("vision-*.pt"))  # computed in two shares, saved once, complete
    assert len(torch.load(vision, weights_only=True)) == 201 + 60 + 60
    first, second = (torch.load(workdir / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert len(first["shares"]) == len(second["shares"]) == lvm.DEMO["EPOCHS"]
    for mine, theirs in zip(first["shares"], second["shares"]):  # disjoint, covering, as long: one image twice
        assert len(mine) == len(theirs) == 101 and set(mine) | set(theirs) == set(range(201))
        assert len(set(mine) & set(theirs)) == 1 and len(set(mine)) == len(set(theirs)) == 101
    assert first["parameters"].keys() == second["parameters"].keys()  # one model: every step's gradients met
    assert all(torch.equal(first["parameters"][k], second["parameters"][k]) for k in first["parameters"])
    steps_per_epoch = math.ceil(math.ceil(101 / 8) / 2)  # 13 batches of 8 a process, an optimizer step every 2
    assert first["steps"] == second["steps"] == [steps_per_epoch * epoch for epoch in range(1, lvm.DEMO["EPOCHS"] + 1)]
    assert_warm_up_then_cosine(lvm, workdir / "logs" / "training_log.csv")  # a scheduler step per optimizer step


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
    stores = {p: p.stat().st_mtime_ns for p in (workdir / "cache").glob("*.[pu][t8]")}

    done = torchrun(workdir, "--demo", "--BATCH_SIZE", "16", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("resumed from results/checkpoint.pt: ") == 1
    epochs = [int(row[0]) for row in read_csv(workdir / "logs" / "training_log.csv")[1:]]
    assert epochs == list(range(1, lvm.DEMO["EPOCHS"] + 1))
    assert {p: p.stat().st_mtime_ns for p in (workdir / "cache").glob("*.[pu][t8]")} == stores  # nothing computed again
    metrics = json.loads((workdir / "results" / "metrics.json").read_text())
    assert metrics["student"]["dev"]["modality_acc"] > 0.8 and metrics["student"]["dev"]["location_acc"] > 0.6

    done = torchrun(workdir, "--demo", "--BATCH_SIZE", "16", "--resume", processes=1)
    assert done.returncode != 0
    assert "other settings (processes): processes 2 there, 1 now" in done.stderr


def test_a_process_that_fails_stops_the_others(tmp_path):
    done = torchrun(tmp_path, "--DATA_ROOT", "nowhere")  # process 0 stops; process 1 waits for it at a barrier
    assert done.returncode != 0
    assert done.stderr.count("light-weight-vlm: error: no data at nowhere: neither a manifest") == 1
    assert "[rank1]: Traceback" not in done.stderr  # the process it stopped says so in one line, too
