"""Stage `probe@<member>`: how much memory a member needs to train, and the gradient accumulation that fits a budget.

As in the seeds ("Road to the Top", part 3): train the member briefly on the smallest class only; every step sees
as many images of the same size as the real run, so the peak memory is the real run's, at a fraction of the time.
The smallest class is the one of the data actually loaded (counted in train.csv), recorded in the metrics.
Each candidate accum is measured; the chosen accum is the smallest whose peak fits `probe.budget_gib` (the target
GPU's memory). On CUDA the peak is torch.cuda's, with memory freed between runs (gc + empty_cache, the GPU's
process list logged); on CPU it is the peak resident memory of a fresh child process per run, so the runs cannot
leak into each other's numbers.

Also checks that gradient accumulation is what the seeds say it is: one optimiser step over k small batches under
fastai's GradientAccumulation against one step over the full batch. Without batch norm the weights agree to float
precision; with it (fastai's head has BatchNorm1d) they do not, and the difference is reported. The check runs on
the member's own head at its real input width and on a small body of the member's timm family (its own
architecture, one narrow block per stage), in float64 on the CPU: a few MB whatever the member's size, never on the
GPU being measured.

Outputs: metrics/probe/<member>.json (peaks, seconds, the check: for people and `dvc metrics`),
metrics/probe/<member>.accum.json (the decision: the accum train uses and its source, nothing measured, so a re-probe
with the same outcome leaves it byte-identical and retrains nothing; the only probe file train reads),
plots/probe/<member>.csv (peak vs accum) and plots/probe/<member>.png (the same with the budget line).
"""

from __future__ import annotations

import copy
import functools
import gc
import itertools
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
import timm
import torch
import torch.nn.functional as F
from fastai.callback.training import GradientAccumulation
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.optimizer import SGD
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from timm.layers import DropBlock2d, DropPath
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline.common import atomic_path, log, stage_main, write_json
from pipeline.members import ProbeConfig, load_probe_config
from pipeline.torch_setup import compute_device, quiet_progress, seed_everything
from pipeline.distributed import process_batch, process_count
from pipeline.paddy import DATA_DIR, read_train_table, smallest_class, train_csv, validation_mask
from pipeline.params import ParamsError, profile_of, read_params, seed_of
from pipeline.vision import (
    N_CLASSES,
    MemberConfig,
    accum_to_use,
    batch_size,
    choose_accum,
    load_train_config,
    member_dataloaders,
    member_learner,
    member_network,
    probe_decision_path,
    timm_overlay,
)

STAGE = "probe"
METRICS_DIR = Path("metrics/probe")
PLOTS_DIR = Path("plots/probe")
GIB = 1024**3
PROBE_VALID_PCT = 0.2  # the seeds' valid_pct for the smallest-class run
LR_WHEN_FIND = 1e-3  # memory does not depend on the learning rate, so the probe skips lr_find
EQUIVALENCE_IMAGES = 8  # images in the one optimiser step of the gradient-accumulation check
EQUIVALENCE_K = 2  # ... split into this many accumulated steps
EQUIVALENCE_ATOL = 1e-9  # in float64; the sums' rounding is ~1e-16, a real difference is many orders larger

# Whether accumulation equals the full batch depends on a network's kinds of layers (batch norm, dropout), not on its
# depth or width. So the check's body is the member's own timm architecture shrunk by these constructor arguments of
# its timm module (family): same blocks, norms and input size, one narrow block per stage, a few hundred thousand
# parameters. The families of both profiles are listed; a body of another family is checked as it is when it has at
# most SMALL_BODY_MAX_PARAMS parameters (80 MB per float64 copy), and otherwise left out of the check, which says so.
SMALL_BODY_KWARGS: dict[str, dict[str, Any]] = {
    "convnext": dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
    "resnet": dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8),
    "vision_transformer": dict(depth=1, embed_dim=32, num_heads=2),
    "swin_transformer": dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 1, 1)),
    "swin_transformer_v2": dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 1, 1)),
}
SMALL_BODY_MAX_PARAMS = 10_000_000
DROPOUT_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
NORM_LAYERS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.LocalResponseNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)

Measure = Callable[[MemberConfig, pd.DataFrame, int, int, int, int], dict]


class ProbeError(RuntimeError):
    """The probe cannot run or its outcome is unusable: a one-line message naming the member and the fix."""


# -- the data: the smallest class --------------------------------------------------------------------------------


