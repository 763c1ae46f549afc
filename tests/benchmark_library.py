"""The hand-written pieces of the training step against the library's own, side by side on this machine (not part of
the pytest run):

    python tests/benchmark_library.py

- the weight moving average: the script's MovingAverage against torch.optim.swa_utils.AveragedModel with
  get_ema_multi_avg_fn (use_buffers=True), ms per update on the default student (5,021-token vocabulary);
- the batch augmentation: the script's augment_images (one affine grid_sample for the whole batch) against torchvision
  v2 (RandomResizedCrop, RandomRotation, RandomHorizontalFlip, ColorJitter), per image, as a per-sample augmentation
  needs, and once per batch (every image of a batch the same crop, turn and jitter); ms per batch of 32 at 112 px;
- the epoch's sample order: a permutation padded and strided by hand against torch's DistributedSampler, ms per
  epoch of MedPix's 1,653 train images on 2 processes.
Each the median over 7 interleaved rounds of a round's mean time, one thread."""

import importlib.util
import statistics
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DistributedSampler
from torchvision.transforms import v2

spec = importlib.util.spec_from_file_location("lvm", Path(__file__).resolve().parents[1] / "light-weight-vlm.py")
lvm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lvm)


def mean_ms(call, runs: int) -> float:
    call()
    start = time.perf_counter()
    for _ in range(runs):
        call()
    return (time.perf_counter() - start) / runs * 1e3


def rounds(calls: dict, runs: int, n: int = 7) -> dict:
    times = {name: [] for name in calls}
    for _ in range(n):
        for name, call in calls.items():
            times[name].append(mean_ms(call, runs))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    student = lvm.Student(**lvm.student_kwargs(lvm.parse_config([]), 5021, 0, (2, 5)))
    ours = lvm.MovingAverage(student, 0.99)
    theirs = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(0.99), use_buffers=True)
    ema = rounds(dict(hand_written=ours.update, averaged_model=lambda: theirs.update_parameters(student)), 100)

    images = torch.randint(0, 256, (32, 3, 112, 112), dtype=torch.uint8)
    u = torch.rand(32, lvm.AUGMENT_DRAWS)
    cfg = lvm.parse_config([])
    transform = v2.Compose([v2.RandomResizedCrop(112, scale=cfg.AUGMENT_AREA, ratio=cfg.AUGMENT_ASPECT, antialias=False),
                            v2.RandomRotation(cfg.AUGMENT_ROTATION), v2.RandomHorizontalFlip(),
                            v2.ColorJitter(brightness=cfg.AUGMENT_INTENSITY, contrast=cfg.AUGMENT_INTENSITY),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)])
    augment = rounds(dict(hand_written=lambda: lvm.augment_images(images, u, cfg),
                          v2_per_image=lambda: torch.stack([transform(image) for image in images]),
                          v2_per_batch=lambda: transform(images)), 10)
    generator, n = torch.Generator().manual_seed(0), 1653

    def by_hand():
        total = -(-n // 2) * 2
        order = torch.randperm(n, generator=generator)
        return torch.cat([order, order[:total - n]])[0::2]

    def by_sampler():
        seed = int(torch.randint(2 ** 31, (), generator=generator))
        return torch.tensor(list(DistributedSampler(range(n), 2, 0, seed=seed)))
    order = rounds(dict(hand_written=by_hand, distributed_sampler=by_sampler), 100)
    for title, result in (("moving average, ms per update", ema), ("augmentation, ms per batch of 32", augment),
                          ("sample order, ms per epoch", order)):
        base = result["hand_written"]
        print(f"{title}: " + ", ".join(f"{name} {ms:.3f} ({ms / base:.2f} x)" for name, ms in result.items()))


if __name__ == "__main__":
    main()
