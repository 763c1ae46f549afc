"""predict.py, the deployment program: the demo run's student files in ONNX Runtime on what hospitals hold (DICOM
compressed, multi-frame, colour, palette, without preamble or pixels; folders, symlinks, globs), the same answer
whatever the batch, the training's preprocessing to the pixel, exit codes and tables that scripts can trust, heat
maps, and no PyTorch. The DICOM files are the ones pydicom ships inside its wheel."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, pixel_array

import predict
from conftest import ROOT, demo_dev_data

PREDICT = ROOT / "predict.py"
TRAINING_ONLY = ("torch", "torchvision", "transformers", "timm", "sklearn", "onnx")


def dicom(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path, f"{name} is not in this pydicom wheel"
    return path


@pytest.fixture(scope="module")
def results(demo_run) -> Path:
    return demo_run[0] / "results"


def run(args: list[str], capsys) -> tuple[int, list[dict], list[str]]:
    """predict.py's main in-process: exit code, the JSON rows printed, the stderr lines."""
    try:
        code = predict.main([str(a) for a in args])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, [json.loads(line) for line in out.splitlines()], err.splitlines()


def demo_samples(lvm, workdir: Path, n: int, split: str = "dev") -> list[dict]:
    return lvm.load_split(workdir / lvm.DEMO["DATA_ROOT"], split, lvm.parse_config(["--demo"]), Counter())[:n]


# DICOM ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, refusal", [
    ("CT_small.dcm", None),
    ("MR_small.dcm", None),
    ("MR_small_RLE.dcm", None),
    ("MR_small_jp2klossless.dcm", None),
    ("JPEGLSNearLossless_16.dcm", None),
    ("JPGExtended.dcm", None),  # 12-bit JPEG
    ("SC_rgb_rle_2frame.dcm", None),
    ("examples_palette.dcm", None),
    ("JPEG-lossy.dcm", "Unable to decode"),  # its JPEG stream is damaged: no installed plugin decodes it
    ("MR_truncated.dcm", "The number of bytes of pixel data is less than expected"),
    ("rtplan.dcm", "no pixel data (RT Plan Storage)"),
    ("test-SR.dcm", "no pixel data (Comprehensive SR Storage)"),
])
def test_each_dicom_test_file_named_is_answered_or_refused_with_one_line(results, tmp_path, capsys, name, refusal):
    copy = tmp_path / "scan"  # no extension: DICOM is told by content
    shutil.copy(dicom(name), copy)
    code, rows, err = run(["--model", results / "lightweight_vlm_int8.onnx", "--image", copy], capsys)
    header = pydicom.dcmread(copy)
    if refusal is None:
        assert code == 0 and err == [] and len(rows) == 1 and rows[0]["image"] == str(copy)
        assert rows[0]["dicom_modality"] == header.get("Modality")  # reported beside the answer, never read by it
        assert rows[0]["frame"] == int(header.get("NumberOfFrames") or 1) // 2 and rows[0]["error"] is None
        return
    assert code == predict.NOTHING_RAN and rows[0]["error"] and refusal in rows[0]["error"]
    assert err[0].startswith(f"predict.py: skipped {copy}: ") and refusal in err[0] and len(err) == 2


def test_lossless_compressions_of_one_scan_give_the_same_input():
    plain = predict.read_dicom(dicom("MR_small.dcm"), 64, None, "middle", bare=False)[0]["image"]
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"):
        assert np.array_equal(predict.read_dicom(dicom(name), 64, None, "middle", bare=False)[0]["image"], plain)


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's LINEAR VOI function (PS3.3 C.11.2.1.2), to 0..255: written out from the standard."""
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    y = ((values - (center - 0.5)) / (width - 1) + 0.5)
    return np.round(np.where(values <= low, 0, np.where(values > high, 1, y)) * 255)


