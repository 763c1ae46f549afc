"""What a CPU can check of the GPU path before a GPU is at hand: the wheels tests/gpu_check.sh needs, the NCCL
process group's arguments, the moving average's foreach update, and a training step that never makes the host
wait for the GPU."""

import ast
import copy
import datetime
import importlib.metadata
import inspect
import re
import sys
from pathlib import Path

import torch
from packaging.requirements import Requirement
from torch.overrides import TorchFunctionMode

from conftest import ROOT, make_student
from test_pipeline import case_texts, tiny_split

WHEELS = ROOT / "tests" / "gpu_wheels.txt"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(path) -> set[str]:
    """The top-level name of every absolute import in the file, those inside functions included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


LOCAL = [ROOT, ROOT / "tests"]  # where the project's own modules lie


def code_the_gpu_check_runs() -> set:
    """The two GPU files, the project's modules they import (and those import), and the training script they run."""
    files, todo = set(), [ROOT / "tests" / "test_cuda.py", ROOT / "tests" / "benchmark_gpu.py", ROOT / "light-weight-vlm.py"]
    while todo:
        path = todo.pop()
        if path not in files:
            files.add(path)
            todo += [folder / f"{m}.py" for m in imported_modules(path) for folder in LOCAL if (folder / f"{m}.py").exists()]
    return files


def test_gpu_wheels_are_exactly_what_the_gpu_image_lacks_for_the_check():
    lines = WHEELS.read_text().splitlines()
    image = {canonical(n) for line in lines if line.startswith("# image:") for n in line.split(":", 1)[1].split()}
    wheels = {canonical(Requirement(line).name): Requirement(line) for line in lines if line and not line.startswith("#")}
    assert "torch" in image and all(str(w.specifier).startswith("==") for w in wheels.values())
    local = {p.stem for folder in LOCAL for p in folder.glob("*.py")}
    modules = set().union(*map(imported_modules, code_the_gpu_check_runs())) - set(sys.stdlib_module_names) - local
    owners = importlib.metadata.packages_distributions()
    needed = {canonical(owners[m][0]) for m in modules}
    assert needed - image - set(wheels) == set(), "imported, but neither in the GPU image nor among the wheels"
    assert set(wheels) - needed == set(), "a wheel that nothing the GPU check runs imports"
    assert image.isdisjoint(wheels)
    for name, wheel in wheels.items():  # each pinned version is the one requirements.txt admits, and its own
        assert wheel.specifier.contains(importlib.metadata.version(name)), name  # requirements are there too
        dependencies = [Requirement(r) for r in importlib.metadata.requires(name) or []]
        assert {canonical(r.name) for r in dependencies if not r.marker} <= image | set(wheels), name
    script = (ROOT / "tests" / "gpu_check.sh").read_text()
    assert "-r tests/gpu_wheels.txt" in script and "--python-version 3.12" in script


def test_nccl_group_is_bound_to_its_gpu_and_waits_for_process_zero_apart(lvm, monkeypatch, capsys):
    import transformers.utils.logging
    calls = dict(groups=[])
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.update(set_device=device))
    monkeypatch.setattr(lvm.dist, "init_process_group", lambda backend, **kw: calls.update(init=(backend, kw)))
    monkeypatch.setattr(lvm.dist, "new_group", lambda **kw: calls["groups"].append(kw) or "waiting group")
    monkeypatch.setattr(transformers.utils.logging, "disable_progress_bar", lambda: None)
    monkeypatch.setattr(lvm, "WAIT_FOR_ZERO", [])
    for rank, batch in ((3, 32), (0, 4)):
        monkeypatch.setattr(lvm.dist, "get_rank", lambda group=None, r=rank: r)
        assert lvm.start_processes(lvm.parse_config(["--BATCH_SIZE", str(batch)])) == (torch.device("cuda", 3), rank)
    backend, options = calls["init"]
    assert backend == "nccl" and options["device_id"] == torch.device("cuda", 3) == calls["set_device"]
    assert datetime.timedelta(minutes=5) <= options["timeout"] <= datetime.timedelta(minutes=30)  # a stuck rank
    assert all(g["backend"] == "gloo" and g["timeout"] >= datetime.timedelta(hours=2) for g in calls["groups"])
    assert lvm.WAIT_FOR_ZERO == ["waiting group"] * 2
    warning = capsys.readouterr().err.strip()  # process 0 alone, and only for the batch of 4
    assert warning.startswith("warning: BATCH_SIZE 4 per process: BatchNorm") and "\n" not in warning


def old_moving_average_update(ema, model, step: int, decay: float) -> None:
    """The update before the foreach one: both state dicts rebuilt, then a lerp of the floats, a copy of the rest."""
    weight = min(decay, (1 + step) / (10 + step))
    for a, b in zip(ema.state_dict().values(), model.state_dict().values()):
        a.copy_(torch.lerp(a, b, 1 - weight) if a.is_floating_point() else b)


