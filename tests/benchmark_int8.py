"""The int8 student's quantization against the one it replaced (not part of the pytest run): a finished run's float
ONNX student quantized both ways, on the same 256 calibration images, then each file's dev labels against the float
file's (with text, image only), its size and its batch-1 latency on one thread (median of 5 interleaved rounds).

    python tests/benchmark_int8.py --DATA_ROOT ../shared/medpix/MedPix-2-0 --results results --cache cache

Today's: ONNX Runtime's static int8 of everything but the LSTM (quantize_onnx), so that an answer never depends on
the rest of its batch. Before: static convolutions, then dynamic LSTM, MatMul, Gemm and Gather, whose activations are
scaled by each call's batch.
"""

import argparse
import importlib.util
import shutil
import statistics
import tempfile
from collections import Counter
from pathlib import Path

import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

spec = importlib.util.spec_from_file_location("lvm", Path(__file__).resolve().parents[1] / "light-weight-vlm.py")
lvm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lvm)


def dynamic_beyond_the_convolutions(source: Path, calibration) -> Path:
    """The quantization before static int8 everywhere."""
    batches = iter([dict(images=lvm.normalize(calibration.pixels(i)).numpy(), ids=calibration.ids[i].numpy(),
                         mask=calibration.mask[i].numpy()) for i in torch.arange(len(calibration)).split(64)])

    class Feeds(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    prepared, convs, int8 = (source.with_name(name) for name in ("prepared.onnx", "convs.onnx", "int8.onnx"))
    quant_pre_process(str(source), str(prepared))
    quantize_static(str(prepared), str(convs), Feeds(), op_types_to_quantize=["Conv", "Clip", "Relu"], per_channel=True,
                    quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    quantize_dynamic(str(convs), str(int8), op_types_to_quantize=["LSTM", "MatMul", "Gemm", "Gather"],
                     weight_type=QuantType.QInt8)
    return int8


def split(root: Path, name: str, meta: dict, cache: Path):
    """A split as predict.py reads it: the images from the run's cache, the texts through the file's tokenizer."""
    samples = lvm.load_split(root, name, lvm.parse_config([]), Counter())
    images = lvm.load_images(samples, meta["image"]["size"], cache, Counter())
    samples = [s for s in samples if s["image_row"] is not None]
    ids, mask = lvm.deployment.text_inputs([s["text"] for s in samples], meta, None)
    return lvm.Split(images, torch.from_numpy(ids), torch.from_numpy(mask),
                     rows=torch.tensor([s["image_row"] for s in samples]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--DATA_ROOT", type=Path, required=True)
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--cache", type=Path, default=Path("cache"))
    args = parser.parse_args()
    reference, cpu = lvm.OnnxStudent(args.results / "lightweight_vlm.onnx"), torch.device("cpu")
    meta = reference.meta
    dev, train = (split(args.DATA_ROOT, name, meta, args.cache) for name in ("dev", "train"))
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:lvm.CALIBRATION_IMAGES]
    calibration = lvm.Split(train.images, train.ids[pick], train.mask[pick], rows=train.rows[pick])
    expected = {text: [lg.argmax(1) for lg in lvm.predict(reference, dev, cpu, with_text=text)] for text in (True, False)}
    with tempfile.TemporaryDirectory() as folder:
        files = {}
        static = lambda source, data: lvm.quantize_onnx(source, data, lvm.deployment.ONNX_INPUTS)
        for name, quantize in (("static", static), ("dynamic beyond the convolutions", dynamic_beyond_the_convolutions)):
            work = Path(folder) / name
            work.mkdir()
            source = Path(shutil.copy(args.results / "lightweight_vlm.onnx", work / "float.onnx"))
            files[name] = quantize(source, calibration)
        models = {name: lvm.OnnxStudent(path, threads=1) for name, path in files.items()}
        rounds = [{name: lvm.cpu_speed(model, meta["image"]["size"], len(meta["text"]["vocab"]),
                                       meta["text"]["max_tokens"], 30)["batch1_ms"] for name, model in models.items()}
                  for _ in range(5)]
        print("| int8 | bytes | batch 1, ms | dev labels as the float file's, with text | image only |")
        print("| --- | ---: | ---: | --- | --- |")
        for name, model in models.items():
            agreement = {text: " / ".join(f"{float((a == b).float().mean()):.3f}" for a, b in zip(
                [lg.argmax(1) for lg in lvm.predict(model, dev, cpu, with_text=text)], expected[text]))
                for text in (True, False)}
            print(f"| {name} | {files[name].stat().st_size:,} | {statistics.median(r[name] for r in rounds):.2f} | "
                  f"{agreement[True]} | {agreement[False]} |")


if __name__ == "__main__":
    main()
