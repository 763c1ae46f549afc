"""Bad input, interrupted runs, repeatability and cache staleness."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

import demo
import predict
from conftest import ROOT, demo_dev_data, read_csv, student_meta, write_split

SCRIPT = ROOT / "light-weight-vlm.py"


def stop_message(call) -> str:
    """The one-line message a call stops with."""
    with pytest.raises(SystemExit) as stop:
        call()
    message = str(stop.value)
    assert message.startswith("light-weight-vlm: error: ") and "\n" not in message
    return message


@pytest.fixture
def small_medpix(lvm, tmp_path) -> Path:
    root = tmp_path / "MedPix-2-0"
    demo.make_demo_data(root, seed=0, sizes=dict(train=12, dev=6, test=6))
    return root


# data layout and split files ----------------------------------------------------------


@pytest.mark.parametrize("remove, named", [("", "MedPix-2-0/images"), ("images", "MedPix-2-0/images"),
                                           ("splitted_dataset", "splitted_dataset"),
                                           ("splitted_dataset/descriptions_dev.jsonl", "descriptions_dev.jsonl"),
                                           ("splitted_dataset/data_train.jsonl", "data_train.jsonl"),
                                           ("splitted_dataset/data_test.jsonl", "data_test.jsonl")])
def test_incomplete_data_root_stops_naming_what_is_missing(lvm, small_medpix, remove, named):
    shutil.rmtree(small_medpix / remove) if (small_medpix / remove).is_dir() else (small_medpix / remove).unlink()
    message = stop_message(lambda: lvm.main(["--DATA_ROOT", str(small_medpix), "--CACHE_DIR", str(small_medpix.parent)]))
    assert f"{named} is missing" in message and lvm.MEDPIX_URL in message


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_split_file_stops(lvm, small_medpix, content):
    (small_medpix / "splitted_dataset" / "data_dev.jsonl").write_text(content)
    message = stop_message(lambda: lvm.main(["--DATA_ROOT", str(small_medpix), "--CACHE_DIR", str(small_medpix.parent)]))
    assert message.endswith("data_dev.jsonl: empty, no JSON line in it")


def test_split_without_usable_sample_stops(lvm, small_medpix):
    write_split(small_medpix, "dev", [{"U_id": "X"}], [{"U_id": "X", "image": "x", "Type": None}])
    message = stop_message(lambda: lvm.main(["--DATA_ROOT", str(small_medpix), "--CACHE_DIR", str(small_medpix.parent)]))
    assert message.endswith("descriptions_dev.jsonl: no usable sample in split 'dev'")


@pytest.mark.parametrize("lines, bad_line", [(['{"a": 1}', '{"a": '], 2), (['{"a": 1}', "", "", "[1, 2]"], 4),
                                             (['{"a": 1}', "null"], 2)])
def test_line_that_is_not_a_json_object_names_file_and_line(lvm, tmp_path, lines, bad_line):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert stop_message(lambda: lvm.read_jsonl(path)).startswith(f"light-weight-vlm: error: {path}:{bad_line}: ")


def test_blank_lines_are_skipped_and_line_numbers_stay_true(lvm, tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": "\xc3\xa9"}\n')
    assert lvm.read_jsonl(path) == [(1, {"a": 1}), (3, {"a": "é"})]
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    assert stop_message(lambda: lvm.read_jsonl(path)).startswith(f"light-weight-vlm: error: {path}:2: ")


@pytest.mark.parametrize("change, reason", [
    (dict(image=None), "no image"), (dict(Type=None), "no modality"), (dict(U_id=None), "case None is not"),
    ({"Location Category": None}, "no location"), (dict(Type=""), "no modality"), (dict(Type="  "), "no modality"),
    (dict(Type=3), "no modality"), (dict(image=["a"]), "no image"), (dict(U_id="ELSEWHERE"), "case 'ELSEWHERE' is not")])
def test_record_without_a_usable_field_or_case_is_skipped_and_counted(lvm, tmp_path, capsys, change, reason):
    good = {"Type": "CT", "U_id": "C1", "image": "a", "Location Category": "Head", "Description": {"Caption": "x"}}
    bad = {k: v for k, v in (good | change).items() if v is not None}
    write_split(tmp_path, "train", [{"U_id": "C1"}], [good, bad, good])
    skipped = Counter()
    assert len(lvm.load_split(tmp_path, "train", lvm.parse_config([]), skipped)) == 2
    assert sum(skipped.values()) == 1
    assert f"skipped: {tmp_path / 'splitted_dataset' / 'descriptions_train.jsonl'}:2: {reason}" in capsys.readouterr().out


# images ---------------------------------------------------------------------------------


def png_bytes(tmp_path: Path, side: int = 64) -> bytes:
    Image.effect_noise((side, side), 40).convert("RGB").save(tmp_path / "noise.png")
    return (tmp_path / "noise.png").read_bytes()


@pytest.mark.parametrize("kind", ["missing", "truncated", "not an image", "zero bytes", "huge", "over the warning limit"])
def test_unusable_image_is_skipped_and_counted(lvm, tmp_path, monkeypatch, capsys, kind):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    good.write_bytes(png_bytes(tmp_path, 16))  # 256 pixels: under every limit below
    content = png_bytes(tmp_path)
    writes = {"truncated": content[:len(content) // 2], "not an image": b"<html>not found</html>", "zero bytes": b"",
              "huge": content, "over the warning limit": content}
    if kind in writes:
        bad.write_bytes(writes[kind])
    limits = {"huge": 1000, "over the warning limit": 3000}  # 64 x 64 = 4096 pixels: over 2x, and over 1x only
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limits.get(kind, Image.MAX_IMAGE_PIXELS))
    samples, skipped = [{"image": str(good)}, {"image": str(bad)}], Counter()
    store = lvm.load_images(samples, 16, tmp_path / "cache", skipped)
    assert skipped == Counter({"image unreadable": 1}) and samples[1]["image_row"] is None
    assert samples[0]["image_row"] == 0 and store.shape == (1, 3, 16, 16)
    out = capsys.readouterr().out
    assert out.count(f"skipped: {bad}: ") == 1 and str(good) not in out


def palette_image(alpha: bytes | None) -> Image.Image:
    image = Image.new("P", (40, 30), 0)
    image.putpalette([200, 100, 50])
    if alpha is not None:
        image.info["transparency"] = alpha  # per palette entry, as PNG's tRNS chunk holds it
    return image


@pytest.mark.parametrize("make, fmt, expected", [  # 16 bit: test_pipeline
    (lambda: Image.new("RGB", (40, 30), (200, 100, 50)).convert("CMYK"), "JPEG", (200, 100, 50)),
    (lambda: palette_image(None), "PNG", (200, 100, 50)),
    (lambda: Image.new("1", (40, 30), 1), "PNG", (255, 255, 255)),
    (lambda: Image.new("LA", (40, 30), (120, 255)), "PNG", (120, 120, 120)),
    # half-transparent: laid on black, as a viewer with a black background shows it
    (lambda: Image.new("RGBA", (40, 30), (200, 100, 50, 128)), "PNG", (100, 50, 25)),
    (lambda: Image.new("LA", (40, 30), (120, 128)), "PNG", (60, 60, 60)),
    (lambda: palette_image(b"\x80"), "PNG", (100, 50, 25)),
    (lambda: palette_image(b"\x00"), "PNG", (0, 0, 0)),
], ids=["CMYK", "P", "1", "LA", "RGBA-half", "LA-half", "P-half", "P-clear"])
def test_unusual_image_modes_decode_to_rgb(lvm, tmp_path, make, fmt, expected):
    path = tmp_path / "x.png"  # a MedPix name; the content decides the format
    image = make()
    image.save(path, fmt, **({"transparency": image.info["transparency"]} if "transparency" in image.info else {}))
    decoded = lvm.decode_image(str(path), 16)
    assert decoded.shape == (3, 16, 16) and decoded.dtype == torch.uint8
    tolerance = 8 if fmt == "JPEG" else 1  # lossy, and PIL's rounding of alpha x colour / 255
    assert (decoded.int() - torch.tensor(expected)[:, None, None]).abs().max() <= tolerance


# labels, teachers, command line ------------------------------------------------------------


def test_one_class_train_split_and_unseen_dev_label_stop(lvm, small_medpix, tmp_path):
    descriptions = [json.loads(line) for line in (small_medpix / "splitted_dataset" / "descriptions_train.jsonl")
                    .read_text().splitlines()]
    cases = [json.loads(line) for line in (small_medpix / "splitted_dataset" / "data_train.jsonl").read_text().splitlines()]
    write_split(small_medpix, "train", cases, [d | {"Type": "CT"} for d in descriptions])
    message = stop_message(lambda: lvm.main(["--DATA_ROOT", str(small_medpix), "--CACHE_DIR", str(tmp_path / "c")]))
    assert "one modality class only ('CT')" in message
    write_split(small_medpix, "train", cases, descriptions)
    dev = [json.loads(line) for line in (small_medpix / "splitted_dataset" / "descriptions_dev.jsonl")
           .read_text().splitlines()]
    dev_cases = [json.loads(line) for line in (small_medpix / "splitted_dataset" / "data_dev.jsonl").read_text().splitlines()]
    write_split(small_medpix, "dev", dev_cases, [dev[0] | {"Location Category": "Elbow"}] + dev[1:])
    teachers = tmp_path / "teachers"
    demo.make_demo_teachers(teachers / "clip", teachers / "bert", seed=0)
    message = stop_message(lambda: lvm.main(["--DATA_ROOT", str(small_medpix), "--VISION_TEACHER", str(teachers / "clip"),
                                             "--TEXT_TEACHER", str(teachers / "bert"), "--CACHE_DIR", str(tmp_path / "c")]))
    assert "split 'dev' has location label(s) ['Elbow'] that the train split never has" in message


def test_missing_or_incomplete_model_folder_stops_naming_the_setting(lvm, tmp_path):
    from transformers import AutoModel
    message = stop_message(lambda: lvm.load_pretrained(AutoModel, str(tmp_path / "no_model"), "TEXT_TEACHER"))
    assert f"cannot load TEXT_TEACHER='{tmp_path / 'no_model'}'" in message
    demo.make_demo_teachers(tmp_path / "clip", tmp_path / "bert", seed=0)
    for weights in (tmp_path / "bert").glob("model.safetensors"):
        weights.unlink()
    message = stop_message(lambda: lvm.load_pretrained(AutoModel, str(tmp_path / "bert"), "TEXT_TEACHER"))
    assert f"cannot load TEXT_TEACHER='{tmp_path / 'bert'}'" in message and "local model folder" in message


def test_unreachable_hub_id_without_local_copy_stops_with_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))  # no network, empty hub cache
    code = ("import importlib.util; spec = importlib.util.spec_from_file_location('lvm', r'%s'); "
            "lvm = importlib.util.module_from_spec(spec); spec.loader.exec_module(lvm); "
            "from transformers import AutoModel; lvm.load_pretrained(AutoModel, 'nobody/no-such-model', 'TEXT_TEACHER')"
            % SCRIPT)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("light-weight-vlm: error: cannot load TEXT_TEACHER='nobody/no-such-model'")


@pytest.mark.parametrize("device, expected", [
    ("cuda", "DEVICE='cuda', but CUDA is not available here (torch "), ("gpu", "DEVICE='gpu' is not a device"),
    ("mps", "DEVICE='mps': only cpu and cuda are supported")])
def test_a_device_this_machine_lacks_stops_with_one_line(tmp_path, device, expected):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, even on a machine that has one
    done = subprocess.run([sys.executable, str(SCRIPT), "--demo", "--DEVICE", device], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"light-weight-vlm: error: {expected}")
    assert not (tmp_path / "cache").exists()  # stopped before any work


@pytest.mark.parametrize("argv, expected", [(["--EPOCHS", "-3"], "--EPOCHS must be > 0, got -3"),
                                            (["--PRUNE_AMOUNT", "1"], "--PRUNE_AMOUNT must be in [0, 1), got 1.0"),
                                            (["--KD_ALPHA", "(-0.1, 0.5)"],
                                             "--KD_ALPHA must be a tuple of 2 weights in [0, 1], one per task of TASKS ('modality', 'location'), got (-0.1, 0.5)"),
                                            (["--EPOCH", "3"], "unrecognized arguments: --EPOCH 3"),
                                            (["--learning-rate", "3"], "unrecognized arguments: --learning-rate 3"),
                                            (["--AMP_DTYPE", "float16"],
                                             "--AMP_DTYPE must be one of auto, bf16, fp16, fp32, got 'float16'")])
def test_bad_command_line_stops_with_usage_and_one_error_line(lvm, capsys, argv, expected):
    with pytest.raises(SystemExit) as stop:
        lvm.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 2 and lines[0].startswith("usage: ")
    assert lines[1] == f"light-weight-vlm.py: error: {expected}"


def small_run(lvm, tmp_path: Path, root: Path, *settings: str) -> dict:
    """A whole run of one short epoch on small data with tiny teachers; every output under tmp_path."""
    demo.make_demo_teachers(tmp_path / "clip", tmp_path / "bert", seed=0)
    out = [a for k in ("CACHE_DIR", "LOG_DIR", "RESULTS_DIR") for a in (f"--{k}", str(tmp_path / k))]
    return lvm.main(["--DATA_ROOT", str(root), "--VISION_TEACHER", str(tmp_path / "clip"), "--TEXT_TEACHER",
                     str(tmp_path / "bert"), "--IMAGE_SIZE", "32", "--EPOCHS", "1", "--HEAD_EPOCHS", "5",
                     "--PRUNE_FINETUNE_EPOCHS", "0", *out, *settings])


def test_skips_are_counted_printed_and_stored_by_a_whole_run(lvm, tmp_path, capsys):
    root = tmp_path / "MedPix-2-0"
    demo.make_demo_data(root, seed=0, sizes=dict(train=60, dev=15))
    descriptions = root / "splitted_dataset" / "descriptions_train.jsonl"
    records = [json.loads(line) for line in descriptions.read_text().splitlines()]
    records[0]["Type"] = None
    records[1]["U_id"] = "NO_SUCH_CASE"
    (root / "images" / f"{records[2]['image']}.png").unlink()
    (root / "images" / f"{records[3]['image']}.png").write_bytes(b"")
    descriptions.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    metrics = small_run(lvm, tmp_path, root)
    expected = {"case not in the data file": 1, "row without an image or a label": 1, "image unreadable": 2}
    assert metrics["skipped"] == expected
    assert json.loads((tmp_path / "RESULTS_DIR" / "metrics.json").read_text())["skipped"] == expected
    last_lines = capsys.readouterr().out.strip().splitlines()[-2:]
    assert last_lines[0] == ("skipped: 1 case not in the data file, 1 row without an image or a label, "
                             "2 image unreadable")


@pytest.mark.parametrize("without", ["vision", "text"])
def test_a_whole_run_with_a_one_tower_teacher_writes_every_output(lvm, tmp_path, without):
    root = tmp_path / "MedPix-2-0"
    demo.make_demo_data(root, seed=0, sizes=dict(train=60, dev=15))
    settings = dict(vision=["--VISION_TEACHER", "None"],
                    text=["--TEXT_TEACHER", "None", "--TOKENIZER", str(tmp_path / "bert")])[without]
    metrics = small_run(lvm, tmp_path, root, *settings)
    stores = {store.name.split("-")[0] for store in (tmp_path / "CACHE_DIR").iterdir() if store.suffix in (".pt", ".u8")}
    assert stores == {"images", dict(vision="text", text="vision")[without]}  # features of the one tower only
    results, logs = tmp_path / "RESULTS_DIR", tmp_path / "LOG_DIR"
    models = ["lightweight_vlm.pth", "lightweight_vlm.onnx", "lightweight_vlm_int8.onnx"]
    assert sorted(p.name for p in results.iterdir()) == sorted(models + [
        "checkpoint.pt", "metrics.json", "report.md", "learning_curves.png", "calibration.png",
        "confusion_modality.png", "confusion_location.png"])
    assert sorted(p.name for p in logs.iterdir()) == sorted(["teacher.csv", "training_log.csv", "pruning.csv",
                                                             "confusion_modality_epoch_1.csv",
                                                             "confusion_location_epoch_1.csv"])
    for file in models:
        assert set(student_meta(lvm, results / file)["temperature"]) == set(lvm.TASKS), file
    saved = json.loads((results / "metrics.json").read_text())
    assert all(saved[name]["dev"] == metrics[name]["dev"] for name in ("student", "student_onnx_int8"))


# interrupted runs and repeatability -------------------------------------------------------


def start_demo(workdir: Path, *extra: str, device: str = "cpu", env: dict | None = None) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, str(SCRIPT), "--demo", "--DEVICE", device, *extra], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def wait_for_epochs(process: subprocess.Popen, log: Path, epochs: int) -> None:
    """Block until the training log has this many epochs (the run must still be going)."""
    deadline = time.time() + 240
    while not (log.exists() and len(read_csv(log)) > epochs):
        assert process.poll() is None and time.time() < deadline, "the run ended before the epochs came"
        time.sleep(0.02)


def without_seconds(rows: list[list[str]]) -> list[list[str]]:
    column = rows[0].index("seconds")
    return [row[:column] + row[column + 1:] for row in rows]


def without_timings(metrics: dict) -> dict:
    """metrics.json less its wall-clock numbers, after checking that they are there."""
    assert metrics.pop("seconds") > 0
    assert all(v["batch1_ms"] > 0 and v["batch32_per_s"] > 0 for v in metrics.pop("speed").values())
    return metrics


def assert_same_outputs(lvm, a: Path, b: Path) -> None:
    """Two runs' logs, metrics and models agree (wall-clock seconds apart)."""
    assert without_seconds(read_csv(a / "logs" / "training_log.csv")) == \
        without_seconds(read_csv(b / "logs" / "training_log.csv"))
    names = sorted(p.name for p in (a / "logs").iterdir())
    assert names == sorted(p.name for p in (b / "logs").iterdir())
    for name in names:
        if name != "training_log.csv":
            assert (a / "logs" / name).read_text() == (b / "logs" / name).read_text(), name
    metrics = [without_timings(json.loads((w / "results" / "metrics.json").read_text())) for w in (a, b)]
    assert metrics[0] == metrics[1]
    float_a, meta = lvm.load_student(a / "results" / "lightweight_vlm.pth")
    float_b, _ = lvm.load_student(b / "results" / "lightweight_vlm.pth")
    assert all(torch.equal(x, y) for x, y in zip(float_a.state_dict().values(), float_b.state_dict().values()))
    data, cpu = demo_dev_data(lvm, a, meta), torch.device("cpu")
    int8 = [lvm.predict(lvm.OnnxStudent(w / "results" / "lightweight_vlm_int8.onnx"), data, cpu) for w in (a, b)]
    assert all(torch.equal(x, y) for x, y in zip(*int8))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    code, out, err = finish(start_demo(workdir))
    assert code == 0, err
    return workdir