def test_a_ct_is_windowed_in_hounsfield_units_after_its_rescale():
    path = dicom("CT_small.dcm")  # stored values with RescaleIntercept -1024: HU = stored - 1024
    hounsfield = pixel_array(path).astype(float) - 1024
    for center, width in ((40, 400), (-600, 1500)):  # soft tissue, lung
        shown = predict.read_dicom(path, 128, (center, width), "middle", bare=False)[0]["image"]  # own size: no resampling
        assert np.array_equal(shown[..., 0], shown[..., 2])
        assert np.abs(shown[..., 0].astype(float) - linear_window(hounsfield, center, width)).max() <= 1
    assert not np.array_equal(predict.read_dicom(path, 128, (1000, 400), "middle", bare=False)[0]["image"][..., 0],
                              linear_window(pixel_array(path).astype(float), 1000, 400))  # the rescale matters


def test_the_files_own_window_is_used_and_window_on_the_command_line_replaces_it(results, tmp_path, capsys):
    path = dicom("MR_small.dcm")  # Window Center 600, Width 1600; no rescale
    raw = pixel_array(path).astype(float)
    own = predict.read_dicom(path, 64, None, "middle", bare=False)[0]["image"][..., 0]
    assert np.abs(own - linear_window(raw, 600, 1600)).max() <= 1
    assert predict.parse_args(["--image", "a.dcm", "--window", "-600,1500"]).window == (-600, 1500)
    shown = []
    monkey = pytest.MonkeyPatch()
    draw = predict.draw_explanation
    monkey.setattr(predict, "draw_explanation", lambda image, *a: shown.append(image) or draw(image, *a))
    try:
        for window in (["--window", "300,200"], []):
            code, _, _ = run(["--model", results / "lightweight_vlm_int8.onnx", "--image", path, *window,
                              "--explain", tmp_path], capsys)
            assert code == 0
    finally:
        monkey.undo()
    assert np.abs(shown[0][..., 0] - linear_window(raw, 300, 200)).max() <= 1 and np.array_equal(shown[1][..., 0], own)


def test_a_dicom_without_a_window_is_stretched_over_its_percentiles():
    path = dicom("CT_small.dcm")  # no window in the file
    raw = pixel_array(path).astype(float)
    grey = predict.read_dicom(path, 128, None, "middle", bare=False)[0]["image"][..., 0]
    assert 0.004 <= (grey == 0).mean() <= 0.05 and 0.004 <= (grey == 255).mean() <= 0.05
    assert np.all(np.diff(grey.ravel()[np.argsort(raw.ravel(), kind="stable")].astype(int)) >= 0)


def test_monochrome1_is_inverted(tmp_path):
    header = pydicom.dcmread(dicom("MR_small.dcm"))
    header.PhotometricInterpretation = "MONOCHROME1"  # the same values, shown white on black
    header.save_as(tmp_path / "inverted.dcm")
    normal = predict.read_dicom(dicom("MR_small.dcm"), 64, None, "middle", bare=False)[0]["image"]
    assert np.array_equal(predict.read_dicom(str(tmp_path / "inverted.dcm"), 64, None, "middle", bare=False)[0]["image"],
                          255 - normal)


def test_colour_dicom_keeps_its_colours_and_each_frame_can_be_asked_for():
    path = dicom("SC_rgb_rle_2frame.dcm")  # two 100 x 100 RGB frames
    frames = predict.read_dicom(path, 100, None, "all", bare=False)
    assert [f["frame"] for f in frames] == [0, 1]
    for f in frames:
        assert np.array_equal(f["image"], pixel_array(path, index=f["frame"]))
    assert [f["frame"] for f in predict.read_dicom(path, 100, None, "middle", bare=False)] == [1]
    ybr = predict.read_dicom(dicom("SC_rgb_dcmtk_+eb+cy+np.dcm"), 100, None, "middle", bare=False)[0]["image"]
    rgb = predict.read_dicom(dicom("SC_rgb_rle.dcm"), 100, None, "middle", bare=False)[0]["image"]  # same picture
    assert np.abs(ybr.astype(float) - rgb.astype(float)).mean() < 8  # YBR converted (only JPEG's loss remains)


