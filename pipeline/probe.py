"""Stage `probe@<member>`: the memory a member needs to train, and the gradient accumulation that fits a budget.

A short fit on the smallest class, as the seeds do ("Road to the Top", part 3); docs/stages.md, probe@member. Train
reads the decision file (metrics/probe/<member>.accum.json) alone: a re-probe with the same outcome retrains nothing.
"""

from __future__ import annotations

import functools
import gc
import math
import multiprocessing
import resource
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from pipeline.common import atomic_path, log, stage_main, write_json
from pipeline.members import ProbeConfig, load_probe_config
from pipeline.torch_setup import compute_device, seed_everything
from pipeline.distributed import process_batch, process_count
from pipeline.paddy import WRITTEN_BY, member_data_dir, read_train_table, smallest_class, train_csv, validation_mask
from pipeline.params import ParamsError, profile_of, read_params, seed_of
from pipeline.vision import (MemberConfig, accum_to_use, batch_size, choose_accum, load_train_config,
                             member_dataloaders, member_learner, probe_decision_path)

STAGE = "probe"
METRICS_DIR = Path("metrics/probe")
PLOTS_DIR = Path("plots/probe")
GIB = 1024**3
PROBE_VALID_PCT = 0.2  # the seeds' valid_pct for the smallest-class run
LR_WHEN_FIND = 1e-3  # memory does not depend on the learning rate, so the probe skips lr_find
Measure = Callable[[MemberConfig, pd.DataFrame, int, int, int, int], dict]


class ProbeError(RuntimeError):
    """The probe cannot run or its outcome is unusable: a one-line message naming the member and the fix."""


def smallest_class_table(table: pd.DataFrame, bs: int, seed: int) -> pd.DataFrame:
    """The smallest class's rows with an `is_valid` column, the training rows repeated to at least 2 * bs: fastai
    drops an incomplete last batch, and the second step is the first to hold the optimiser's state (the real peak)."""
    label, count = smallest_class(table["label"])
    if count < 2:
        raise ProbeError(f"train.csv has {count} {label} image(s), its smallest class; the probe needs at least 2")
    rows = table[table["label"] == label].reset_index(drop=True)
    is_valid = validation_mask(rows["label"], PROBE_VALID_PCT, seed)
    train_rows, valid_rows = rows[~is_valid], rows[is_valid]
    repeats = math.ceil(2 * bs / len(train_rows))
    return pd.concat([pd.concat([train_rows] * repeats).assign(is_valid=False), valid_rows.assign(is_valid=True)],
                     ignore_index=True)


def probe_fit(member: MemberConfig, table: pd.DataFrame, bs: int, accum: int, seed: int, epochs: int,
              precision: str = "auto") -> None:
    """A short fit of the member as train builds it, unfrozen: the worst case for memory, as the seeds probe."""
    seed_everything(seed)
    dls = member_dataloaders(member, table, bs, accum, seed)
    learn = member_learner(member, dls, bs, accum, mixed_precision=precision)
    learn.unfreeze()
    learn.fit_one_cycle(epochs, member.lr if isinstance(member.lr, float) else LR_WHEN_FIND)


def measure_peak(member: MemberConfig, table: pd.DataFrame, bs: int, accum: int, seed: int, epochs: int,
                 precision: str = "auto") -> dict:
    """Peak memory of `probe_fit` at this accum: torch.cuda's in this process on a GPU, else a fresh child's RSS."""
    fit = functools.partial(probe_fit, member, table, bs, accum, seed, epochs, precision)
    return (cuda_peak if compute_device().type == "cuda" else peak_rss_in_child)(fit, f"accum={accum}")


def peak_rss_in_child(fit: Callable[[], None], what: str) -> dict:
    """Peak resident memory of a fresh child process running `fit` (picklable), with its baseline and duration.

    A process's peak never falls: each run gets its own, forked from a server that only imported the libraries. A
    child killed by the kernel (out of memory) did not fit; any other failure fails the probe.
    """
    context = multiprocessing.get_context("forkserver")
    # Not pipeline.probe itself: a child of `python -m pipeline.probe` runs it again as __mp_main__, and runpy warns
    # when it is already imported. Its heavy imports are what the preload saves.
    context.set_forkserver_preload(["pipeline.vision", "fastai.vision.all", "timm"])
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_measure_in_child, args=(sender, fit))
    try:
        child.start()
        sender.close()
        outcome = receiver.recv()
    except EOFError:
        child.join()
        if child.exitcode == -signal.SIGKILL:
            return {"peak_gib": None, "error": "the child process was killed (out of memory)"}
        raise ProbeError(f"the child process measuring {what} exited with code {child.exitcode}") from None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (common.stage_main): the measurement stops with the probe
        if child.pid is not None:
            child.kill()
        raise
    child.join()
    if "failure" in outcome:
        raise ProbeError(f"the fit at {what} failed in its child process:\n{outcome['failure']}")
    return outcome


