"""One member on several devices: DistributedDataParallel through accelerate and fastai's `distrib_ctx`.

`python -m pipeline.train <member>` relaunches itself through torch's launcher, one process per device, when
`train.devices` asks for more than one; docs/gpus.md says how bs, accum and the processes combine, and how an
out-of-memory rank (OOM_EXIT_CODE) restarts them all with accum doubled. A process accelerate's launcher started
(several machines) trains directly.
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import DistributedDataParallelKwargs
from fastai import distributed as fastai_distributed
from fastai.callback.progress import ProgressCallback
from fastai.data.core import TfmdDL
from fastai.torch_core import num_distrib, rank_distrib, to_detach
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from pipeline.common import stage_main
from pipeline.params import ParamsError, read_params
from pipeline.vision import load_train_config

# A worker that ran out of memory exits with this (EX_TEMPFAIL: "try again"); any other failure is 1.
OOM_EXIT_CODE = 75

T = TypeVar("T")


class RestartWithDoubledAccum(Exception):
    """Raised in a launched process that ran out of memory: every rank must restart, with accum doubled."""


def process_count(devices: int | str, visible_gpus: int | None = None) -> int:
    """Processes to train with: `auto` is one per visible GPU (one on a CPU); a count is that many (gloo on CPU)."""
    gpus = torch.cuda.device_count() if visible_gpus is None else visible_gpus
    if devices == "auto":
        return max(gpus, 1)
    if devices < 1:
        raise ParamsError(f"params.yaml: train.devices is {devices}; use auto or a positive count")
    if gpus and devices > gpus:
        raise ParamsError(f"params.yaml: train.devices is {devices} but {gpus} GPU(s) are visible; lower it or use auto")
    return devices


def process_batch(bs: int, processes: int | None = None) -> int:
    """The batch one process accounts for, bs // processes (default: this run's); its step batch is that // accum."""
    processes = world_size() if processes is None else processes
    if bs < processes:
        raise ParamsError(f"params.yaml: train.bs {bs} is smaller than the {processes} processes; raise bs or lower "
                          "train.devices")
    return bs // processes


def launched() -> bool:
    """True in a process started by torch's or accelerate's launcher (they set WORLD_SIZE, which fastai reads)."""
    return num_distrib() > 0


def world_size() -> int:
    return max(num_distrib(), 1)


rank = rank_distrib  # fastai's: RANK, 0 in a single process


def is_rank0() -> bool:
    return rank_distrib() == 0


def launch(module: str, args: list[str], processes: int) -> set[int]:
    """Run `python -m module *args` in `processes` local processes; the failed ranks' exit codes (empty: success).

    torch.distributed.run in-process, not a `torchrun` subprocess, so that the exit codes (an OOM's) reach us;
    `--standalone` picks a free local port, so parallel stages do not collide.
    """
    # torchrun would set 1 thread and warn; CPU processes share the cores instead (GPU ones need few).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    try:
        run(get_args_parser().parse_args(["--standalone", f"--nproc-per-node={processes}", "--module", module, *args]))
    except ChildFailedError as err:
        return {failure.exitcode for failure in err.failures.values()}
    return set()


def launch_with_oom_retries(module: str, args: list[str], processes: int, log: Callable[[str], None]) -> int:
    """`launch`, again with `--oom-retries k+1` each time a rank exits with OOM_EXIT_CODE; the retries it took.
    A rank that cannot double accum any further fails with an ordinary error, which ends the loop."""
    retries = 0
    while True:
        failed = launch(module, [*args, "--oom-retries", str(retries)], processes)
        if not failed:
            return retries
        if OOM_EXIT_CODE not in failed:  # the launcher's own SIGTERM of the other ranks shows as -15
            raise SystemExit(f"{module}: a training process failed (exit codes {sorted(failed)}); see its error above")
        retries += 1
        log(f"a rank ran out of memory; restarting all {processes} processes with accum doubled (retry {retries})")


@contextmanager
def worker() -> Iterator[None]:
    """In a launched process: join the process group through accelerate (gloo on CPU only when told `cpu=True`),
    leave it at the end, exit with OOM_EXIT_CODE when every rank must restart. In a single process: nothing."""
    if not launched():
        yield
        return
    PartialState(cpu=not torch.cuda.is_available())
    try:
        yield
    except RestartWithDoubledAccum as err:
        print(f"[rank {rank()}] {err}", file=sys.stderr, flush=True)
        raise SystemExit(OOM_EXIT_CODE) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class DistributedDL(fastai_distributed.DistributedDL):
    """fastai's DistributedDL, broadcasting the shuffled order on this rank's device (fastai's always uses CUDA,
    which fails under gloo on a CPU machine)."""

    def _broadcast(self, t, rank):
        t = torch.tensor(t, dtype=torch.long, device=self.device)
        dist.broadcast(t, rank)
        return t.cpu().tolist()