def test_two_runs_with_the_same_seed_give_identical_logs_and_predictions(lvm, uninterrupted, demo_run):
    workdir, _ = demo_run  # the same command, run in-process
    assert_same_outputs(lvm, uninterrupted, workdir)


@pytest.mark.parametrize("stage", ["training", "pruning"])
def test_killed_then_resumed_ends_as_if_never_stopped(lvm, uninterrupted, tmp_path, stage):
    workdir = tmp_path / "killed"
    process = start_demo(workdir)
    log, checkpoint = workdir / "logs" / "training_log.csv", workdir / "results" / "checkpoint.pt"
    if stage == "training":
        wait_for_epochs(process, log, 2)
        while not checkpoint.exists() or checkpoint.stat().st_mtime_ns < log.stat().st_mtime_ns:
            time.sleep(0.02)  # the second epoch's checkpoint, saved after its log row, is not there yet: a kill while
            # it is written would leave its temporary file, which no later run can tell from another run's
        time.sleep(0.2)  # into the third epoch
    else:  # kill as soon as the pruned student's row is written: the recovery fine-tune has just begun, and the
        # next write (its epoch's row) is a training epoch away
        pruning = workdir / "logs" / "pruning.csv"
        while not (pruning.exists() and len(read_csv(pruning)) >= 3):  # header, the float check, the pruned one
            assert process.poll() is None, "the run ended before pruning began"
            time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert (len(read_csv(log)) - 1 < lvm.DEMO["EPOCHS"]) == (stage == "training")
    assert stage == "training" or len(read_csv(workdir / "logs" / "pruning.csv")) == 3  # killed inside the recovery
    assert not (workdir / "results" / "metrics.json").exists()

    code, out, err = finish(start_demo(workdir, "--resume"))
    assert code == 0, err
    assert "resumed from results/checkpoint.pt: " in out
    epochs = [int(row[0]) for row in read_csv(log)[1:]]
    assert epochs == list(range(1, lvm.DEMO["EPOCHS"] + 1))  # each epoch exactly once
    assert_same_outputs(lvm, uninterrupted, workdir)
    assert not list(workdir.rglob(".*.tmp"))


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(lvm, tmp_path):
    workdir = tmp_path / "interrupted"
    process = start_demo(workdir, "--SEED", "7")
    wait_for_epochs(process, workdir / "logs" / "training_log.csv", 2)
    process.send_signal(signal.SIGINT)
    code, out, err = finish(process)
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "interrupted. Finished stages are kept (caches in cache/, finished epochs in results/checkpoint.pt); "
        "continue with: python light-weight-vlm.py --demo --DEVICE cpu --SEED 7 --resume")
    checkpoint = torch.load(workdir / "results" / "checkpoint.pt", weights_only=False)
    assert checkpoint["progress"]["epoch"] >= 1  # the log of epoch 2 is written just before its checkpoint
    assert not list(workdir.rglob(".*.tmp"))

    previous = os.getcwd()
    os.chdir(workdir)
    try:
        message = stop_message(lambda: lvm.main(["--demo", "--DEVICE", "cpu", "--SEED", "7", "--EPOCHS", "9",
                                                 "--resume"]))
        assert "results/checkpoint.pt was written with other settings (EPOCHS)" in message
        Path("results/checkpoint.pt").write_bytes(b"truncated")
        message = stop_message(lambda: lvm.main(["--demo", "--DEVICE", "cpu", "--SEED", "7", "--resume"]))
        assert "results/checkpoint.pt: unreadable checkpoint" in message
    finally:
        os.chdir(previous)


