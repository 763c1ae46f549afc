"""predict on what hospitals hold: DICOM (compressed, multi-frame, colour, broken), folders, globs, CSV and JSON
lines, and occlusion heat maps. The DICOM files are the ones pydicom ships inside its wheel."""
import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_predict

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.pixels import pixel_array  # noqa: E402

MODEL_FILES = ("lightweight_vlm_int8.onnx", "lightweight_vlm.onnx", "lightweight_vlm_int8.pt", "lightweight_vlm.pth")


def dicom(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not in this pydicom wheel")
    return path


def demo_images(lvm, workdir: Path, n: int) -> list[str]:
    samples = lvm.load_split(workdir / lvm.DEMO["DATA_ROOT"], "dev", Counter())[:n]
    return [s["image"] for s in samples]


@pytest.mark.parametrize("name, rows, refusal", [
    ("CT_small.dcm", 1, None),
    ("MR_small.dcm", 1, None),
    ("MR_small_RLE.dcm", 1, None),
    ("MR_small_jp2klossless.dcm", 1, None),
    ("JPEGLSNearLossless_16.dcm", 1, None),
    ("SC_rgb_rle_2frame.dcm", 1, None),
    ("JPEG-lossy.dcm", 0, "Unable to decode"),  # its JPEG stream is damaged: no installed plugin decodes it
    ("MR_truncated.dcm", 0, "The number of bytes of pixel data is less than expected"),
    ("rtplan.dcm", 0, "no pixel data (RT Plan Storage)"),
    ("test-SR.dcm", 0, "no pixel data (Comprehensive SR Storage)"),
])
def test_each_dicom_test_file_is_answered_or_refused_with_one_line(lvm, demo_run, tmp_path, capsys, name, rows,
                                                                   refusal):
    workdir, _ = demo_run
    copy = tmp_path / "scan"  # no extension: DICOM is told by content
    shutil.copy(dicom(name), copy)
    args = ["--model", str(workdir / "results" / "lightweight_vlm_int8.onnx"), "--image", str(copy)]
    if refusal is None:
        answered = run_predict(lvm, workdir, args, capsys)
        header = pydicom.dcmread(copy)
        assert len(answered) == rows and answered[0]["image"] == str(copy)
        assert answered[0]["dicom_modality"] == header.get("Modality")  # reported beside the prediction, never read by it
        assert answered[0]["frame"] == int(header.get("NumberOfFrames") or 1) // 2
        return
    with pytest.raises(SystemExit) as stop:
        run_predict(lvm, workdir, args, capsys)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"light-weight-vlm: skipped {copy}: ") and refusal in err
    assert "Traceback" not in err and stop.value.code not in (0, None)
    assert "1 of 1 file(s) could not be read" in str(stop.value)


def test_lossless_compressions_of_one_scan_give_the_same_input(lvm):
    plain = lvm.read_dicom(dicom("MR_small.dcm"), 64, None, "middle")[0]["image"]
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"):
        assert torch.equal(lvm.read_dicom(dicom(name), 64, None, "middle")[0]["image"], plain)


def test_dicom_pixels_go_through_the_files_window_or_the_asked_one(lvm):
    path = dicom("MR_small.dcm")  # Window Center 600, Width 1600; no rescale: values are the stored ones
    raw = pixel_array(path).astype(float)
    shown = lvm.read_dicom(path, 64, None, "middle")[0]["image"]  # 64 px: its own size, no resampling
    assert shown.shape == (3, 64, 64) and torch.equal(shown[0], shown[1]) and torch.equal(shown[0], shown[2])
    grey = shown[0].numpy().astype(float)
    assert (grey[raw <= 600 - 800] == 0).all() and (grey[raw >= 600 + 800] == 255).all()
    inside = (raw > 0) & (raw < 1400)
    assert np.all(np.diff(grey[inside][np.argsort(raw[inside])]) >= 0)  # a window keeps the order of values
    assert 0 < grey[inside].mean() < 255
    center = float(np.median(raw))
    narrow = lvm.read_dicom(path, 64, (center, 2.0), "middle")[0]["image"][0].numpy()
    assert (narrow[raw <= center - 1] == 0).all() and (narrow[raw >= center + 1] == 255).all()