def test_moving_average_with_foreach_equals_the_old_update(lvm):
    torch.manual_seed(0)
    student = make_student(lvm, 60, image_size=32, backbone_stages=5)
    ema = lvm.MovingAverage(student, 0.99)
    reference = copy.deepcopy(ema.module)
    images, ids, mask = torch.randn(8, 3, 32, 32), torch.randint(1, 60, (8, 6)), torch.ones(8, 6, dtype=torch.long)
    for step in range(15):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p) * 0.01)
            student.train()(images, ids, mask)  # BatchNorm's statistics and batch counters move too
        ema.update()
        old_moving_average_update(reference, student, step, 0.99)
    ours, theirs = ema.module.state_dict(), reference.state_dict()
    assert ours["cnn.0.1.0.num_batches_tracked"] == 15  # the stem's BatchNorm
    assert all(torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-6) for k in ours)


HOST_WAITS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
              torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}
FROM_PYTHON_VALUES = {torch.tensor, torch.as_tensor}


class CallsThatWait(TorchFunctionMode):
    """Records the calls that on a GPU would make the host wait (a value read back) or copy host memory to the
    device: from any code, a read-back, or a tensor made from Python values on a device taken from another tensor
    (a constant rebuilt on the GPU at every call); from the script's own code, any tensor made from Python values
    and any .to() a device. Each as (function, where train_epoch was then, the calling file and function)."""

    def __init__(self, script: str):
        super().__init__()
        self.script, self.calls = script, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        code = sys._getframe(1).f_code
        caller = code.co_filename
        ours = caller == self.script
        moves = func in (torch.Tensor.to, torch.Tensor.cuda) and any(
            isinstance(a, (torch.device, str, torch.Tensor)) for a in (*args[1:], *kwargs.values()))
        built = func in FROM_PYTHON_VALUES and (ours or isinstance(kwargs.get("device"), torch.device))
        if func in HOST_WAITS or built or (ours and moves):
            self.calls.append((func.__name__, training_loop_frame_line(self.script), Path(caller).name, code.co_name))
        return func(*args, **kwargs)


def training_loop_frame_line(script: str) -> int | None:
    """The line train_epoch is at, on the stack now."""
    frame = sys._getframe()
    while frame and not (frame.f_code.co_name == "train_epoch" and frame.f_code.co_filename == script):
        frame = frame.f_back
    return frame.f_lineno if frame else None


def test_a_bf16_training_step_reads_nothing_back_and_copies_only_its_images_to_the_device(lvm):
    """On the CPU under bf16 autocast, with every branch a GPU step takes (case texts, image-only loss, feature
    distillation, EMA): no call from the script's code inside the step's loop that would sync or copy on a GPU, but
    the one copy of each batch's images from the memory-mapped store (to_device: pinned, not waited for)."""
    torch.manual_seed(0)
    data = tiny_split(lvm, n=64, size=32)
    data.case_texts, data.features = case_texts(lvm, n=30), dict(image=torch.randn(64, 12), text=torch.randn(64, 10))
    student = make_student(lvm, 50, image_size=32, backbone_stages=5)
    adapters = lvm.feature_adapters(student, data.features)
    cfg, cpu = lvm.parse_config(["--BATCH_SIZE", "16"]), torch.device("cpu")
    optimizer = torch.optim.AdamW([*student.parameters(), *adapters.parameters()], fused=True)  # as adamw() on a GPU
    distiller = lvm.Distiller(student, adapters, cfg)
    source, start = inspect.getsourcelines(lvm.train_epoch)
    loop = next(n for n in ast.walk(ast.parse("".join(source).strip() + "\n")) if isinstance(n, ast.For))
    inside = range(start + loop.lineno - 1, start + loop.end_lineno)
    with CallsThatWait(lvm.__file__) as recorder:
        lvm.train_epoch(distiller, data, optimizer, None, lvm.grad_scaler(cpu, torch.bfloat16), cfg, cpu,
                        torch.bfloat16, torch.Generator().manual_seed(0), lvm.MovingAverage(student, 0.99))
    end = start + source.index(next(line for line in source if "totals.tolist()" in line))
    assert ("tolist", end, Path(lvm.__file__).name, "train_epoch") in recorder.calls  # the one read-back at the end
    copies = [call for call in recorder.calls if call[1] in inside and call[3] == "to_device"]
    assert [call for call in recorder.calls if call[1] in inside and call not in copies] == []
    images_line = start + source.index(next(line for line in source if "data.pixels(" in line))
    assert copies == [("to", images_line, Path(lvm.__file__).name, "to_device")] * 4  # 64 samples, batches of 16
