"""Benchmark: training throughput (images/s) of our train stage against the seeds' plain fastai `train()`.

The same member, data and settings in one process, side by side; ours is `train.run_stage` into a scratch folder,
timed by its own `train_seconds` (checkpoints and DVCLive included). Writes bench/train.json.
"""

import tempfile
import time
from pathlib import Path

from benchmarks import cli, seeds_learner
from pipeline import train, vision
from pipeline.common import log, write_json
from pipeline.paddy import DATA_DIR
from pipeline.params import read_params
from pipeline.torch_setup import compute_device

MAX_OVERHEAD_PCT, LR_WHEN_FIND = 10, 0.01  # both sides train at the same fixed lr; lr_find is not what is timed


def run(member: str | None = None, data_dir: Path = DATA_DIR, rounds: int = 2) -> dict:
    """Alternate the seeds' fit and our stage `rounds` times; each one's best round. Writes bench/train.json."""
    params = read_params()
    config = vision.load_train_config(params)
    name = member or next(iter(config.members))
    merged = config.member(name)  # its own keys and train.member_defaults
    # The member on the seeds' schedule: a fixed accum and lr, one cycle; TTA's predictions are not timed.
    params["train"]["members"][name].update(
        accum=merged.accum or 1, lr=LR_WHEN_FIND if merged.lr == "find" else merged.lr, schedule="fit_one_cycle")
    params["train"]["tta"] = False
    cfg = train.load_stage_config(params, name)
    member, accum = cfg.member, cfg.member.accum
    workers = vision.loader_workers(cfg.num_workers, compute_device())
    n_train = int((~train.split_table(data_dir, cfg.validation)["is_valid"]).sum())
    seeds_times, ours_times = [], []
    # Best of rounds: one run of each is at the mercy of warm-up and of whatever else the machine is doing (seen
    # here: 1% to 15% apart between two identical rounds).
    for _ in range(rounds):
        learn = seeds_learner(Path(data_dir) / "train_images", member.arch, vision.item_transform(member), member.size,
                              member.min_scale, cfg.bs, accum, bool(member.pretrained), workers)
        started = time.perf_counter()
        learn.fit_one_cycle(member.epochs, member.lr)  # what the seeds' train() times: its fit
        seeds_times.append(time.perf_counter() - started)
        with tempfile.TemporaryDirectory(prefix="paddy-bench-train.") as scratch:  # the stage's outputs
            ours_times.append(train.run_stage(cfg, data_dir=data_dir, root=Path(scratch))["train_seconds"])
    images, seeds_seconds, ours_seconds = n_train * member.epochs, min(seeds_times), min(ours_times)
    overhead_pct = round(100 * (ours_seconds / seeds_seconds - 1), 1)
    result = dict(
        member=name, arch=member.arch, size=member.size, epochs=member.epochs, bs=cfg.bs, accum=accum,
        num_workers=workers, train_images=n_train, seeds_images_per_second=round(images / seeds_seconds, 2),
        ours_images_per_second=round(images / ours_seconds, 2), overhead_pct=overhead_pct, rounds=rounds,
        seeds_seconds=[round(t, 2) for t in seeds_times], ours_seconds=[round(t, 2) for t in ours_times],
        max_overhead_pct=MAX_OVERHEAD_PCT, within_target=overhead_pct <= MAX_OVERHEAD_PCT,
    )
    if not result["within_target"]:
        log("bench train", f"overhead {overhead_pct}% is above {MAX_OVERHEAD_PCT}%")
    write_json("bench/train.json", result)
    return result


if __name__ == "__main__":
    cli(run, ("member", dict(nargs="?", help="member under train.members (default: the first)")))