def test_a_dicom_without_a_window_is_stretched_over_its_percentiles(lvm):
    path = dicom("CT_small.dcm")  # no window in the file
    raw = pixel_array(path).astype(float)
    grey = lvm.read_dicom(path, 128, None, "middle")[0]["image"][0].numpy()
    assert 0.004 <= (grey == 0).mean() <= 0.05 and 0.004 <= (grey == 255).mean() <= 0.05
    assert np.all(np.diff(grey.ravel()[np.argsort(raw.ravel(), kind="stable")].astype(int)) >= 0)


def test_monochrome1_is_inverted(lvm, tmp_path):
    header = pydicom.dcmread(dicom("MR_small.dcm"))
    header.PhotometricInterpretation = "MONOCHROME1"  # the same values, shown white on black
    header.save_as(tmp_path / "inverted.dcm")
    normal = lvm.read_dicom(dicom("MR_small.dcm"), 64, None, "middle")[0]["image"]
    assert torch.equal(lvm.read_dicom(str(tmp_path / "inverted.dcm"), 64, None, "middle")[0]["image"], 255 - normal)


def test_colour_dicom_keeps_its_colours_and_each_frame_can_be_asked_for(lvm):
    path = dicom("SC_rgb_rle_2frame.dcm")  # two 100 x 100 RGB frames
    frames = lvm.read_dicom(path, 100, None, "all")
    assert [f["frame"] for f in frames] == [0, 1]
    for f in frames:
        assert torch.equal(f["image"], torch.from_numpy(pixel_array(path, index=f["frame"])).permute(2, 0, 1))
    assert [f["frame"] for f in lvm.read_dicom(path, 100, None, "middle")] == [1]
    ybr = lvm.read_dicom(dicom("SC_rgb_dcmtk_+eb+cy+np.dcm"), 100, None, "middle")[0]["image"]  # JPEG, YBR_FULL_422
    rgb = lvm.read_dicom(dicom("SC_rgb_rle.dcm"), 100, None, "middle")[0]["image"]  # the same picture, RGB
    assert (ybr.float() - rgb.float()).abs().mean() < 8  # converted to RGB (only JPEG's loss remains)


def test_a_folder_mixing_images_dicom_and_junk_is_read_in_order(lvm, demo_run, tmp_path, capsys):
    workdir, _ = demo_run
    pngs = demo_images(lvm, workdir, 2)
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    shutil.copy(pngs[0], tmp_path / "a.png")
    shutil.copy(dicom("CT_small.dcm"), tmp_path / "b" / "IM0001")
    shutil.copy(dicom("SC_rgb_rle_2frame.dcm"), tmp_path / "b" / "deeper" / "IM0002")
    shutil.copy(pngs[1], tmp_path / "b" / "deeper" / "z.jpeg")  # a PNG whatever its name says
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "DICOMDIR.bak").write_bytes(b"\0" * 300)
    model = str(workdir / "results" / "lightweight_vlm_int8.onnx")
    rows = run_predict(lvm, workdir, ["--model", model, "--image", str(tmp_path), "--frames", "all"], capsys)
    names = [(Path(r["image"]).relative_to(tmp_path).as_posix(), r["frame"]) for r in rows]
    assert names == [("a.png", None), ("b/IM0001", 0), ("b/deeper/IM0002", 0), ("b/deeper/IM0002", 1),
                     ("b/deeper/z.jpeg", None)]
    lvm.main(["predict", "--model", model, "--image", str(tmp_path)])
    assert capsys.readouterr().err.splitlines() == [
        "light-weight-vlm: ignored 2 file(s) that are neither images nor DICOM"]
    globbed = run_predict(lvm, workdir, ["--model", model, "--image", str(tmp_path / "**" / "IM*")], capsys)
    assert [Path(r["image"]).name for r in globbed] == ["IM0001", "IM0002"]
    float_model = ["--model", str(workdir / "results" / "lightweight_vlm.pth")]
    alone = run_predict(lvm, workdir, float_model + ["--image", str(tmp_path / "b" / "deeper" / "z.jpeg")], capsys)
    batched = run_predict(lvm, workdir, float_model + ["--image", str(tmp_path)], capsys)
    for task in lvm.TASKS:  # the float student answers alike alone or in a batch (int8 ONNX quantizes per batch)
        assert alone[0][task] == batched[-1][task]
        assert alone[0][f"{task}_probabilities"] == pytest.approx(batched[-1][f"{task}_probabilities"], abs=2e-4)


