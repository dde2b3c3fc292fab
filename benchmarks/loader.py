"""Benchmark: each member's DataLoader against its training step (images/s), at the competition's real image size.

Every demo member and one competition member (random init) on generated 480x640 JPEGs, on this machine's device:
the training DataLoader per worker setting (`--images full small`: also on small_images' pre-resized images), the
training step alone, and per image the ms of decoding, item and batch transforms. Writes bench/loader.json.
"""

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.torch_core import to_device

from benchmarks import PHOTO_SIZE, cli
from pipeline import small_images, vision
from pipeline.common import log, write_json
from pipeline.paddy import read_train_table
from pipeline.profile import render_params
from pipeline.synthetic import write_synthetic_dataset
from pipeline.torch_setup import compute_device

STAGE = "bench loader"
DISTINCT_IMAGES = 64  # generated once; the table repeats them (decoding costs the same, generating does not)
COMPETITION_MEMBER, TARGET_RATIO = "convnext_large_640", 1.2  # the goal on a GPU: loader (auto workers) / step
TIMED_ROUNDS, MIN_TIMED_IMAGES = 3, 128  # loader batches timed: every worker delivers several, and enough images
STEPS = {"cuda": (2, 5), "cpu": (1, 1)}  # training steps (untimed warm-up, timed) per device type
CPU_STEP_BATCH = 4  # on CPU, the competition member's step on its real batch takes minutes: timed on a small one
SMALL_MAX_SIZE = 256  # small_images.max_size in the profiles: the seeds' resize_images(max_size=256)


def bench_members() -> dict[str, tuple[vision.MemberConfig, vision.TrainConfig]]:
    """Every demo member and one competition member: (member, random init; its profile's train settings)."""
    demo, competition = (vision.load_train_config(render_params(name)) for name in ("demo", "competition"))
    members = {**demo.members, COMPETITION_MEMBER: competition.member(COMPETITION_MEMBER)}
    return {name: (replace(member, pretrained=False), competition if name == COMPETITION_MEMBER else demo)
            for name, member in members.items()}


def pre_resized(table, data_dir: Path):
    """`table` reading the same images resized once (longest side SMALL_MAX_SIZE), as a member with `images: small`."""
    small_dir = data_dir.with_name(data_dir.name + "_small")
    if not small_dir.is_dir():
        small_images.resize_image_folders(data_dir, small_dir, SMALL_MAX_SIZE)
    return table.assign(path=[small_dir / Path(path).relative_to(data_dir) for path in table["path"]])