class DistributedTrainer(fastai_distributed.DistributedTrainer):
    """fastai's DistributedTrainer (accelerate's DDP, SyncBatchNorm), wrapping loaders in the DistributedDL above."""

    def _wrap_dl(self, dl):
        wrapped = isinstance(dl, fastai_distributed.DistributedDL)
        return dl if wrapped else DistributedDL(dl, device=self.learn.model.device)


@contextmanager
def distrib_ctx(learn) -> Iterator[Any]:
    """fastai's `Learner.distrib_ctx` with the DistributedTrainer above; nothing in a single process.

    SyncBatchNorm on GPUs only (DDP refuses it on CPU modules). find_unused_parameters: fastai's body runs timm's
    forward_features, so a timm head's own layers (convnext's head norm) get no gradient: DDP would stop at step two.
    """
    cpu = not torch.cuda.is_available()
    settings = dict(sync_bn=not cpu, cpu=cpu, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    had_progress = any(isinstance(cb, ProgressCallback) for cb in learn.cbs)
    with learn.distrib_ctx(**settings):
        if world_size() > 1:
            # distrib_ctx added fastai's own trainer; ours is the same but for the loaders' broadcast device.
            learn.remove_cb(fastai_distributed.DistributedTrainer)
            learn.add_cb(DistributedTrainer(**settings))
        yield learn
    if not had_progress and any(isinstance(cb, ProgressCallback) for cb in learn.cbs):
        learn.remove_cb(ProgressCallback)  # fastai's detach gives ranks > 0 progress bars that quiet_progress removed


class RankLocalDL(TfmdDL):
    """A TfmdDL whose predictions stay on this rank (fastai gathers them from all ranks when WORLD_SIZE > 1)."""

    def to_detach(self, b, cpu=True, gather=True):
        return to_detach(b, cpu, gather=False)


def local_dl(dls, items):
    """`dls.test_dl(items)` (validation transforms) predicting on this rank only (see RankLocalDL)."""
    return dls.test_dl(items, cls=RankLocalDL)


def plain_loader(dl):
    """The DataLoader inside a DistributedDL (whose shuffling state it holds), or `dl` itself."""
    return dl.dl if isinstance(dl, fastai_distributed.DistributedDL) else dl


def from_rank0(compute: Callable[[], T]) -> T:
    """`compute()` run on rank 0 alone once every rank got here, its result given to every rank (all agree on it)."""
    if world_size() == 1:
        return compute()
    dist.barrier()
    box = [compute() if is_rank0() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_rank0(value: T) -> list[T] | None:
    """Every rank's `value`, in rank order, on rank 0; None on the other ranks."""
    if world_size() == 1:
        return [value]
    gathered = [None] * world_size() if is_rank0() else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def shard(n_rows: int) -> slice:
    """This rank's contiguous share of n_rows (all of them in one process); the shares, in rank order (as
    gather_to_rank0 gives them), cover each row once, in order."""
    bounds = np.linspace(0, n_rows, world_size() + 1).round().astype(int)
    return slice(int(bounds[rank()]), int(bounds[rank() + 1]))


def describe(processes: int) -> str:
    if torch.cuda.is_available():
        where = ", ".join(f"cuda:{index} ({torch.cuda.get_device_name(index)})" for index in range(processes))
        return f"{processes} process(es), nccl, on {where}" if processes > 1 else f"1 process on {where}"
    return f"{processes} process(es) over gloo on the CPU" if processes > 1 else "1 process on the CPU"


@stage_main("distributed", ParamsError)
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the processes and devices train@<member> would use here.")
    parser.add_argument("--devices", type=lambda text: text if text == "auto" else int(text),
                        help="instead of params.yaml's train.devices: auto or N")
    args = parser.parse_args(argv)
    devices = load_train_config(read_params()).devices if args.devices is None else args.devices
    print(f"train.devices={devices}: {describe(process_count(devices))}")


if __name__ == "__main__":
    main()