# caches ----------------------------------------------------------------------------------


def test_changed_text_or_teacher_recomputes_only_what_changed(lvm, tmp_path, monkeypatch):
    demo.make_demo_teachers(tmp_path / "clip", tmp_path / "bert", seed=0)
    cfg = lvm.parse_config(["--VISION_TEACHER", "None", "--TEXT_TEACHER", str(tmp_path / "bert"),
                            "--CACHE_DIR", str(tmp_path / "cache")])
    teacher = lvm.load_teacher(cfg)
    computed = []
    original = lvm.text_features
    monkeypatch.setattr(lvm, "text_features", lambda model, tok, texts, *a: computed.append(list(texts)) or
                        original(model, tok, texts, *a))
    cpu = torch.device("cpu")
    samples = [{"image_key": "a", "text": "ct of the head"}, {"image_key": "b", "text": "mri of the knee"}]
    first = lvm.teacher_features(samples, teacher, cfg, cpu, None)["text"]
    samples[1]["text"] = "mri of the spine"  # the split file changed this caption
    second = lvm.teacher_features(samples, teacher, cfg, cpu, None)["text"]
    assert computed == [["ct of the head", "mri of the knee"], ["mri of the spine"]]
    assert torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1])

    shutil.copytree(tmp_path / "bert", tmp_path / "other")  # another teacher: same files, then new weights
    other = lvm.parse_config(["--VISION_TEACHER", "None", "--TEXT_TEACHER", str(tmp_path / "other"),
                              "--CACHE_DIR", str(tmp_path / "cache")])
    lvm.teacher_features(samples, teacher, other, cpu, None)
    assert len(computed) == 2  # identical bytes: the same teacher, the same cache entries
    with torch.no_grad():
        teacher["text"].get_input_embeddings().weight.mul_(2)
    teacher["text"].save_pretrained(tmp_path / "other")
    changed = lvm.teacher_features(samples, teacher, other, cpu, None)["text"]
    assert computed[2] == ["ct of the head", "mri of the spine"] and not torch.equal(changed, second)


