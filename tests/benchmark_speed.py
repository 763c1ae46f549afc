"""Size and CPU speed of the teacher and of every student file (not part of the pytest run).

    python tests/benchmark_speed.py --results results

Teacher: what runs at inference, CLIP ViT-B/32's vision tower and projection plus DistilBERT-base plus
the heads, built from their configs (random weights cost the same as pretrained ones, which cannot be
downloaded everywhere), on 224 px images. Students: the three files in --results, the float .pth in PyTorch,
the float and int8 .onnx in ONNX Runtime. Every model reads a text of MAX_TOKENS tokens (the worst
case) and random pixels, on one CPU thread: latency at batch 1, median of --repeats timed runs after warm-up;
throughput at batch 32, median of a tenth as many (the script's own cpu_speed, which every run also reports in
metrics.json). Bytes: file size for the students, fp32 weights for the teacher. Dev accuracy: the metrics.json
of the run that wrote the files. Prints a markdown table.
"""

import argparse
import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "light-weight-vlm.py"
STUDENTS = (("float student (PyTorch)", "lightweight_vlm.pth", "student"),
            ("float student (ONNX Runtime)", "lightweight_vlm.onnx", "student"),
            ("int8 student (ONNX Runtime)", "lightweight_vlm_int8.onnx", "student_onnx_int8"))


def load_script():
    spec = importlib.util.spec_from_file_location("light_weight_vlm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def teacher(lvm, n_classes: tuple[int, ...]):
    """The teacher's inference path, and its modules."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, DistilBertConfig, DistilBertModel
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(patch_size=32, projection_dim=512)).eval()
    text = DistilBertModel(DistilBertConfig()).eval()
    heads = lvm.teacher_heads(512 + text.config.dim, n_classes, lvm.HEAD_HIDDEN, lvm.HEAD_DROPOUT).eval()

    def forward(images, ids, mask):
        hidden = text(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return heads(torch.cat([vision(pixel_values=images).image_embeds, pooled], dim=1))
    return forward, [vision, text, heads], 224, text.config.vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="results", help="folder of a finished run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs at batch 1 (default: %(default)s)")
    args = parser.parse_args()
    lvm = load_script()
    results = Path(args.results)
    metrics = json.loads((results / "metrics.json").read_text())
    rows, meta = [], lvm.load_student(results / "lightweight_vlm.pth")[1]
    dev = lambda model: " / ".join(f"{metrics[model]['dev'][f'{task}_acc']:.3f}" for task in meta["labels"])
    for name, file, accuracy in STUDENTS:
        model = lvm.OnnxStudent(results / file, threads=1) if file.endswith(".onnx") else lvm.load_student(results / file)[0]
        speed = lvm.cpu_speed(model, meta["image_size"], meta["student"]["vocab_size"], meta["max_tokens"], args.repeats)
        rows.append([name, metrics["student_params"], (results / file).stat().st_size, speed["batch1_ms"],
                     speed["batch32_per_s"], dev(accuracy)])
    n_classes = tuple(len(names) for names in meta["labels"].values())
    forward, modules, size, vocab_size = teacher(lvm, n_classes)
    speed = lvm.cpu_speed(forward, size, vocab_size, meta["max_tokens"], args.repeats)
    weights = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
    rows.insert(0, ["teacher: CLIP ViT-B/32 vision + DistilBERT + heads", sum(lvm.count_parameters(m) for m in modules),
                    weights, speed["batch1_ms"], speed["batch32_per_s"], f"{dev('teacher')} (the run's own teacher)"])

    print(f"1 thread, torch {torch.__version__}, {meta['max_tokens']} tokens per text\n")
    print("| model | parameters | bytes | latency, batch 1 (ms) | throughput, batch 32 (samples/s) | "
          f"dev acc {' / '.join(meta['labels'])} |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, params, size_bytes, latency, throughput, accuracy in rows:
        print(f"| {name} | {params:,} | {size_bytes:,} | {latency:.2f} | {throughput:.1f} | {accuracy} |")
    teacher_row, onnx_int8 = rows[0], rows[3]
    print(f"\nONNX Runtime int8 student against the teacher: {teacher_row[3] / onnx_int8[3]:.0f}x faster at batch 1, "
          f"{teacher_row[2] / onnx_int8[2]:.0f}x fewer bytes")


if __name__ == "__main__":
    main()