def smallest_class_table(table: pd.DataFrame, bs: int, seed: int) -> pd.DataFrame:
    """The smallest class's rows with an `is_valid` column, the training rows repeated to at least 2 * bs.

    The smallest class is that of `table`, the data actually loaded. Repeating matters on small data (the demo's
    smallest class has ~30 images, fewer than bs): fastai drops the last incomplete training batch, and every step
    must see `bs // accum` images, the real run's memory per step. Two effective batches, because the optimiser's
    state only exists from the first step on, so the second step is the first to hold weights, gradients, optimiser
    state and activations at once (the real run's peak).
    """
    label, count = smallest_class(table["label"])
    if count < 2:
        raise ProbeError(f"train.csv has {count} {label} image(s), its smallest class; the probe needs at least 2")
    rows = table[table["label"] == label].reset_index(drop=True)
    is_valid = validation_mask(rows["label"], PROBE_VALID_PCT, seed)
    train_rows, valid_rows = rows[~is_valid], rows[is_valid]
    repeats = math.ceil(2 * bs / len(train_rows))
    return pd.concat(
        [pd.concat([train_rows] * repeats).assign(is_valid=False), valid_rows.assign(is_valid=True)],
        ignore_index=True,
    )


def candidate_accums(accums: list[int], explicit_accum: int | None) -> list[int]:
    """The accums to measure: the candidates, plus a member's explicit accum so its peak is known too."""
    return sorted(set(accums) | ({explicit_accum} if explicit_accum is not None else set()))


# -- one measurement ---------------------------------------------------------------------------------------------


def probe_fit(
    member: MemberConfig, table: pd.DataFrame, bs: int, accum: int, seed: int, epochs: int, precision: str = "auto"
) -> None:
    """A short fit of the member exactly as train builds it, unfrozen.

    Unfrozen is the worst case for memory (a frozen body keeps no gradients), and what the seeds probe with
    (finetune=False); fine_tune's unfrozen epochs need the same.
    """
    seed_everything(seed)
    dls = member_dataloaders(member, table, bs, accum, seed)
    learn = member_learner(member, dls, bs, accum, mixed_precision=precision)
    learn.unfreeze()
    learn.fit_one_cycle(epochs, member.lr if isinstance(member.lr, float) else LR_WHEN_FIND)


def measure_cpu(
    member: MemberConfig, table: pd.DataFrame, bs: int, accum: int, seed: int, epochs: int, precision: str = "auto"
) -> dict:
    """Peak resident memory of `probe_fit` at this accum, in a fresh child process."""
    fit = functools.partial(probe_fit, member, table, bs, accum, seed, epochs, precision)
    return peak_rss_in_child(fit, f"accum={accum}")


def peak_rss_in_child(fit: Callable[[], None], what: str) -> dict:
    """Peak resident memory of a fresh child process running `fit` (picklable), with its baseline and duration.

    A fresh process per run, because freed memory is not reliably returned to the OS and a process's peak never
    falls: measured in one process, every run after the largest would report the largest. The children fork from
    a server that has only imported the libraries (multiprocessing's forkserver), so none starts with another's
    memory and none pays the imports' ten seconds. A child killed by the kernel (out of memory) is recorded as not
    fitting; one that fails otherwise fails the probe.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["fastai.vision.all", "timm", "pipeline.probe"])
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
    try:
        started = time.perf_counter()
        baseline = _peak_rss_bytes()
        fit()
        peak = _peak_rss_bytes()
        sender.send(
            {
                "peak_gib": peak / GIB,
                "baseline_gib": baseline / GIB,
                "above_baseline_gib": (peak - baseline) / GIB,
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
    except Exception:
        sender.send({"failure": traceback.format_exc()})


def _peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS; this project runs on Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_cuda(
    member: MemberConfig, table: pd.DataFrame, bs: int, accum: int, seed: int, epochs: int, precision: str = "auto"
) -> dict:
    """Peak CUDA memory of `probe_fit` at this accum, in this process."""
    outcome = cuda_peak(functools.partial(probe_fit, member, table, bs, accum, seed, epochs, precision))
    log(STAGE, f"GPU processes after accum={accum}:\n{outcome.pop('gpu_processes')}")
    return outcome


def cuda_peak(fit: Callable[[], None]) -> dict:
    """Peak CUDA memory of `fit`, from a freshly emptied cache, and the GPU's process list once it is freed again.

    `peak_gib` is the peak reserved by PyTorch's caching allocator (what the GPU must have, near what nvidia-smi
    shows less the CUDA context); `above_baseline_gib` is the peak allocated above what was allocated before. An
    out-of-memory run is recorded as not fitting (the caller tries the next accum).
    """
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
        outcome = {
            "peak_gib": reserved / GIB,
            "peak_reserved_gib": reserved / GIB,
            "peak_allocated_gib": allocated / GIB,
            "baseline_gib": baseline / GIB,
            "above_baseline_gib": (allocated - baseline) / GIB,
        }
    outcome["seconds"] = round(time.perf_counter() - started, 2)
    outcome["gpu_processes"] = free_cuda_memory()
    return outcome


def free_cuda_memory() -> str:
    """The seeds' report_gpu(): gc + empty_cache, so the GPU is clean without restarting; returns the process list."""
    processes = torch.cuda.list_gpu_processes()
    gc.collect()
    torch.cuda.empty_cache()
    return processes