def test_palette_colour_goes_through_its_lookup_table():
    path = dicom("examples_palette.dcm")  # 8-bit indices into 16-bit red, green and blue tables, 800 x 350
    ds = pydicom.dcmread(path)
    shown = predict.read_dicom(path, 128, None, "middle", bare=False)[0]["image"]
    colours = np.round(apply_color_lut(pixel_array(ds), ds) / 65535 * 255).astype(np.uint8)
    assert np.array_equal(shown, predict.resize_square(Image.fromarray(colours), 128))
    assert len(np.unique(shown.reshape(-1, 3), axis=0)) > 16  # colours, not grey
    indices = predict.resize_square(Image.fromarray(pixel_array(ds)).convert("RGB"), 128)
    assert not np.array_equal(shown, indices)  # not the raw indices


def test_dicom_saved_without_its_preamble_is_still_dicom(results, tmp_path, capsys):
    (tmp_path / "bare").write_bytes(Path(dicom("CT_small.dcm")).read_bytes()[132:])  # no preamble, no "DICM"
    (tmp_path / "noise").write_bytes(b"\x08\x00\x05\x00" + bytes(200))  # looks like one at first, is not
    code, rows, err = run(["--model", results / "lightweight_vlm_int8.onnx", "--image", tmp_path / "bare"], capsys)
    assert code == 0 and rows[0]["dicom_modality"] == "CT" and err == []
    with_preamble = predict.read_dicom(dicom("CT_small.dcm"), 64, None, "middle", bare=False)[0]["image"]
    assert np.array_equal(predict.read_dicom(str(tmp_path / "bare"), 64, None, "middle", bare=True)[0]["image"],
                          with_preamble)
    code, rows, err = run(["--model", results / "lightweight_vlm_int8.onnx", "--image", tmp_path / "noise"], capsys)
    assert code == 2 and rows[0]["error"] == "neither an image nor a DICOM file"


def test_body_part_and_modality_of_the_header_are_reported(results, tmp_path, capsys):
    header = pydicom.dcmread(dicom("CT_small.dcm"))
    header.BodyPartExamined = "CHEST"
    header.save_as(tmp_path / "chest.dcm")
    header.BodyPartExamined = ["CHEST", "ABDOMEN"]  # two values
    header.save_as(tmp_path / "two.dcm")
    code, rows, _ = run(["--model", results / "lightweight_vlm_int8.onnx", "--image", tmp_path / "chest.dcm",
                         tmp_path / "two.dcm", dicom("JPGExtended.dcm"), dicom("MR_small.dcm")], capsys)
    assert code == 0
    assert [(r["dicom_modality"], r["dicom_body_part"]) for r in rows] == [("CT", "CHEST"), ("CT", "CHEST\\ABDOMEN"), (
        pydicom.dcmread(dicom("JPGExtended.dcm")).Modality, "WHOLE BODY"), ("MR", None)]


# inputs and outputs ------------------------------------------------------------------------


def test_a_folder_mixing_images_dicom_and_junk_is_read_in_order(lvm, demo_run, results, tmp_path, capsys):
    pngs = [s["image"] for s in demo_samples(lvm, demo_run[0], 2)]
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    shutil.copy(pngs[0], tmp_path / "a.png")
    shutil.copy(dicom("CT_small.dcm"), tmp_path / "b" / "IM0001")
    shutil.copy(dicom("SC_rgb_rle_2frame.dcm"), tmp_path / "b" / "deeper" / "IM0002")
    shutil.copy(pngs[1], tmp_path / "b" / "deeper" / "z.jpeg")  # a PNG whatever its name says
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "DICOMDIR.bak").write_bytes(b"\0" * 300)
    shutil.copy(dicom("rtplan.dcm"), tmp_path / "b" / "plan.dcm")  # DICOM without pixels: ignored in a folder
    shutil.copy(dicom("test-SR.dcm"), tmp_path / "b" / "report.dcm")
    model = ["--model", results / "lightweight_vlm_int8.onnx"]
    code, rows, err = run(model + ["--image", tmp_path, "--frames", "all"], capsys)
    names = [(Path(r["image"]).relative_to(tmp_path).as_posix(), r["frame"]) for r in rows]
    assert names == [("a.png", None), ("b/IM0001", 0), ("b/deeper/IM0002", 0), ("b/deeper/IM0002", 1),
                     ("b/deeper/z.jpeg", None)]
    assert code == 0 and err == ["predict.py: ignored 4 file(s) that are neither images nor DICOM with pixels"]
    code, globbed, _ = run(model + ["--image", tmp_path / "**" / "IM*"], capsys)
    assert code == 0 and [Path(r["image"]).name for r in globbed] == ["IM0001", "IM0002"]
    code, _, err = run(model + ["--image", tmp_path / "b" / "plan.dcm", tmp_path / "a.png"], capsys)  # named: refused
    assert code == predict.SOME_UNREADABLE and err[0] == f"predict.py: skipped {tmp_path / 'b' / 'plan.dcm'}: " \
                                                         f"no pixel data (RT Plan Storage)"


