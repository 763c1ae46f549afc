"""The CUDA path, run where a GPU is (skipped elsewhere): a demo run with each AMP dtype, kill -9 and --resume,
the saved files on the CPU, the students' agreement with the CUDA-trained model, the LSTM's precision under
autocast, and a training epoch that never waits for the GPU. tests/gpu_check.sh runs these with a benchmark."""

import json
import os
import signal

import pytest
import torch

from benchmark_gpu import TARGETS, host_syncs
from conftest import demo_dev_data, dtypes_seen, head_output_dtypes, make_student, read_csv
from test_reliability import finish, start_demo, stop_message, wait_for_epochs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here (torch.cuda.is_available() is False)")
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture(scope="module", params=["bf16", "fp16", "fp32"])
def cuda_run(lvm, request, tmp_path_factory):
    """A full --demo run on the GPU with the given AMP dtype, in-process, in a fresh working directory; with the
    dtypes of the student's outputs in training and in evaluation."""
    workdir = tmp_path_factory.mktemp(f"cuda-{request.param}")
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        with head_output_dtypes(lvm) as seen:
            metrics = lvm.main(["--demo", "--DEVICE", "cuda", "--AMP_DTYPE", request.param])
    finally:
        os.chdir(previous)
    return request.param, workdir, metrics, seen


def tensors(obj) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for v in values for t in tensors(v)]


def test_demo_run_on_cuda_learns_and_records_its_precision(lvm, cuda_run):
    amp, workdir, metrics, seen = cuda_run
    assert metrics["device"].startswith("cuda") and metrics["precision"] == amp
    trained_in = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[amp]  # the modality head's outputs
    assert dtypes_seen(seen, training=True) == {trained_in} and dtypes_seen(seen, training=False) == {torch.float32}
    rows = read_csv(workdir / "logs" / "training_log.csv")
    assert [int(r[0]) for r in rows[1:]] == list(range(1, lvm.DEMO["EPOCHS"] + 1))
    losses = [float(r[1]) for r in rows[1:]]
    assert all(map(lambda x: x == x, losses)) and losses[-1] < losses[0]  # finite, and falling
    assert metrics["student"]["dev"]["modality_acc"] > 0.8 and metrics["student"]["dev"]["location_acc"] > 0.6


def test_files_written_on_cuda_load_on_the_cpu_and_agree_with_the_gpu(lvm, cuda_run):
    amp, workdir, metrics, _ = cuda_run
    results = workdir / "results"
    for name in ("lightweight_vlm.pth", "checkpoint.pt"):
        saved = torch.load(results / name, weights_only=False)  # no map_location: CUDA tensors would land on the GPU
        assert all(t.device.type == "cpu" for t in tensors(saved)), name
    model, meta = lvm.load_student(results / "lightweight_vlm.pth")
    labels = {}
    for device in (CPU, CUDA):  # dev and test: 120 images, so that 99 % leaves room for one near-tie
        logits = [lvm.predict(model.to(device), demo_dev_data(lvm, workdir, meta, split), device)
                  for split in ("dev", "test")]
        labels[device.type] = [torch.cat([lg[task].argmax(1) for lg in logits]) for task in range(len(lvm.TASKS))]
    for task, a, b in zip(lvm.TASKS, labels["cpu"], labels["cuda"]):
        assert (a == b).float().mean() >= 0.99, task
    # int8 (on the CPU) against the pruned float model it was made from, whose dev labels the run computed on the
    # GPU: the CPU suite's bound (test_pipeline), which leaves room for 3 near-ties in 60 images
    assert all(v >= 0.95 for v in metrics["onnx_int8_agreement"]["pruned_float"].values()), metrics["onnx_int8_agreement"]


def test_lstm_runs_in_fp32_under_autocast(lvm):
    student = make_student(lvm, 50).to(CUDA)
    ids, mask = torch.randint(1, 50, (4, 16), device=CUDA), torch.ones(4, 16, dtype=torch.long, device=CUDA)
    images = torch.randn(4, 3, 64, 64, device=CUDA)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cuda", dtype=dtype):
            vectors = student.embed(images, ids, mask)
        assert vectors["text"].dtype == torch.float32 and vectors["image"].dtype == dtype


@pytest.mark.parametrize("amp", [torch.bfloat16, None])
def test_a_training_epoch_does_not_wait_for_the_gpu(lvm, amp):
    """Host syncs during one epoch of 20 steps: a few around the loop (the text lengths for the epoch's plan, the
    mean loss), none per step. cudaStreamSynchronize and .item() are what sync debug mode reports."""
    torch.manual_seed(0)
    n, size, tokens = 640, 64, 32
    student = make_student(lvm, 100).to(CUDA, memory_format=torch.channels_last)
    data = lvm.Split(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8), torch.randint(1, 100, (n, tokens)),
                     (torch.arange(tokens) < torch.randint(0, tokens, (n, 1))).long(),
                     (torch.randint(0, 2, (n,)), torch.randint(0, 5, (n,))), (torch.randn(n, 2), torch.randn(n, 5)),
                     dict(image=torch.randn(n, 32), text=torch.randn(n, 48))).to(CUDA)
    cfg = lvm.parse_config([])
    adapters = lvm.feature_adapters(student, data.features).to(CUDA)
    optimizer = lvm.adamw([*student.parameters(), *adapters.parameters()], 1e-3, 0.05, CUDA)
    ema, scaler = lvm.MovingAverage(student, 0.99), lvm.grad_scaler(CUDA, amp)
    generator = torch.Generator().manual_seed(0)
    distiller = lvm.Distiller(student, adapters, cfg)
    train = lambda: lvm.train_epoch(distiller, data, optimizer, None, scaler, cfg, CUDA, amp, generator, ema)
    train()  # warm-up: cuDNN's first calls choose algorithms
    syncs = host_syncs(train)
    assert len(syncs) <= TARGETS["syncs"], (f"{len(syncs)} host syncs in an epoch of {n // cfg.BATCH_SIZE} steps", syncs[:3])


def test_killed_on_cuda_then_resumed_finishes_each_epoch_once(lvm, tmp_path):
    workdir, epochs = tmp_path / "killed", 20  # demo epochs take a fraction of a second on a GPU: leave room to kill
    process = start_demo(workdir, "--EPOCHS", str(epochs), device="cuda")
    wait_for_epochs(process, workdir / "logs" / "training_log.csv", 2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert len(read_csv(workdir / "logs" / "training_log.csv")) - 1 < epochs

    same_precision = lvm.amp_name(lvm.resolve_amp("auto", CUDA))  # so that only the device differs
    message = stop_message(lambda: run_in(lvm, workdir, ["--demo", "--DEVICE", "cpu", "--AMP_DTYPE", same_precision,
                                                         "--EPOCHS", str(epochs), "--resume"]))
    assert "was written with other settings (device): device 'cuda' there, 'cpu' now" in message

    code, out, err = finish(start_demo(workdir, "--EPOCHS", str(epochs), "--resume", device="cuda"))
    assert code == 0, err
    assert "resumed from results/checkpoint.pt: " in out
    assert [int(row[0]) for row in read_csv(workdir / "logs" / "training_log.csv")[1:]] == list(range(1, epochs + 1))
    metrics = json.loads((workdir / "results" / "metrics.json").read_text())
    assert metrics["student"]["dev"]["modality_acc"] > 0.8 and metrics["student"]["dev"]["location_acc"] > 0.6


def run_in(lvm, workdir, argv):
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        return lvm.main(argv)
    finally:
        os.chdir(previous)