def test_a_store_saved_by_another_process_meanwhile_keeps_its_entries(lvm, tmp_path):
    path = tmp_path / "store.pt"

    def compute(keys):  # meanwhile, another run saves its own entry to the same store
        torch.save({"theirs": torch.tensor(7.0)}, path)
        return {k: torch.tensor(1.0) for k in keys}

    store = lvm.cached(path, ["a", "b"], compute, save_every=1)
    assert set(store) == {"a", "b", "theirs"}
    assert set(torch.load(path, weights_only=True)) == {"a", "b", "theirs"}


def test_two_runs_started_at_once_in_one_folder_both_finish(lvm, tmp_path):
    """Two demo runs sharing the data, teacher and cache folders, as in a small sweep (once: a crash when both
    renamed the same temporary cache file)."""
    one_thread = dict(os.environ, OMP_NUM_THREADS="1")  # two runs on two cores
    runs = [start_demo(tmp_path, "--RESULTS_DIR", f"results{i}", "--LOG_DIR", f"logs{i}", env=one_thread) for i in (1, 2)]
    for process in runs:
        code, _, err = finish(process)
        assert code == 0, err
    metrics = [without_timings(json.loads((tmp_path / f"results{i}" / "metrics.json").read_text())) for i in (1, 2)]
    assert metrics[0] == metrics[1]  # same seed, same run
    assert not list(tmp_path.rglob(".*.tmp")) and not list((tmp_path / "cache" / "demo").glob(".*"))
    root = tmp_path / lvm.DEMO["DATA_ROOT"]
    samples = {split: lvm.load_split(root, split, lvm.parse_config([]), Counter()) for split in lvm.SPLITS}
    texts = {s["text"] for split in samples.values() for s in split}
    texts |= {t["text"] for t in lvm.load_case_texts(root, lvm.CASE_TEXTS, samples["train"], lvm.TASKS)[0]}
    expected = dict(images=318, vision=318, text=len(texts))  # each image and each distinct text once
    stores = {store.name.split("-")[0]: len(torch.load(store, weights_only=True))
              for store in (tmp_path / "cache").glob("*.pt")}
    stores |= {store.name.split("-")[0]: store.stat().st_size // (3 * 64 * 64) for store in (tmp_path / "cache").glob(
        "images-*.u8")}  # the image store's rows (demo: 64 px)
    assert [len(store.read_text().split()) for store in (tmp_path / "cache").glob("images-*.keys")] == [318]
    assert stores == expected and len(texts) > 100