def test_symlinked_folders_are_followed_once_and_an_empty_glob_is_reported(lvm, demo_run, results, tmp_path, capsys):
    png = demo_samples(lvm, demo_run[0], 1)[0]["image"]
    (tmp_path / "real").mkdir()
    shutil.copy(png, tmp_path / "real" / "scan.png")
    (tmp_path / "top").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "top" / "linked")
    os.symlink(tmp_path / "real", tmp_path / "real" / "loop")  # a folder that holds itself
    model = ["--model", results / "lightweight_vlm_int8.onnx"]
    code, rows, err = run(model + ["--image", tmp_path / "top"], capsys)
    assert code == 0 and [r["image"] for r in rows] == [str(tmp_path / "top" / "linked" / "scan.png")]
    code, rows, err = run(model + ["--image", str(tmp_path / "real" / "**" / "*.png"), str(tmp_path / "none*.png")],
                          capsys)
    assert [r["image"] for r in rows] == [str(tmp_path / "real" / "scan.png"), str(tmp_path / "none*.png")]
    assert code == predict.SOME_UNREADABLE and rows[1]["error"] == "no file matches this pattern"
    assert err[0] == f"predict.py: skipped {tmp_path / 'none*.png'}: no file matches this pattern"
    (tmp_path / "empty").mkdir()
    code, rows, err = run(model + ["--image", tmp_path / "empty", tmp_path / "top"], capsys)
    assert code == predict.SOME_UNREADABLE and rows[0]["error"] == "an empty folder" and rows[1]["error"] is None


def test_exit_codes_and_a_row_for_every_unreadable_input(lvm, demo_run, results, tmp_path, capsys):
    good = demo_samples(lvm, demo_run[0], 1)[0]["image"]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    model = ["--model", results / "lightweight_vlm_int8.onnx"]
    assert run(model + ["--image", good], capsys)[0] == predict.ANSWERED == 0
    code, rows, err = run(model + ["--image", tmp_path / "missing.png", good, tmp_path / "bad.png",
                                   "--output", tmp_path / "rows.csv"], capsys)
    assert code == predict.SOME_UNREADABLE == 1 and rows == []
    assert err == [f"predict.py: skipped {tmp_path / 'missing.png'}: No such file or directory",
                   f"predict.py: skipped {tmp_path / 'bad.png'}: neither an image nor a DICOM file",
                   "predict.py: 2 of 3 input(s) could not be read (each named above); 1 answered"]
    with open(tmp_path / "rows.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["image"], r["error"], r["modality"] != "") for r in table] == [
        (str(tmp_path / "missing.png"), "No such file or directory", False), (good, "", True),
        (str(tmp_path / "bad.png"), "neither an image nor a DICOM file", False)]
    code, rows, err = run(model + ["--image", tmp_path / "bad.png"], capsys)
    assert code == predict.NOTHING_RAN == 2 and err[-1].startswith("predict.py: error: no image answered")
    for args, message in (
            (["--model", results / "none.onnx", "--image", good], "none.onnx: no such model file"),
            (["--model", results / "lightweight_vlm.pth", "--image", good],
             f"lightweight_vlm.pth is a PyTorch file; predict.py runs the .onnx students: --model "
             f"{results / 'lightweight_vlm_int8.onnx'}"),
            (["--model", tmp_path / "bad.png", "--image", good], "bad.png: not a light-weight-vlm student file")):
        code, rows, err = run(args, capsys)
        assert code == 2 and rows == [] and len(err) == 1 and message in err[0]