def test_csv_and_jsonl_output_hold_one_row_per_image_with_the_printed_values(lvm, demo_run, tmp_path, capsys):
    workdir, _ = demo_run
    model = str(workdir / "results" / "lightweight_vlm.pth")
    inputs = [*demo_images(lvm, workdir, 3), dicom("MR_small.dcm")]
    args = ["--model", model, "--image", *inputs, "--text", "axial T2 weighted image of the brain", "--batch-size", "2"]
    printed = run_predict(lvm, workdir, args, capsys)
    run_predict(lvm, workdir, args + ["--output", str(tmp_path / "out.jsonl")], capsys)
    assert [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()] == printed
    assert capsys.readouterr().out == ""  # the rows went to the file
    run_predict(lvm, workdir, args + ["--output", str(tmp_path / "out.csv")], capsys)
    with open(tmp_path / "out.csv", newline="") as f:
        table = list(csv.DictReader(f))
    _, meta = lvm.load_student(model)
    probabilities = [f"{task}_p_{name}" for task in lvm.TASKS for name in meta["labels"][task]]
    assert list(table[0]) == ["image", "frame", "with_text", "modality", "location", *probabilities,
                              "dicom_modality", "dicom_body_part"]
    assert [r["image"] for r in table] == inputs and [r["frame"] for r in table] == ["", "", "", "0"]
    assert [r["dicom_modality"] for r in table] == ["", "", "", "MR"] and all(r["with_text"] == "True" for r in table)
    for row, expected in zip(table, printed):
        assert row["modality"] == expected["modality"] and row["location"] == expected["location"]
        for task in lvm.TASKS:
            for name, p in expected[f"{task}_probabilities"].items():
                assert float(row[f"{task}_p_{name}"]) == p


def test_occlusion_maps_find_the_patch_the_decision_rests_on(lvm):
    class TopLeft(torch.nn.Module):  # modality reads only the top-left quarter; location nothing
        def forward(self, images, ids, mask):
            evidence = 4 * (images[:, :, :16, :16].mean((1, 2, 3)) - 1.5)
            return torch.stack([evidence, torch.zeros_like(evidence)], 1), torch.zeros(len(images), 3)

    image = torch.full((3, 32, 32), 2.0)
    ids, mask = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)
    modality, location = lvm.occlusion_maps(TopLeft(), image, ids, mask, [0, 1], [1.0, 1.0], batch_size=7)
    assert modality.shape == (32, 32) and (modality[:12, :12] > 0.01).all() and (modality[20:, :] == 0).all()
    assert (modality[:, 20:] == 0).all() and (location == 0).all()


@pytest.mark.parametrize("file", MODEL_FILES)
def test_explain_writes_a_heat_map_for_every_model_file(lvm, demo_run, tmp_path, capsys, file):
    workdir, _ = demo_run
    model = str(workdir / "results" / file)
    rows = run_predict(lvm, workdir, ["--model", model, "--image", demo_images(lvm, workdir, 1)[0],
                                      dicom("SC_rgb_rle_2frame.dcm"), "--frames", "all",
                                      "--explain", str(tmp_path / "maps")], capsys)
    written = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert len(written) == len(rows) == 3 and written[1:] == ["000002_SC_rgb_rle_2frame_frame0.png",
                                                              "000003_SC_rgb_rle_2frame_frame1.png"]
    with Image.open(tmp_path / "maps" / written[0]) as picture:
        assert picture.width > 2 * picture.height > 400


@pytest.mark.parametrize("window, message", [("40", "expected CENTER,WIDTH"), ("40,0", "the window width must be > 0")])
def test_a_bad_window_or_output_is_refused_before_any_work(lvm, capsys, window, message):
    with pytest.raises(SystemExit) as stop:
        lvm.main(["predict", "--image", "a.dcm", "--window", window])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lvm.main(["predict", "--image", "a.dcm", "--output", "rows.xlsx"])
    assert "--output must end in .csv or .jsonl" in capsys.readouterr().err