# -- the gradient-accumulation check -----------------------------------------------------------------------------


def grad_accum_equivalence(model_factory: Callable, inputs, targets, k: int, lr: float = 0.1) -> float:
    """Largest |weight difference| between one optimiser step over `k` batches of len(inputs) // k items under
    fastai's GradientAccumulation(len(inputs)) and one step over all of them; same initial weights, same order, SGD.

    The model stays in training mode (batch norm uses batch statistics, as in a real run).
    """
    n_items = len(inputs)
    if k < 1 or n_items % k:
        raise ValueError(f"k={k} must be a positive divisor of the {n_items} items")
    items = list(zip(inputs, targets))
    initial = model_factory()

    def float32_loss(output, target):
        # fastai's Recorder smooths the loss in float32. The cast's gradient is exact (1, or 1/k under
        # GradientAccumulation), so a float64 model still gets float64 gradients.
        return F.cross_entropy(output, target).float()

    def weights_after_one_step(step_bs: int, cbs: list):
        loader = DataLoader(items, bs=step_bs, shuffle=False, drop_last=False, device=inputs.device)
        no_validation = DataLoader([], bs=step_bs)  # a validation pass cannot change the weights: skip its cost
        learn = Learner(DataLoaders(loader, no_validation), copy.deepcopy(initial), loss_func=float32_loss,
                        opt_func=SGD, lr=lr, cbs=cbs)
        quiet_progress(learn)
        with learn.no_logging():
            learn.fit(1, lr)
        return [p.detach() for p in learn.model.parameters()]

    full = weights_after_one_step(n_items, [])
    accumulated = weights_after_one_step(n_items // k, [GradientAccumulation(n_items)])
    return max(float((a - b).abs().max()) for a, b in zip(accumulated, full))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(module, _BatchNorm) for module in model.modules())


def norm_layers(model: nn.Module) -> list[str]:
    """The kinds of normalisation layers in a model, by class name (the layers that decide the check's outcome)."""
    return sorted({type(module).__name__ for module in model.modules() if isinstance(module, NORM_LAYERS)})


def member_network_on_meta(member: MemberConfig) -> nn.Module:
    """The member's network as member_learner builds it (vision.member_network) on the meta device.

    Meta tensors have shapes but no memory: the real network's layers and the body's output shape for nothing,
    whatever the member's size. The weights do not matter here, so no pretrained weights are loaded.
    """
    with torch.device("meta"):
        return member_network(member, pretrained=False)


def without_dropout(model: nn.Module) -> nn.Module:
    """Dropout and stochastic depth draw different masks for k small batches than for one large one, a difference
    that has nothing to do with accumulation: the check turns them off (swin's default drop_path_rate is 0.1)."""
    for layer in model.modules():
        if isinstance(layer, DROPOUT_LAYERS):
            layer.p = 0.0
        elif isinstance(layer, (DropPath, DropBlock2d)):
            layer.drop_prob = 0.0
    return model


def materialized(module: nn.Module, seed: int) -> nn.Module:
    """A real float64 copy on the CPU of a module on the meta device, initialised by its layers' reset_parameters.

    Tensors that no layer resets are zeros, not uninitialised memory; float64 makes rounding negligible next to a
    real difference.
    """
    model = copy.deepcopy(module).to_empty(device="cpu").double()
    torch.manual_seed(seed)
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tensor.zero_()
        for layer in model.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
    return without_dropout(model)