def _measure_in_child(sender, fit: Callable[[], None]) -> None:
    # ru_maxrss is in KiB on Linux (bytes on macOS; this project runs on Linux).
    try:
        started = time.perf_counter()
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        fit()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        sender.send({"peak_gib": peak / GIB, "baseline_gib": baseline / GIB, "above_baseline_gib": (peak - baseline) / GIB,
                     "seconds": round(time.perf_counter() - started, 2)})
    except Exception:
        sender.send({"failure": traceback.format_exc()})


def cuda_peak(fit: Callable[[], None], what: str = "the fit") -> dict:
    """Peak CUDA memory of `fit` from an emptied cache (`peak_gib`: the allocator's peak reserved, what the GPU must
    have); the GPU's process list, once freed again, is logged. Out of memory is recorded as not fitting."""
    free_cuda_memory()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    started = time.perf_counter()
    try:
        fit()
    except torch.cuda.OutOfMemoryError:
        outcome = {"peak_gib": None, "error": "CUDA out of memory"}
    else:
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        outcome = {"peak_gib": reserved / GIB, "peak_reserved_gib": reserved / GIB, "peak_allocated_gib": allocated / GIB,
                   "baseline_gib": baseline / GIB, "above_baseline_gib": (allocated - baseline) / GIB}
    outcome["seconds"] = round(time.perf_counter() - started, 2)
    log(STAGE, f"GPU processes after {what}:\n{free_cuda_memory()}")
    return outcome


def free_cuda_memory() -> str:
    """The seeds' report_gpu(): gc + empty_cache, so the GPU is clean without restarting; returns the process list."""
    processes = torch.cuda.list_gpu_processes()
    gc.collect()
    torch.cuda.empty_cache()
    return processes


def probe_member(name: str, member: MemberConfig, table: pd.DataFrame, config: ProbeConfig, bs: int, seed: int,
                 measure: Measure) -> dict:
    """Measure every candidate accum on the smallest class and choose one; `accum`/`accum_source` are the decision."""
    probe_table = smallest_class_table(table, bs, seed)
    label, count = smallest_class(table["label"])
    peaks = {}
    for accum in sorted(set(config.accums) | ({member.accum} - {None})):  # a member's own accum is measured too
        log(STAGE, f"{name}: {member.arch}, {batch_size(bs, accum)} images per step (accum={accum}) ...")
        run = peaks[accum] = measure(member, probe_table, bs, accum, seed, config.epochs)
        run["fits"] = run["peak_gib"] is not None and run["peak_gib"] <= config.budget_gib
        shown = (f"did not finish ({run['error']})" if run["peak_gib"] is None else
                 f"peak {run['peak_gib']:.3f} GiB ({run['above_baseline_gib']:.3f} GiB above baseline), "
                 f"{'fits' if run['fits'] else 'over budget'}, {run['seconds']} s")
        log(STAGE, f"{name}: accum={accum}: {shown}")
    chosen = choose_accum({accum: run["peak_gib"] for accum, run in peaks.items()}, config.budget_gib)
    result = {"member": name, "arch": member.arch, "bs": bs, "budget_gib": config.budget_gib,
              "smallest_class": {"label": label, "count": count},
              "train_images_per_epoch": int((~probe_table["is_valid"]).sum()), "epochs": config.epochs,
              "peaks": {str(accum): run for accum, run in peaks.items()}, "chosen_accum": chosen}
    if chosen is None and member.accum is None:
        return result | {"accum": None, "accum_source": None}
    accum, source = accum_to_use(member, {"member": name, "accum": chosen, "accum_source": "probe"})
    return result | {"accum": accum, "accum_source": source}


def decision(result: Mapping[str, Any]) -> dict:
    """metrics/probe/<member>.accum.json: what train reads, nothing measured; accum null: nothing fitted."""
    return {"member": result["member"], "accum": result["accum"], "accum_source": result["accum_source"]}