@pytest.mark.parametrize("args, message", [
    (["--window", "40"], "expected CENTER,WIDTH"), (["--window", "40,0.5"], "the window width must be >= 1"),
    (["--window", "nan,400"], "finite"), (["--wind", "-600,1500"], "unrecognized arguments: --wind"),
    (["--output", "rows.xlsx"], "--output must end in .csv or .jsonl"), (["--text", "x", "--text", "y"],
                                                                           "give --text once, or once per --image")])
def test_bad_arguments_are_refused_in_one_line_before_any_work(capsys, args, message):
    code, rows, err = run(["--image", "a.dcm", "b.dcm", "c.dcm", *args], capsys)
    assert code == 2 and message in err[-1]


def test_an_output_that_cannot_be_written_is_refused_and_a_stopped_run_leaves_no_half_table(lvm, demo_run, results,
                                                                                              tmp_path, capsys):
    good = [s["image"] for s in demo_samples(lvm, demo_run[0], 3)]
    model = ["--model", results / "lightweight_vlm_int8.onnx", "--image", *good]
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "file").write_text("")  # a file where a folder should be
    for args, message in ((["--output", tmp_path / "folder.csv"], "is a folder"),
                          (["--output", tmp_path / "file" / "rows.csv"], "--output"),
                          (["--explain", tmp_path / "file" / "maps"], "--explain")):
        code, rows, err = run(model + args, capsys)
        assert code == 2 and message in err[-1] and "Traceback" not in "".join(err), err
    answer, calls = predict.probabilities, []

    def interrupted(*args):  # Ctrl-C after the first row (one call per task) was written
        calls.append(args)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return answer(*args)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(predict, "probabilities", interrupted)
        with pytest.raises(KeyboardInterrupt):
            predict.main([str(a) for a in model + ["--output", tmp_path / "rows.jsonl", "--batch-size", "1"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder.csv"]  # no table, no temporary
    previous = os.umask(0o022)
    try:
        assert run(model + ["--output", tmp_path / "rows.csv"], capsys)[0] == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "rows.csv").stat().st_mode & 0o777 == 0o644  # as any file the user makes, not owner-only


def test_csv_and_jsonl_hold_the_printed_rows(lvm, demo_run, results, tmp_path, capsys):
    inputs = [*(s["image"] for s in demo_samples(lvm, demo_run[0], 3)), dicom("MR_small.dcm")]
    args = ["--model", results / "lightweight_vlm_int8.onnx", "--image", *inputs, "--text",
            "axial T2 weighted image of the brain", "--batch-size", "2"]
    _, printed, _ = run(args, capsys)
    code, out, _ = run(args + ["--output", tmp_path / "out.jsonl"], capsys)
    assert code == 0 and out == [] and [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()] \
        == printed
    run(args + ["--output", tmp_path / "out.csv"], capsys)
    with open(tmp_path / "out.csv", newline="") as f:
        table = list(csv.DictReader(f))
    labels = predict.open_model(str(results / "lightweight_vlm_int8.onnx"))[1]["labels"]
    probabilities = [f"{task}_p_{name}" for task, names in labels.items() for name in names]
    assert list(table[0]) == ["image", "frame", "with_text", *labels, *probabilities, "dicom_modality",
                              "dicom_body_part", "error"]
    assert [r["image"] for r in table] == inputs and [r["frame"] for r in table] == ["", "", "", "0"]
    assert [r["dicom_modality"] for r in table] == ["", "", "", "MR"] and all(r["with_text"] == "True" for r in table)
    for row, expected in zip(table, printed):
        for task, names in labels.items():
            assert row[task] == expected[task]
            assert all(float(row[f"{task}_p_{name}"]) == expected[f"{task}_probabilities"][name] for name in names)


# the same answers as training, whatever the batch ------------------------------------------------


def test_batch_1_and_batch_64_give_the_same_answers(lvm, demo_run, results, capsys):
    images = [s["image"] for s in demo_samples(lvm, demo_run[0], 60) + demo_samples(lvm, demo_run[0], 30, "test")]
    for file in ("lightweight_vlm_int8.onnx", "lightweight_vlm.onnx"):
        answers = {}
        for batch in ("1", "64"):
            for text in ([], ["--text", "axial ct image of the chest"]):
                code, rows, _ = run(["--model", results / file, "--image", *images, "--batch-size", batch, *text],
                                    capsys)
                assert code == 0 and len(rows) == len(images)
                answers[batch, bool(text)] = rows
        for text in (False, True):
            for one, many in zip(answers["1", text], answers["64", text]):
                for task in ("modality", "location"):
                    assert one[task] == many[task]
                    assert one[f"{task}_probabilities"] == pytest.approx(many[f"{task}_probabilities"], abs=1e-4)


def test_images_decode_to_the_training_pixels_in_every_mode(lvm, tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    files = {"rgb.png": Image.fromarray(rgb), "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
             "l.png": Image.fromarray(rgb[..., 0]), "p.png": Image.fromarray(rgb).convert("P"),
             "i16.png": Image.fromarray((rgb[..., 0].astype(np.uint16) * 200)), "photo.jpg": Image.fromarray(rgb)}
    for name, image in files.items():
        image.save(tmp_path / name)
        for size in (64, 112, 224):
            deployed = predict.decode_image(str(tmp_path / name), size)
            trained = lvm.decode_image(str(tmp_path / name), size)
            assert deployed.shape == (size, size, 3) and deployed.dtype == np.uint8
            assert np.array_equal(trained.permute(1, 2, 0).numpy(), deployed), (name, size)
    pixels = np.stack([predict.decode_image(str(tmp_path / "rgb.png"), 64)])
    assert np.allclose(predict.model_input(pixels, [lvm.NORM_MEAN, lvm.NORM_STD]),
                       lvm.normalize(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy())


def test_every_path_feeds_the_student_efficientnet_lite0s_minus_one_to_one(lvm, results):
    """Pixels 0, 51 and 255 reach the model as -1, -0.6 and 1 (x / 127.5 - 1, by hand), as EfficientNet-Lite0's
    ImageNet weights were trained: in predict.py through the int8 file's own metadata, in training through the
    augmentation with its draws at identity, and in evaluation."""
    pixels = np.array([0, 51, 255], dtype=np.uint8).reshape(1, 1, 3, 1).repeat(3, axis=3)  # 1 x 1 x 3 x RGB
    expected = np.array([[-1.0, -0.6, 1.0]] * 3, dtype=np.float32)  # each channel, along the row
    meta = predict.open_model(str(results / "lightweight_vlm_int8.onnx"))[1]
    assert np.allclose(predict.model_input(pixels, meta["image"]["normalization"])[0, :, 0], expected)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    neutral = torch.tensor([[1 - 1e-7, math.log(1 / 0.9) / math.log(1.1 / 0.9), 0.5, 0.5, 0.5, 0.9, 0.5, 0.5]])
    trained = lvm.augment_images(images, neutral, lvm.parse_config([]))
    assert np.allclose(trained[0, :, 0].numpy(), expected, atol=1e-4)
    assert np.allclose(lvm.normalize(images)[0, :, 0].numpy(), expected)


def test_texts_encode_to_the_training_token_indexes(lvm, demo_run, results):
    workdir, _ = demo_run
    meta = predict.open_model(str(results / "lightweight_vlm_int8.onnx"))[1]
    student_meta = lvm.load_student(results / "lightweight_vlm.pth")[1]
    data = demo_dev_data(lvm, workdir, student_meta)
    texts = [s["text"] for s in demo_samples(lvm, workdir, 60)] + ["", "Zebra-striped spleen?! " * 40]
    ids, mask = predict.text_inputs(texts, meta, None)
    assert np.array_equal(ids[:60], data.ids.numpy()) and np.array_equal(mask[:60], data.mask.numpy())
    assert mask[60].sum() == 0 and mask[61].sum() == meta["text"]["max_tokens"]  # empty; truncated
    assert (ids[61] == meta["text"]["unk_index"]).any()  # words the train split never had


def test_answers_reproduce_the_training_scripts_own_figures(lvm, demo_run, results, capsys):
    """predict.py's image-only answers on the dev images give the accuracy that metrics.json reports for the int8
    file; with the texts too, the probabilities are the training's evaluation of the same file."""
    workdir, metrics = demo_run
    samples = demo_samples(lvm, workdir, 60)
    model = ["--model", results / "lightweight_vlm_int8.onnx"]
    _, rows, _ = run(model + ["--image", *(s["image"] for s in samples)], capsys)
    for task in ("modality", "location"):
        accuracy = np.mean([r[task] == s[task] for r, s in zip(rows, samples)])
        assert accuracy == pytest.approx(metrics["student_onnx_int8"]["dev"]["image_only"][f"{task}_acc"], abs=1e-4)
    meta = lvm.load_student(results / "lightweight_vlm.pth")[1]
    data = demo_dev_data(lvm, workdir, meta)
    onnx_student = lvm.OnnxStudent(results / "lightweight_vlm_int8.onnx")
    logits = lvm.predict(onnx_student, data, torch.device("cpu"))
    paths = [s["image"] for s in samples[:8]]
    _, rows, _ = run(model + ["--image", *paths, *(a for s in samples[:8] for a in ("--text", s["text"]))], capsys)
    for task, task_logits in zip(lvm.TASKS, logits):
        temperature = onnx_student.meta["temperature"][task]
        for row, lg in zip(rows, task_logits):
            assert list(row[f"{task}_probabilities"].values()) == pytest.approx(
                (lg / temperature).softmax(0).tolist(), abs=1e-4)


def test_a_model_file_alone_answers_with_and_without_text(lvm, demo_run, results, tmp_path, capsys):
    """A colleague who got only the file: no tokenizer folder, no cache; the image-only path opens no tokenizer."""
    shutil.copy(results / "lightweight_vlm_int8.onnx", tmp_path / "student.onnx")
    sample = demo_samples(lvm, demo_run[0], 1)[0]
    shutil.copy(sample["image"], tmp_path / "scan.png")
    alone = run(["--model", tmp_path / "student.onnx", "--image", tmp_path / "scan.png", "--text", sample["text"]],
                capsys)[1]
    in_place = run(["--model", results / "lightweight_vlm_int8.onnx", "--image", sample["image"], "--text",
                    sample["text"]], capsys)[1]
    assert [r | {"image": None} for r in alone] == [r | {"image": None} for r in in_place] and alone[0]["with_text"]
    code, image_only, _ = run(["--model", tmp_path / "student.onnx", "--image", tmp_path / "scan.png", "--tokenizer",
                               tmp_path / "nowhere"], capsys)  # never opened
    assert code == 0 and not image_only[0]["with_text"]
    padding = predict.load_tokenizer(predict.open_model(str(tmp_path / "student.onnx"))[1], None)
    padding.enable_padding(length=300)  # a tokenizer.json that pads and truncates on its own: undone
    padding.enable_truncation(5)
    padding.save(str(tmp_path / "tokenizer.json"))
    given = run(["--model", tmp_path / "student.onnx", "--image", tmp_path / "scan.png", "--text", sample["text"],
                 "--tokenizer", tmp_path], capsys)[1]
    assert [r | {"image": None} for r in given] == [r | {"image": None} for r in in_place]


# heat maps -----------------------------------------------------------------------------------


def test_occlusion_maps_find_the_patch_the_decision_rests_on():
    def wide_top_left(images: np.ndarray) -> list[np.ndarray]:  # modality reads rows 0-7, columns 0-23; location nothing
        evidence = 4 * (images[:, :, :8, :24].mean((1, 2, 3)) - 1.5)
        return [np.stack([evidence, np.zeros_like(evidence)], 1), np.zeros((len(images), 3))]

    image = np.full((3, 32, 32), 2.0, np.float32)
    modality, location = predict.occlusion_maps(wide_top_left, image, [0, 1], [1.0, 1.0], batch_size=7)
    assert modality.shape == (32, 32) and (modality[:4, :20] > 0.01).all()
    assert (modality[14:, :] == 0).all() and (modality[:, 28:] == 0).all()  # a transposed map would fail both
    assert (location == 0).all()


def test_explain_draws_each_image_of_a_batch_with_its_own_predicted_classes(lvm, demo_run, results, tmp_path, capsys):
    samples = demo_samples(lvm, demo_run[0], 4)
    drawn = []
    draw = predict.draw_explanation
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(predict, "draw_explanation", lambda image, maps, titles, *rest: drawn.append((image, titles)) or
                      draw(image, maps, titles, *rest))
        code, rows, _ = run(["--model", results / "lightweight_vlm_int8.onnx", "--image", *(s["image"] for s in samples),
                             dicom("SC_rgb_rle_2frame.dcm"), "--frames", "all", "--explain", tmp_path / "maps"], capsys)
    assert code == 0 and len(drawn) == len(rows) == 6
    written = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert written[4:] == ["000005_SC_rgb_rle_2frame_frame0.png", "000006_SC_rgb_rle_2frame_frame1.png"]
    size = predict.open_model(str(results / "lightweight_vlm_int8.onnx"))[1]["image"]["size"]
    for (image, titles), row, sample in zip(drawn, rows, samples):
        assert np.array_equal(image, predict.decode_image(sample["image"], size))
        assert titles == [f"{task}: {row[task]} ({row[f'{task}_probabilities'][row[task]]:.2f})"
                          for task in ("modality", "location")]
    with Image.open(tmp_path / "maps" / written[0]) as picture:
        assert picture.width > 2 * picture.height > 200


# the program as a script runs it -------------------------------------------------------------------------


def test_predict_runs_without_pytorch_and_keeps_library_warnings_off_stderr(lvm, demo_run, results, tmp_path):
    """Every path (DICOM, text, heat maps, CSV) in a fresh interpreter: none of the training libraries is imported,
    and stderr holds only predict.py's own lines."""
    probe = (f"import runpy, sys\nsys.argv = {['predict.py', '--model', str(results / 'lightweight_vlm_int8.onnx'), '--image', demo_samples(lvm, demo_run[0], 1)[0]['image'], dicom('JPGExtended.dcm'), dicom('rtplan.dcm'), '--text', 'chest ct', '--explain', str(tmp_path / 'maps'), '--output', str(tmp_path / 'rows.csv')]!r}\n"
             f"try:\n    runpy.run_path({str(PREDICT)!r}, run_name='__main__')\nexcept SystemExit as stop:\n"
             f"    code = stop.code\nprint(code, sorted(m for m in sys.modules if m.split('.')[0] in {TRAINING_ONLY!r}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "1 []", done.stderr
    assert done.stderr.splitlines() == [
        f"predict.py: skipped {dicom('rtplan.dcm')}: no pixel data (RT Plan Storage)",
        "predict.py: 1 of 3 input(s) could not be read (each named above); 2 answered"]


def test_a_reader_that_stops_early_ends_the_program_quietly(lvm, demo_run, results):
    images = " ".join(s["image"] for s in demo_samples(lvm, demo_run[0], 40))
    done = subprocess.run(f"{sys.executable} {PREDICT} --model {results / 'lightweight_vlm_int8.onnx'} --image "
                          f"{images} --batch-size 1 | head -1", shell=True, capture_output=True, text=True, timeout=120)
    assert len(done.stdout.splitlines()) == 1 and done.stderr == ""