def small_body(member: MemberConfig, body: nn.Module, seed: int) -> tuple[nn.Module | None, dict]:
    """A small body of the member's family with the same normalisation layers, in float64, or None and why not.

    `body` is the member's timm model (on meta). The small one keeps timm's own classifier (pooling + linear, no batch
    norm), so that the check sees the body's layers and nothing of fastai's head.
    """
    family = type(body).__module__.rsplit(".", 1)[-1]
    n_params = sum(parameter.numel() for parameter in body.parameters())
    if family in SMALL_BODY_KWARGS:
        kwargs = SMALL_BODY_KWARGS[family]
    elif n_params <= SMALL_BODY_MAX_PARAMS:
        kwargs = {}
    else:
        return None, {"family": family, "skipped": f"no small body known for timm family {family!r} and the body has "
                      f"{n_params / 1e6:.0f}M parameters (> {SMALL_BODY_MAX_PARAMS / 1e6:.0f}M)"}
    torch.manual_seed(seed)
    small = timm.create_model(
        member.arch, pretrained=False, num_classes=member.n_out, pretrained_cfg_overlay=timm_overlay(member), **kwargs
    )
    small = without_dropout(small)
    about = {"family": family, "arch": member.arch, "shrunk_by": kwargs, "norm_layers": norm_layers(small)}
    if norm_layers(small) != norm_layers(body):
        return None, about | {"skipped": f"the small body's norm layers differ from the member's {norm_layers(body)}"}
    return small.double(), about


def member_grad_accum_check(member: MemberConfig, seed: int) -> dict:
    """The equivalence check on the member's own head at its real input width and on a small body of its family.

    Both in float64 on the CPU, on random inputs: the head gets features of the shape the member's body outputs
    for images of the member's training size; the small body gets such images. `has_batchnorm` is the member's
    whole real network's; `equivalent` is True when both parts are, False when either is not, else None (a part
    was left out).
    """
    started = time.perf_counter()
    height, width = member.size if isinstance(member.size, tuple) else (member.size, member.size)
    network = member_network_on_meta(member)
    body, head = network[0], network[1]
    features = body(torch.empty(EQUIVALENCE_IMAGES, 3, height, width, device="meta"))
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, N_CLASSES, (EQUIVALENCE_IMAGES,), generator=generator)
    head_inputs = torch.randn(*features.shape, dtype=torch.float64, generator=generator)
    head_diff = grad_accum_equivalence(lambda: materialized(head, seed), head_inputs, targets, EQUIVALENCE_K)
    parts = {"head": {"input_shape": list(features.shape), "norm_layers": norm_layers(head),
                      "max_abs_weight_diff": head_diff, "equivalent": head_diff <= EQUIVALENCE_ATOL}}
    small, parts["body"] = small_body(member, body.model, seed)
    if small is not None:
        images = torch.randn(EQUIVALENCE_IMAGES, 3, height, width, dtype=torch.float64, generator=generator)
        body_diff = grad_accum_equivalence(lambda: small, images, targets, EQUIVALENCE_K)
        parts["body"] |= {"max_abs_weight_diff": body_diff, "equivalent": body_diff <= EQUIVALENCE_ATOL}
    outcomes = [part.get("equivalent") for part in parts.values()]  # None: that part was not checked
    return {
        "method": "the member's head at its real input width + a small body of its timm family, float64 on the CPU",
        "k": EQUIVALENCE_K,
        "images": EQUIVALENCE_IMAGES,
        "has_batchnorm": has_batchnorm(network),
        "max_abs_weight_diff": max(part["max_abs_weight_diff"] for part in parts.values() if "equivalent" in part),
        "equivalent": False if False in outcomes else None if None in outcomes else True,
        **parts,
        "seconds": round(time.perf_counter() - started, 2),
    }


# -- the whole probe of one member -------------------------------------------------------------------------------


def probe_member(
    name: str,
    member: MemberConfig,
    table: pd.DataFrame,
    config: ProbeConfig,
    bs: int,
    seed: int,
    measure: Measure,
) -> dict:
    """Measure every candidate accum on the smallest class and choose one; `accum`/`accum_source` are the decision."""
    probe_table = smallest_class_table(table, bs, seed)
    label, count = smallest_class(table["label"])
    peaks = {}
    for accum in candidate_accums(config.accums, member.accum):
        log(STAGE, f"{name}: {member.arch}, {batch_size(bs, accum)} images per step (accum={accum}) ...")
        peaks[accum] = measure(member, probe_table, bs, accum, seed, config.epochs)
        peaks[accum]["fits"] = peaks[accum]["peak_gib"] is not None and peaks[accum]["peak_gib"] <= config.budget_gib
        log(STAGE, f"{name}: accum={accum}: {_shown_peak(peaks[accum])}")
    chosen = choose_accum({accum: run["peak_gib"] for accum, run in peaks.items()}, config.budget_gib)
    result = {
        "member": name,
        "arch": member.arch,
        "bs": bs,
        "budget_gib": config.budget_gib,
        "smallest_class": {"label": label, "count": count},
        "train_images_per_epoch": int((~probe_table["is_valid"]).sum()),
        "epochs": config.epochs,
        "peaks": {str(accum): run for accum, run in peaks.items()},
        "chosen_accum": chosen,
    }
    if chosen is None and member.accum is None:
        return result | {"accum": None, "accum_source": None}
    accum, source = accum_to_use(member, {"member": name, "accum": chosen, "accum_source": "probe"})
    return result | {"accum": accum, "accum_source": source}