# files that hold code ---------------------------------------------------------------------


class RunsCode:
    """Pickled, this is a command that a full unpickling (torch.load with weights_only=False) runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted(path: Path, marker: Path, key: str) -> Path:
    torch.save({key: RunsCode(marker)}, path)
    torch.load(path, weights_only=False)  # the file really is harmful: a full load runs the command ...
    assert marker.exists()
    marker.unlink()  # ... and the script must not
    return path


@pytest.mark.parametrize("name", ["evil.pth", "evil.onnx"])
def test_a_model_file_that_holds_code_is_refused_and_runs_nothing(lvm, tmp_path, capsys, name):
    marker = tmp_path / "ran"
    model = crafted(tmp_path / name, marker, "student")
    Image.new("RGB", (20, 20)).save(tmp_path / "x.png")
    with pytest.raises(SystemExit) as stop:
        predict.main(["--model", str(model), "--image", str(tmp_path / "x.png")])
    refusal = "is a PyTorch file" if name.endswith(".pth") else f"{name}: not a light-weight-vlm student file"
    assert stop.value.code == 2 and refusal in capsys.readouterr().err
    with pytest.raises(pickle.UnpicklingError):
        lvm.load_student(model)  # the training script's own reader of .pth files
    assert not marker.exists()


def test_a_checkpoint_or_cache_that_holds_code_is_refused_and_runs_nothing(lvm, tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "results").mkdir()
    crafted(tmp_path / "results" / "checkpoint.pt", marker, "settings")
    previous = os.getcwd()
    os.chdir(tmp_path)
    try:
        message = stop_message(lambda: lvm.main(["--demo", "--DEVICE", "cpu", "--resume"]))
    finally:
        os.chdir(previous)
    assert "results/checkpoint.pt: unreadable checkpoint (UnpicklingError)" in message and not marker.exists()
    store = crafted(tmp_path / "store.pt", marker, "a")
    assert lvm.cached(store, ["a"], lambda keys: {k: torch.zeros(1) for k in keys})["a"].shape == (1,)  # rebuilt
    assert not marker.exists()


@pytest.mark.parametrize("setting", ["--BACKBONE_WEIGHTS", "--VISION_TEACHER"])
def test_a_weights_file_that_holds_code_is_refused_and_runs_nothing(lvm, tmp_path, setting):
    marker = tmp_path / "ran"
    weights = crafted(tmp_path / "evil.pth", marker, "_conv_stem.weight")
    previous = os.getcwd()
    os.chdir(tmp_path)
    try:
        message = stop_message(lambda: lvm.main(["--demo", "--DEVICE", "cpu", "--EPOCHS", "1", setting, str(weights)]))
    finally:
        os.chdir(previous)
    assert "evil.pth: not a readable EfficientNet-Lite0 weights file (UnpicklingError)" in message
    assert not marker.exists()


def test_an_onnx_file_that_refers_to_data_elsewhere_is_refused(lvm, demo_run, tmp_path, capsys, monkeypatch):
    import onnx
    workdir, _ = demo_run
    monkeypatch.chdir(tmp_path)  # where the data it refers to lies
    model = onnx.load(workdir / "results" / "lightweight_vlm.onnx")
    onnx.save_model(model, tmp_path / "split.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    Image.new("RGB", (20, 20)).save(tmp_path / "x.png")
    with pytest.raises(SystemExit) as stop:
        predict.main(["--model", str(tmp_path / "split.onnx"), "--image", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "split.onnx: not a light-weight-vlm student file" in err and err.count("\n") == 1
    assert "External data path" in err  # refused for what it refers to, found beside it or not