def check_fits(result: Mapping[str, Any]) -> None:
    """Raise ProbeError, naming the member, its smallest peak and what to change, when it has no accum to use."""
    if result["accum"] is not None:
        return
    measured = {accum: run["peak_gib"] for accum, run in result["peaks"].items() if run["peak_gib"] is not None}
    accum, peak = min(measured.items(), key=lambda item: item[1], default=(None, None))
    smallest = "every run ran out of memory" if peak is None else f"its smallest peak is {peak:.2f} GiB at accum={accum}"
    raise ProbeError(f"member {result['member']!r} does not fit the {result['budget_gib']} GiB budget (probe.budget_gib) "
                     f"at any accum in {list(map(int, result['peaks']))}: {smallest}; add a larger accum to probe.accums, "
                     "lower the member's size/resize or pick a smaller arch, raise probe.budget_gib, or set the member's "
                     "accum explicitly")


def plot_rows(result: Mapping[str, Any]) -> pd.DataFrame:
    """One row per measured accum: what dvc plots draws (peak and budget vs accum)."""
    return pd.DataFrame([{"member": result["member"], "accum": int(accum), "peak_gib": run["peak_gib"],
                          "above_baseline_gib": run.get("above_baseline_gib"), "budget_gib": result["budget_gib"]}
                         for accum, run in result["peaks"].items()])


def write_budget_chart(result: Mapping[str, Any], path: Path) -> None:
    """Peak memory vs accum with the budget line (dvc's templates draw one y column), log scale: a demo's MiB and a
    16 GiB budget both read. A bare Figure: no pyplot state, no GUI backend."""
    rows = plot_rows(result)
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    axes.plot(rows["accum"], rows["peak_gib"], marker="o", label=f"peak ({result['memory']})")
    axes.plot(rows["accum"], rows["above_baseline_gib"], marker="o", linestyle="--", label="above baseline")
    axes.axhline(result["budget_gib"], color="red", label=f"budget {result['budget_gib']} GiB")
    axes.set(xscale="log", yscale="log", xlabel="accum (images per step = bs // accum)", ylabel="GiB",
             title=f"probe: {result['member']} ({result['arch']}, {result['device']}), chosen accum "
                   f"{result['chosen_accum']}")
    axes.set_xticks(rows["accum"], [str(accum) for accum in rows["accum"]], minor=False)
    axes.xaxis.set_minor_locator(NullLocator())
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)


def write_outputs(result: Mapping[str, Any], metrics_path: Path, decision_path: Path, table_path: Path,
                  chart_path: Path) -> None:
    write_json(metrics_path, result)
    write_json(decision_path, decision(result))
    with atomic_path(table_path) as tmp:
        plot_rows(result).to_csv(tmp, index=False)
    with atomic_path(chart_path) as tmp:
        write_budget_chart(result, tmp)


@stage_main(STAGE, ParamsError, ProbeError)
def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit(f"{STAGE}: usage: python -m pipeline.probe <member> (a name under train.members)")
    name, params = args[0], read_params()
    train = load_train_config(params)
    member = train.member(name)
    # Under DDP each GPU holds bs // processes of the batch: measure the memory one GPU needs.
    processes = process_count(train.devices)
    bs = process_batch(train.bs, processes)
    config = load_probe_config(params, train.bs, processes)
    data_dir = member_data_dir(member.images)
    if not train_csv(data_dir).is_file():
        raise ProbeError(f"{train_csv(data_dir)}: not found; run `dvc repro {WRITTEN_BY[data_dir]}` first")
    table = read_train_table(data_dir)
    cuda = compute_device().type == "cuda"
    started = time.perf_counter()
    # The probe measures in the precision train will use: fp16 and fp32 activations differ twofold.
    measure = functools.partial(measure_peak, precision=train.precision)
    result = {"profile": profile_of(params), "device": f"cuda ({torch.cuda.get_device_name()})" if cuda else "cpu",
              "processes": processes, "memory": "torch.cuda peak reserved" if cuda else "peak RSS of a fresh child process",
              **probe_member(name, member, table, config, bs, seed_of(params), measure),
              "seconds": round(time.perf_counter() - started, 1)}
    write_outputs(result, METRICS_DIR / f"{name}.json", probe_decision_path(name), PLOTS_DIR / f"{name}.csv",
                  PLOTS_DIR / f"{name}.png")
    check_fits(result)
    log(STAGE, f"{name}: accum {result['accum']} (from {result['accum_source']}), budget {config.budget_gib} GiB")


if __name__ == "__main__":
    main()