def decision(result: Mapping[str, Any]) -> dict:
    """metrics/probe/<member>.accum.json: what train reads, and nothing measured (seconds, peaks).

    `accum` is null (and train refuses to start) when nothing fitted and the member sets no accum of its own.
    """
    return {"member": result["member"], "accum": result["accum"], "accum_source": result["accum_source"]}


def check_fits(result: Mapping[str, Any]) -> None:
    """Raise ProbeError, naming the member, its smallest peak and what to change, when it has no accum to use."""
    if result["accum"] is not None:
        return
    measured = {accum: run["peak_gib"] for accum, run in result["peaks"].items() if run["peak_gib"] is not None}
    if measured:
        accum, peak = min(measured.items(), key=lambda item: item[1])
        smallest = f"its smallest peak is {peak:.2f} GiB at accum={accum}"
    else:
        smallest = "every run ran out of memory"
    raise ProbeError(
        f"member {result['member']!r} does not fit the {result['budget_gib']} GiB budget (probe.budget_gib) at any "
        f"accum in {list(map(int, result['peaks']))}: {smallest}; add a larger accum to probe.accums, lower the "
        "member's size/resize or pick a smaller arch, raise probe.budget_gib, or set the member's accum explicitly"
    )


def _shown_peak(run: Mapping[str, Any]) -> str:
    if run["peak_gib"] is None:
        return f"did not finish ({run['error']})"
    return (
        f"peak {run['peak_gib']:.3f} GiB ({run['above_baseline_gib']:.3f} GiB above baseline), "
        f"{'fits' if run['fits'] else 'over budget'}, {run['seconds']} s"
    )


def plot_rows(result: Mapping[str, Any]) -> pd.DataFrame:
    """One row per measured accum: what dvc plots draws (peak and budget vs accum)."""
    return pd.DataFrame(
        [
            {
                "member": result["member"],
                "accum": int(accum),
                "peak_gib": run["peak_gib"],
                "above_baseline_gib": run.get("above_baseline_gib"),
                "budget_gib": result["budget_gib"],
            }
            for accum, run in result["peaks"].items()
        ]
    )


def device_name(device: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"


def write_budget_chart(result: Mapping[str, Any], path: Path) -> None:
    """Peak memory vs accum with the budget as a line (dvc's templates draw one y column per plot output).

    Log scale, so that a demo model's few hundred MiB and a 16 GiB budget are both readable. matplotlib's Figure
    directly, not pyplot: no global figure state and no GUI backend to choose.
    """
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
    name = args[0]
    params = read_params()
    profile = profile_of(params)
    train = load_train_config(params)
    member = train.member(name)
    # Under DDP each GPU holds bs // processes of the batch: measure the memory one GPU needs.
    processes = process_count(train.devices)
    bs = process_batch(train.bs, processes)
    config = load_probe_config(params, train.bs, processes)
    seed = seed_of(params)
    if not train_csv(DATA_DIR).is_file():
        raise ProbeError(f"{train_csv(DATA_DIR)}: not found; run `dvc repro paddy_data` first")
    table = read_train_table(DATA_DIR)
    device = compute_device()
    started = time.perf_counter()
    # The probe measures in the precision train will use: fp16 and fp32 activations differ twofold.
    measure = functools.partial(measure_cuda if device.type == "cuda" else measure_cpu, precision=train.precision)
    result = probe_member(name, member, table, config, bs, seed, measure)
    check = member_grad_accum_check(member, seed)
    log(STAGE, f"{name}: gradient accumulation vs full batch: equivalent={check['equivalent']}, max |weight "
               f"difference| {check['max_abs_weight_diff']:.2e} ({check['seconds']} s)")
    result = {
        "profile": profile,
        "device": device_name(device),
        "processes": processes,
        "memory": "torch.cuda peak reserved" if device.type == "cuda" else "peak RSS of a fresh child process",
        **result,
        "grad_accum_check": check,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_outputs(result, METRICS_DIR / f"{name}.json", probe_decision_path(name), PLOTS_DIR / f"{name}.csv",
                  PLOTS_DIR / f"{name}.png")
    check_fits(result)
    log(STAGE, f"{name}: accum {result['accum']} (from {result['accum_source']}), budget {config.budget_gib} GiB")


if __name__ == "__main__":
    main()