def clock(device: torch.device) -> float:
    """time.perf_counter() once the work queued on `device` is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed_batches(workers: int, bs: int) -> int:
    return max(TIMED_ROUNDS * workers, -(-MIN_TIMED_IMAGES // bs))  # -(-a // b): a / b rounded up


def loader_rate(member, table, bs: int, accum: int, workers: int, device) -> float:
    """Images/s of the member's training DataLoader with `workers` processes, after its first batch."""
    batches = iter(vision.member_dataloaders(member, table, bs, accum, seed=0, num_workers=workers).train)
    next(batches)  # an epoch starts: fastai starts its workers
    started = time.perf_counter()
    images = sum(len(next(batches)[0]) for _ in range(timed_batches(workers, bs // accum)))
    seconds = clock(device) - started
    batches.close()  # ends the epoch early: fastai's iterator shuts its workers down
    return round(images / seconds, 1)


def breakdown_ms(member, table, bs: int, accum: int, device) -> dict:
    """Milliseconds per image spent decoding, in the item transforms and in the batch transforms (0 workers)."""
    dl = vision.member_dataloaders(member, table, bs, accum, seed=0, num_workers=0).train
    dl.before_iter()  # where fastai sets the training split on the item and batch transforms
    stamps = [time.perf_counter()]
    decoded = [dl.create_item(index) for index in range(dl.bs)]  # PIL decoding, the label's categorisation
    stamps.append(time.perf_counter())
    items = [dl.after_item(item) for item in decoded]
    stamps.append(time.perf_counter())
    dl.after_batch(to_device(dl.create_batch(items), device))
    stamps.append(clock(device))
    return {name: round(1000 * (end - start) / dl.bs, 2)
            for name, start, end in zip(("decode", "item", "batch"), stamps, stamps[1:])}


def step_rate(member, table, precision: str, device, step_bs: int) -> dict:
    """Images/s of the member's training step on batches of `step_bs` in train's precision, after the warm-up: each
    batch timed from its arrival (before_batch) to its end (after_batch), then the fit stopped."""
    warmup, timed = STEPS[device.type]
    starts, ends, images = [], [], []

    def batch_done(cb):
        ends.append(clock(device))
        images.append(len(cb.xb[0]))
        if len(ends) == warmup + timed:
            raise CancelFitException()

    timer = Callback(before_batch=lambda cb: starts.append(clock(device)), after_batch=batch_done)
    timer.order = 100  # after every other callback's before_batch (mixed precision, gradient accumulation)
    # accum = 1 at the step's own batch: GradientAccumulation only skips optimiser steps, which would then be missing
    # from the timed ones.
    rows = table.iloc[list(range(step_bs * (warmup + timed))) + [len(table) - 1]]  # and the validation row
    dls = vision.member_dataloaders(member, rows.reset_index(drop=True), step_bs, 1, seed=0)
    vision.member_learner(member, dls, step_bs, 1, mixed_precision=precision).fit(1, 1e-4, cbs=[timer])
    seconds = sum(end - start for start, end in list(zip(starts, ends))[warmup:])
    return dict(batch=step_bs, precision=vision.precision_for(precision, device.type == "cuda"),
                images_per_second=round(sum(images[warmup:]) / seconds, 1))


def run(worker_settings=(0, "auto"), names: list[str] | None = None, images=("full",)) -> dict:
    """Every member in `names` (default: bench_members()), each `worker_settings`; `small` in `images`: also the
    loader on the pre-resized images, and small / full per setting. Writes and returns bench/loader.json's content."""
    device, members, results = compute_device(), bench_members(), {}
    counts = {str(w): vision.loader_workers(w, device) for w in worker_settings}
    with tempfile.TemporaryDirectory(prefix="paddy-bench-loader.") as scratch:
        data_dir = Path(scratch) / "paddy"  # below: DISTINCT_IMAGES and a few spare (the smallest class gets half)
        write_synthetic_dataset(data_dir, train_per_class=DISTINCT_IMAGES // 10 + 1, n_test=1, image_size=PHOTO_SIZE,
                                seed=0)
        photos = read_train_table(data_dir).head(DISTINCT_IMAGES)
        for name in names or members:
            member, train = members[name]
            accum = member.accum or 1
            bs = vision.batch_size(train.bs, accum)
            step_bs = CPU_STEP_BATCH if device.type == "cpu" and name == COMPETITION_MEMBER else bs
            rows = max(bs * (1 + timed_batches(max(counts.values()), bs)), step_bs * sum(STEPS[device.type]))
            # `rows` training rows repeating the photos, then one validation row
            table = photos.sample(rows + 1, replace=True, random_state=0, ignore_index=True)
            table["is_valid"] = table.index == rows
            log(STAGE, f"{name}: {member.arch}, {bs} images per batch, on {device}")
            loaders = {w: {"workers": count, "images_per_second": loader_rate(member, table, train.bs, accum, count,
                                                                             device)} for w, count in counts.items()}
            if "small" in images:  # the same settings on the pre-resized images, and small / full per setting
                small_table = pre_resized(table, data_dir)
                for w, count in counts.items():
                    rate = loader_rate(member, small_table, train.bs, accum, count, device)
                    loaders[w].update(small_images_per_second=rate,
                                      small_to_full=round(rate / loaders[w]["images_per_second"], 2))
            step = step_rate(member, table, train.precision, device, step_bs)
            auto = loaders.get("auto", max(loaders.values(), key=lambda rate: rate["images_per_second"]))
            results[name] = dict(
                arch=member.arch, resize=member.resize, method=member.method, size=member.size, batch=bs,
                loader=loaders, step=step,
                loader_to_step=round(auto["images_per_second"] / step["images_per_second"], 2),
                breakdown_ms_per_image=breakdown_ms(member, table, train.bs, accum, device))
            log(STAGE, f"{name}: loader/step {results[name]['loader_to_step']}")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = dict(device=device_name, image_size=list(PHOTO_SIZE), target_ratio=TARGET_RATIO, members=results)
    write_json("bench/loader.json", result)
    return result


if __name__ == "__main__":
    cli(run, ("--workers", dict(dest="worker_settings", nargs="+", default=[0, "auto"], metavar="N|auto",
                                type=lambda w: w if w == "auto" else int(w), help="worker settings (default: 0 auto)")),
        ("--members", dict(dest="names", nargs="+", choices=list(bench_members()), metavar="NAME",
                           help="members to time (default: every demo member and one competition member)")),
        ("--images", dict(nargs="+", choices=("full", "small"), default=["full"],
                          help="full: the 480x640 photos (always timed); small: also as small_images resizes them")))
