"""Size and CPU speed of the teacher, the float student and the int8 student (not part of the pytest run).

    python tests/benchmark_speed.py --results results

Teacher: what runs at inference, CLIP ViT-B/32's vision tower and projection plus DistilBERT-base plus
the heads, built from their configs (random weights cost the same as pretrained ones, which cannot be
downloaded everywhere), on 224 px images. Students: the two files in --results. Every model reads a text
of MAX_TOKENS tokens (the worst case) and random pixels. Latency: batch 1, median of --repeats timed runs
after warm-up; throughput: batch 32, median of fewer runs. Bytes: file size for the students, fp32 weights
for the teacher. Dev accuracy: the metrics.json of the run that wrote the files. Prints a markdown table.
"""

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "light-weight-vlm.py"


def load_script():
    spec = importlib.util.spec_from_file_location("light_weight_vlm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_seconds(run, repeats: int, warmup: int) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def teacher(lvm, n_classes: tuple[int, int]):
    """The teacher's inference path, and its modules."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, DistilBertConfig, DistilBertModel
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(patch_size=32, projection_dim=512)).eval()
    text = DistilBertModel(DistilBertConfig()).eval()
    heads = lvm.teacher_heads(512 + text.config.dim, *n_classes, lvm.HEAD_HIDDEN).eval()

    def forward(images, ids, mask):
        hidden = text(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return heads(torch.cat([vision(pixel_values=images).image_embeds, pooled], dim=1))
    return forward, [vision, text, heads], 224, text.config.vocab_size


def inputs(batch: int, size: int, vocab_size: int, max_tokens: int) -> tuple:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 3, size, size, generator=generator),
            torch.randint(1, vocab_size, (batch, max_tokens), generator=generator),
            torch.ones(batch, max_tokens, dtype=torch.long))


def measure(forward, size: int, vocab_size: int, max_tokens: int, repeats: int) -> tuple[float, float]:
    """(latency in ms at batch 1, throughput in samples/s at batch 32)."""
    one, many = inputs(1, size, vocab_size, max_tokens), inputs(32, size, vocab_size, max_tokens)
    latency = median_seconds(lambda: forward(*one), repeats, warmup=3)
    batch_seconds = median_seconds(lambda: forward(*many), max(3, repeats // 10), warmup=1)
    return latency * 1e3, 32 / batch_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="results", help="folder of a finished run (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs at batch 1 (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lvm = load_script()
    results = Path(args.results)
    metrics = json.loads((results / "metrics.json").read_text())
    dev = lambda model: " / ".join(f"{metrics[model]['dev'][f'{task}_acc']:.3f}" for task in lvm.TASKS)

    rows = []
    for name, file, accuracy in (("float student", "lightweight_vlm.pth", "student"),
                                 ("int8 student", "lightweight_vlm_int8.pt", "student_int8")):
        model, meta = lvm.load_student(results / file)
        forward = lambda images, ids, mask, model=model: model(lvm.normalize(images), ids, mask)
        latency, throughput = measure(forward, meta["image_size"], meta["student"]["vocab_size"], meta["max_tokens"],
                                      args.repeats)
        rows.append([name, metrics["student_params"], (results / file).stat().st_size, latency, throughput, dev(accuracy)])
    n_classes = tuple(len(names) for names in meta["labels"].values())
    forward, modules, size, vocab_size = teacher(lvm, n_classes)
    latency, throughput = measure(forward, size, vocab_size, meta["max_tokens"], args.repeats)
    weights = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
    rows.insert(0, ["teacher: CLIP ViT-B/32 vision + DistilBERT + heads", sum(lvm.count_parameters(m) for m in modules),
                    weights, latency, throughput, f"{dev('teacher')} (the run's own teacher)"])

    print(f"{args.threads} thread(s), torch {torch.__version__}, {meta['max_tokens']} tokens per text\n")
    print("| model | parameters | bytes | latency, batch 1 (ms) | throughput, batch 32 (samples/s) | "
          "dev acc modality / location |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, params, size_bytes, latency, throughput, accuracy in rows:
        print(f"| {name} | {params:,} | {size_bytes:,} | {latency:.2f} | {throughput:.1f} | {accuracy} |")
    teacher_row, int8_row = rows[0], rows[-1]
    print(f"\nint8 student against the teacher: {teacher_row[3] / int8_row[3]:.0f}x faster at batch 1, "
          f"{int8_row[4] / teacher_row[4]:.0f}x the throughput at batch 32, {teacher_row[2] / int8_row[2]:.0f}x fewer bytes")


if __name__ == "__main__":
    main()
