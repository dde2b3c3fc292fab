"""train@<member>: one ensemble member, a fastai Learner on a timm architecture ("Road to the Top").

`python -m pipeline.train <member>` trains a member of `train.members` on the shared validation split (or on
everything: `validation.full`) and writes its weights, TTA probabilities, metrics and DVCLive plots, all or none.
With `validation.folds` K > 1, `--fold k` trains fold k's model (fold@<member>-<k>) and the plain command gathers
the K into the member: test probabilities averaged, out-of-fold ones for every training image. A killed run resumes
from its last epoch unless its fingerprint changed; a CUDA out-of-memory error doubles accum (docs/recovery.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import importlib
import itertools
import json
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
import yaml
from dvclive import Live
from dvclive.fastai import DVCLiveCallback
from dvclive.utils import standardize_metric_name
from fastai.callback.core import Callback, CancelTrainException
from fastai.torch_core import get_model, get_random_states, set_random_states
from matplotlib.figure import Figure
from PIL import Image

from pipeline.common import atomic_path, banner, json_text, log, no_space_error, read_json, stage_main, write_json
from pipeline.torch_setup import compute_device, seed_everything
from pipeline.paddy import (
    CLASSES, DATA_DIR, VARIETIES, WRITTEN_BY, ValidationConfig, fold_of, member_data_dir, read_train_table,
    test_image_dir, test_image_ids, validation_mask,
)
from pipeline.params import ParamsError, load_section, profile_of, read_params, seed_of
from pipeline import distributed, vision
from pipeline.vision import MemberConfig

STAGE = "train"
PROJECT_ROOT = Path(__file__).resolve().parents[1]  # where dvc.yaml and the code it lists are
# What computes the training: a checkpoint made with another version of one of them is not resumed.
LIBRARIES = ("torch", "torchvision", "timm", "fastai", "fastcore", "numpy", "PIL", "albumentations", "cv2")
MODELS_DIR = Path("models")
CHECKPOINTS_DIR = MODELS_DIR / "checkpoints"  # not a DVC output: DVC would delete it before the rerun that needs it
PREDS_DIR = Path("preds")
FOLDS_DIR = Path("folds")  # fold@<member>-<k>'s folds/<member>-<k>/{model.pth,test.csv,valid.csv}: train@<member>'s dep
METRICS_DIR = Path("metrics/train")
LIVE_DIR = Path("dvclive/train")
GIB = 1024**3
LIVE_OPTIONS = dict(dvcyaml=None, save_dvc_exp=False, report=None)  # dvc.yaml declares the plots; no experiments
TOP_LOSSES = 9
MOST_CONFUSED = 10


@dataclass(frozen=True)
class StageConfig:
    """Everything one train@<member> run reads from params.yaml."""

    profile: str
    seed: int
    name: str
    member: MemberConfig
    bs: int
    tta: bool
    validation: ValidationConfig
    precision: str = "auto"
    num_workers: int | str = "auto"
    devices: int | str = "auto"
    fold: int | None = None  # one fold's model (validation.folds > 1), else the member itself

    @property
    def run(self) -> str:
        """The name of this run's outputs and checkpoints: the member's, or <member>-<fold>."""
        return self.name if self.fold is None else f"{self.name}-{self.fold}"


def load_stage_config(params: Mapping[str, Any], name: str, fold: int | None = None) -> StageConfig:
    train = vision.load_train_config(params)
    validation = load_section(ValidationConfig, params, "validation")
    if fold is not None and fold not in validation.fold_ids:
        raise ParamsError(
            f"params.yaml: key 'validation.fold_ids' is {list(validation.fold_ids)}: no fold {fold}; "
            "set validation.folds (> 1) and run `make profile`"
        )
    return StageConfig(
        profile=profile_of(params), seed=seed_of(params), name=name, member=train.member(name), bs=train.bs,
        tta=train.tta, validation=validation, precision=train.precision, num_workers=train.num_workers,
        devices=train.devices, fold=fold,
    )


# -- inputs --------------------------------------------------------------------------------------------------------


class TrainError(Exception):
    """A run that cannot start or go on: the message is one line naming the file and the fix."""


def member_accum(member: MemberConfig, probe_json: Path, process_bs: int) -> tuple[int, str]:
    """The gradient accumulation to train with and its source: params' explicit accum, else the probe's choice,
    which must divide a process's batch `process_bs` into steps of at least one image."""
    if member.accum is not None:
        return vision.accum_to_use(member, {})
    rerun = "run `dvc repro probe` again"
    if not probe_json.is_file():
        raise TrainError(f"{probe_json}: not found; run `dvc repro probe` or set the member's accum in params")
    try:
        decision = read_json(probe_json)
    except ValueError:  # JSONDecodeError, or UnicodeDecodeError for binary bytes
        raise TrainError(f"{probe_json}: not valid JSON; {rerun}") from None
    if not isinstance(decision, dict):
        raise TrainError(f"{probe_json}: not a JSON object (member, accum, accum_source); {rerun}")
    try:
        accum, source = vision.accum_to_use(member, decision)
    except ValueError as err:  # the probe chose no accum: vision's message says what to do
        raise TrainError(f"{probe_json}: {err}") from None
    except TypeError:
        raise TrainError(f"{probe_json}: accum {decision['accum']!r} is not an integer; {rerun}") from None
    if not 1 <= accum <= process_bs:
        raise TrainError(f"{probe_json}: accum {accum} is not between 1 and the batch size {process_bs}; {rerun}")
    return accum, source


def split_table(data_dir: Path, validation: ValidationConfig, fold: int | None = None) -> pd.DataFrame:
    """train.csv with `path` and the shared `is_valid` split (all False when training on everything); with K folds,
    each row's `fold` too, and `is_valid` that of `fold` (every row when None: each is held out by one fold)."""
    table = read_train_table(data_dir)
    if validation.full:
        table["is_valid"] = False
    elif validation.cross_validated:
        table["fold"] = fold_of(table["label"], validation.folds, validation.seed)
        table["is_valid"] = True if fold is None else table["fold"] == fold
    else:
        table["is_valid"] = validation_mask(table["label"], validation.valid_pct, validation.seed)
    return table


def run_fingerprint(cfg: StageConfig, table: pd.DataFrame) -> dict[str, Any]:
    """What a checkpoint must match to be resumed (docs/recovery.md), part by part so that a mismatch names its part.
    Not accum: the OOM fallback resumes with a doubled one. The images are hashed, not read from SOURCE.json: a
    direct run may train on images paddy_data never recorded."""
    config = dict(
        member=dataclasses.asdict(cfg.member) | {"accum": None}, bs=cfg.bs, seed=cfg.seed,
        validation=dataclasses.asdict(cfg.validation),
        rows=table[["image_id", "label", "variety", "is_valid"]].to_csv(index=False),
    )
    images = hashlib.sha256()
    for path in table["path"]:
        images.update(Path(path).read_bytes())
    deps = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]["train"]["do"]["deps"]
    return dict(
        config=hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16],
        images=images.hexdigest()[:16],
        precision=f"{cfg.precision} ({vision.precision_for(cfg.precision, torch.cuda.is_available())})",
        **{f"code {dep}": hashlib.sha256((PROJECT_ROOT / dep).read_bytes()).hexdigest()[:16] for dep in sorted(deps)
           if dep.endswith(".py")},
        **{f"library {name}": importlib.import_module(name).__version__ for name in LIBRARIES},
    )


def fingerprint_changes(saved: Any, current: dict[str, Any]) -> list[str]:
    """The parts of `current` that `saved` (a checkpoint's fingerprint) does not match, named for a log line."""
    if not isinstance(saved, dict):
        return ["the checkpoint format"]
    return sorted(part for part in saved.keys() | current.keys() if saved.get(part) != current.get(part))


# -- the schedule: fine_tune's two phases made explicit, so that fit_one_cycle's start_epoch can resume either --------


@dataclass(frozen=True)
class Phase:
    frozen: bool
    epochs: int
    lr: Any
    kwargs: dict
    size: Any = None  # the batch size of its images (a progressive phase's); None: the member's


def schedule_phases(member: MemberConfig, lr: float) -> list[Phase]:
    """The member's schedule as fit_one_cycle phases; fine_tune matches fastai's own (freeze_epochs=1, lr/2 after).

    With progressive sizes, the member's epochs (fine_tune's unfrozen ones) are split across them, a one-cycle each
    (fastbook's progressive resizing); fine_tune's frozen epoch is at the first size."""
    sizes, epochs = member.progressive or (None,), member.epochs
    # (epochs, size) of each phase: split evenly, the later (larger) phases taking the rest
    split = [(epochs // len(sizes) + (i >= len(sizes) - epochs % len(sizes)), size) for i, size in enumerate(sizes)]
    if member.schedule == "fit_one_cycle":
        return [Phase(frozen=False, epochs=n, lr=lr, kwargs={}, size=size) for n, size in split]
    base_lr = lr / 2
    unfrozen = dict(pct_start=0.3, div=5.0)
    return [
        Phase(frozen=True, epochs=1, lr=slice(lr), kwargs=dict(pct_start=0.99), size=split[0][1]),
        *(Phase(frozen=False, epochs=n, lr=slice(base_lr / 100, base_lr), kwargs=unfrozen, size=s) for n, s in split),
    ]


def resume_point(phases: list[Phase], completed_epochs: int) -> tuple[int, int]:
    """(index of the phase to go on with, the schedule's epochs before it); after the last epoch: the last phase."""
    ends = list(itertools.accumulate(phase.epochs for phase in phases))
    index = next((i for i, end in enumerate(ends[:-1]) if completed_epochs < end), len(phases) - 1)
    return index, ends[index] - phases[index].epochs


# -- checkpoints: model, optimiser and every random state after each completed epoch ---------------------------------


# What json, int() and torch.load raise on a missing, truncated, garbled or foreign file (torch: zip, unpickling).
DAMAGED_FILE_ERRORS = (
    FileNotFoundError, ValueError, TypeError, KeyError, AttributeError, RuntimeError, EOFError, pickle.UnpicklingError
)


def save_torch(payload: Any, path: Path) -> None:
    """torch.save, with a full disk raised as its OSError ENOSPC (which common.no_space_error names).

    torch's zip writer reports a failed write as an opaque RuntimeError ("unexpected pos"): through a Python file
    the write's own OSError is raised first, and is the context of the RuntimeError of closing the archive.
    """
    with open(path, "wb") as stream:
        try:
            torch.save(payload, stream)
        except RuntimeError as err:
            if isinstance(err.__context__, OSError):
                raise err.__context__ from None
            raise


class Checkpoints:
    """A member's resumable progress: `state.json` names the last completed epoch, whose `epoch_<n>.pth` beside it
    holds all of it (model, optimiser, every rank's random states), written whole before state.json points at it.
    DVCLive writes into `live_dir` inside it, so that a resumed run carries on the killed run's history and the
    published plots (dvclive/train/<member>) are only replaced by a finished run's."""

    def __init__(self, directory: Path, fingerprint: dict[str, Any]):
        self.directory, self.fingerprint = Path(directory), fingerprint
        self.live_dir, self.state_file = self.directory / "dvclive", self.directory / "state.json"

    def state(self) -> dict | None:
        """The saved progress if it is this run's and readable; else None, after a line saying why it is not used."""
        if not self.state_file.is_file():
            return None
        reading = self.state_file  # the file being read, named if it is damaged
        try:
            state = read_json(reading)
            changed = fingerprint_changes(state["fingerprint"], self.fingerprint)
            completed = int(state["completed_epochs"])
            if completed and not changed:
                reading = self.epoch_file(completed)
                self.load(completed, "cpu")  # now, so that a damaged file is found before any training
                # DVCLive rewrites its params.yaml in place (not atomically) as each fit starts: a kill there leaves
                # it empty, and Live(resume=True) then fails on every rerun. Its history belongs to the checkpoint.
                reading = self.live_dir / "params.yaml"
                if reading.is_file() and not isinstance(yaml.safe_load(reading.read_text()), dict):
                    raise ValueError("not a mapping of params")
        except (*DAMAGED_FILE_ERRORS, yaml.YAMLError) as err:
            why = f"{type(err).__name__}: {str(err)[:80]}"
            log(STAGE, f"{reading}: unreadable checkpoint ({why}); training from the start")
            return None
        if changed:
            log(STAGE, f"{self.directory}: a checkpoint of another run ({', '.join(changed)} changed); starting fresh")
            return None
        return state

    def epoch_file(self, completed_epochs: int) -> Path:
        return self.directory / f"epoch_{completed_epochs}.pth"

    def start(self, lr: float | None = None, lr_suggestion: float | None = None) -> dict:
        """A fresh run's progress (anything of another run is removed); lr None: not chosen yet."""
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        state = dict(fingerprint=self.fingerprint, completed_epochs=0, lr=lr, lr_suggestion=lr_suggestion)
        write_json(self.state_file, state)
        return state

    def update(self, **changes) -> dict:
        state = read_json(self.state_file) | changes
        write_json(self.state_file, state)
        return state

    def save(self, learn, completed_epochs: int) -> None:
        """Rank 0 writes the checkpoint, with every rank's random states (gathered: one writer, exact resume)."""
        loader = distributed.plain_loader(learn.dls.train)
        rank_states = distributed.gather_to_rank0(dict(get_random_states(), loader=loader.rng.getstate()))
        if rank_states is None:
            return
        checkpoint = dict(model=get_model(learn.model).state_dict(), opt=learn.opt.state_dict(), ranks=rank_states)
        if ema := getattr(learn, "ema_weights", None):
            checkpoint["ema"] = ema.state()
        with atomic_path(self.epoch_file(completed_epochs)) as tmp:
            save_torch(checkpoint, tmp)
        self.update(completed_epochs=completed_epochs)  # the one rename that moves the checkpoint on
        for older in self.directory.glob("epoch_*.pth"):
            if older != self.epoch_file(completed_epochs):
                older.unlink()

    def load(self, completed_epochs: int, device) -> dict:
        checkpoint = torch.load(self.epoch_file(completed_epochs), map_location=device, weights_only=False)
        if not isinstance(checkpoint, dict) or {"model", "opt", "ranks"} - set(checkpoint):
            raise KeyError("not a checkpoint of model, optimiser and random states")
        return checkpoint

    def restore(self, learn, completed_epochs: int) -> None:
        if learn.opt is None:
            learn.create_opt()
        checkpoint = self.load(completed_epochs, learn.dls.device)
        get_model(learn.model).load_state_dict(checkpoint["model"])
        learn.opt.load_state_dict(checkpoint["opt"])
        if ema := getattr(learn, "ema_weights", None):
            ema.load_state(checkpoint["ema"])  # the fingerprint has the member's ema: a checkpoint of this run has it
        ranks = checkpoint["ranks"]
        if distributed.rank() < len(ranks):  # a rank the saved run did not have keeps its fresh seed
            states = ranks[distributed.rank()]
            learn.dls.train.rng.setstate(states.pop("loader"))
            set_random_states(**states)


class SaveEpoch(Callback):
    """Checkpoint after each trained epoch of a phase that starts at `first_epoch` of the whole schedule."""

    order = 60  # after the Recorder (50) has the epoch's metrics, and after LiveEpoch (0) has logged them

    def __init__(self, checkpoints: Checkpoints, first_epoch: int, start_epoch: int):
        self.checkpoints, self.first_epoch, self.start_epoch = checkpoints, first_epoch, start_epoch

    def after_epoch(self):
        if self.epoch >= self.start_epoch:  # fastai still calls after_epoch on the epochs start_epoch skips
            self.checkpoints.save(self.learn, self.first_epoch + self.epoch + 1)


class LiveEpoch(DVCLiveCallback):
    """DVCLive's fastai callback, made to log once per trained epoch across fine_tune's explicit phases: DVCLive's
    own after_epoch fails on the None validation metrics of a `full` run, and fastai still calls it on skipped
    epochs; its after_fit would end the Live run after the first phase (the stage ends it once, after the last)."""

    def __init__(self, live: Live, start_epoch: int):
        super().__init__(live=live)
        self.start_epoch = start_epoch

    def after_epoch(self):
        if self.epoch < self.start_epoch:
            return
        for key, value in zip(self.learn.recorder.metric_names, self.learn.recorder.log):
            if key != "epoch" and value is not None:
                self.live.log_metric(standardize_metric_name(key, "dvclive.fastai"), float(value))
        self.live.next_step()

    def after_fit(self):
        pass


class StepCap(Callback):
    """End each training epoch after `max_steps` optimiser steps; validation still runs whole. (fastai's
    ShortEpochCallback cuts by a share of the epoch and cuts validation too; a rehearsal wants a fixed number of
    real steps, each `accum` batches as GradientAccumulation steps, followed by the real validation.)"""

    def __init__(self, max_steps: int, accum: int):
        self.max_batches = max_steps * accum

    def after_batch(self):
        if self.training and self.iter + 1 >= self.max_batches:
            raise CancelTrainException


def epoch_callbacks(
    checkpoints: Checkpoints, live: Live | None, first_epoch: int, start_epoch: int, step_cap: StepCap | None = None
) -> list:
    """SaveEpoch on every rank (saving gathers every rank's random states), LiveEpoch where there is a logger, and
    the member's step cap if it has one."""
    logger = [] if live is None else [LiveEpoch(live, start_epoch)]
    return [SaveEpoch(checkpoints, first_epoch, start_epoch), *logger, *([] if step_cap is None else [step_cap])]


def rewind_live(live: Live, completed_epochs: int) -> None:
    """Point DVCLive at the checkpoint: step = completed epochs, and no history rows from later epochs (LiveEpoch
    writes an epoch's rows just before SaveEpoch checkpoints it: a kill in between leaves rows of an epoch that the
    resumed run trains and logs again)."""
    live.step = completed_epochs
    for history in Path(live.plots_dir, "metrics").rglob("*.tsv"):
        header, *rows = history.read_text().splitlines(keepends=True)
        step = header.rstrip("\n").split("\t").index("step")
        kept = [row for row in rows if int(row.split("\t")[step]) < completed_epochs]
        if len(kept) < len(rows):
            with atomic_path(history) as tmp:
                tmp.write_text(header + "".join(kept))


# -- training ------------------------------------------------------------------------------------------------------


def fit_member(
    cfg: StageConfig, table: pd.DataFrame, accum: int, checkpoints: Checkpoints, live: Live | None
) -> tuple[Any, dict]:
    """Build the member's DataLoaders and Learner and run its schedule, resuming from the checkpoint run_stage found
    or started; returns the learner and what its training measured, as metrics. `live`: rank 0's DVCLive logger.
    Under DDP (docs/gpus.md) every rank resumes from what rank 0 read."""
    process_bs = distributed.process_batch(cfg.bs)
    seed = cfg.seed + distributed.rank()
    first_size = (cfg.member.progressive or (None,))[0]
    dls = vision.member_dataloaders(cfg.member, table, process_bs, accum, seed, cfg.num_workers, first_size)
    learn = vision.member_learner(cfg.member, dls, process_bs, accum, mixed_precision=cfg.precision)
    learn.path, learn.model_dir = checkpoints.directory, "."  # lr_find's temporary weights go there too
    state = distributed.from_rank0(checkpoints.state)
    if state["lr"] is None:  # the member's lr, or lr_find's `valley` suggestion when it is `find`
        lr, suggestion = cfg.member.lr, None
        if lr == "find":  # on every rank: fastai's lr_find gathers their losses
            if cfg.member.schedule == "fit_one_cycle":
                learn.unfreeze()
            lr = suggestion = float(learn.lr_find(show_plot=False).valley)
        # Kept, so that a resumed run does not run lr_find again.
        state = distributed.from_rank0(lambda: checkpoints.update(lr=lr, lr_suggestion=suggestion))
    completed = state["completed_epochs"]  # 0 for a fresh run
    if completed:
        log(STAGE, f"{cfg.name}: resuming after epoch {completed} from {checkpoints.directory}")
    if live is not None:
        rewind_live(live, completed)
    phases = schedule_phases(cfg.member, state["lr"])
    resume_phase, first_epoch = resume_point(phases, completed)
    cap = cfg.member.max_steps_per_epoch
    step_cap = None if cap is None else StepCap(cap, accum)
    epoch_images = len(dls.train.items) if cap is None else min(len(dls.train.items), cap * cfg.bs)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started, images, size = time.perf_counter(), 0, first_size
    with distributed.distrib_ctx(learn):
        for index, phase in enumerate(phases[resume_phase:], start=resume_phase):
            start_epoch = completed - first_epoch if index == resume_phase else 0
            # Resize, freeze or unfreeze; when resuming into this phase, restore the checkpoint too, on every rank,
            # also with no epoch left (a run killed while predicting). freeze/unfreeze clear the optimiser state and
            # new loaders draw from the random state, so the order matters: at a phase boundary the uninterrupted run
            # did both from the last epoch's state (restore first), inside a phase it goes on with them (restore last).
            restore = index == resume_phase and completed
            if restore and start_epoch == 0:
                checkpoints.restore(learn, completed)
            if phase.size != size:  # progressive resizing: the phase's loaders (their seed from the random state)
                size = phase.size
                learn.dls = vision.member_dataloaders(cfg.member, table, process_bs, accum, None, cfg.num_workers, size)
            (learn.freeze if phase.frozen else learn.unfreeze)()
            if restore and start_epoch:
                checkpoints.restore(learn, completed)
            if start_epoch < phase.epochs:
                cbs = epoch_callbacks(checkpoints, live, first_epoch, start_epoch, step_cap)
                learn.fit_one_cycle(phase.epochs, phase.lr, start_epoch=start_epoch, cbs=cbs, **phase.kwargs)
                images += (phase.epochs - start_epoch) * epoch_images
            first_epoch += phase.epochs
    seconds = time.perf_counter() - started
    if ema := getattr(learn, "ema_weights", None):
        ema.use_averaged()  # what is predicted with and saved (a checkpoint keeps both)
    peaks = images > 0 and torch.cuda.is_available()  # CUDA's, since the reset above, in GiB as the probe's
    return learn, dict(
        accum=accum, lr=state["lr"], lr_suggestion=state["lr_suggestion"], resumed_from_epoch=completed,
        train_seconds=round(seconds, 2), images_per_second=round(images / seconds, 2) if images else None,
        peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 3) if peaks else None,
        peak_allocated_gib=round(torch.cuda.max_memory_allocated() / GIB, 3) if peaks else None,
    )


def train_with_oom_fallback(
    cfg: StageConfig, table: pd.DataFrame, accum: int, checkpoints: Checkpoints, live, retries: int = 0
) -> tuple[Any, dict]:
    """fit_member, doubling accum (halving the step's images) after each CUDA out-of-memory error, up to accum = bs;
    `retries`: the doublings before this call (the launcher's), counted in the metrics' oom_retries.

    Progress is kept: the retry resumes from the last completed epoch's checkpoint.
    """
    while True:
        try:
            learn, trained = fit_member(cfg, table, accum, checkpoints, live)
            return learn, trained | dict(oom_retries=retries)
        except torch.OutOfMemoryError as err:
            if accum * 2 > distributed.process_batch(cfg.bs):
                raise
            if distributed.world_size() > 1:  # the other ranks are stuck in a collective: all must restart
                raise distributed.RestartWithDoubledAccum(f"CUDA out of memory at accum {accum}") from err
            log(STAGE, f"{cfg.name}: CUDA out of memory at accum {accum}; retrying with accum {accum * 2}")
        # Outside the except block: its traceback holds the failed attempt's learner, which must go first.
        gc.collect()
        torch.cuda.empty_cache()  # a no-op where CUDA was never initialised
        retries += 1
        accum *= 2


# -- outputs -------------------------------------------------------------------------------------------------------


def prediction_frames(
    learn, table: pd.DataFrame, data_dir: Path, use_tta: bool
) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(test, valid) probability tables in the ensemble's contract: image_id[, label], then one column per class
    (disease probabilities, with fastai's TTA unless told otherwise); None on the ranks but 0 of a DDP run. Each rank
    predicts its contiguous share of the rows, gathered on rank 0 in their order: not fastai's distributed
    get_preds, which pads the last batch and interleaves the ranks' rows."""
    test_ids = test_image_ids(data_dir)
    test = pd.DataFrame({"image_id": test_ids, "path": [test_image_dir(data_dir) / image_id for image_id in test_ids]})
    valid = table[table["is_valid"]].reset_index(drop=True)
    predict, frames = learn.tta if use_tta else learn.get_preds, []
    for rows, columns in ((test, ["image_id"]), (valid, ["image_id", "label"])):
        share, probs = rows.iloc[distributed.shard(len(rows))], np.zeros((0, len(CLASSES)), dtype=np.float32)
        if len(share):
            probs = predict(dl=distributed.local_dl(learn.dls, share[["path"]]))[0]
            probs = vision.disease_probs(probs).float().numpy()
        if (blocks := distributed.gather_to_rank0(probs)) is not None:
            frames.append(rows[columns].join(pd.DataFrame(np.concatenate(blocks), columns=list(CLASSES))))
    return tuple(frames) or None


def write_outputs(
    root: Path, cfg: StageConfig, weights: dict, predictions: tuple, metrics: dict, live_dir: Path
) -> None:
    """The run's weights, predictions, metrics and plots, all replaced or none (docs/recovery.md): each written to a
    scratch sibling of its target, all renamed once all are complete. A fold's weights and predictions are one
    folder, folds/<member>-<k>: the one dep of its member's train@ stage."""
    if cfg.fold is None:
        sub, writers = Path(), {
            MODELS_DIR / f"{cfg.name}.pth": lambda path: save_torch(weights, path),
            PREDS_DIR / cfg.name: lambda path: write_predictions(path, *predictions),
        }
    else:
        sub, writers = Path("folds"), {FOLDS_DIR / cfg.run: lambda path: write_predictions(path, *predictions, weights)}
    writers |= {
        METRICS_DIR / sub / f"{cfg.run}.json": lambda path: path.write_text(json_text(metrics)),
        # A copy, not a move: until the checkpoint is removed, a killed run's rerun resumes from it and needs it.
        LIVE_DIR / sub / cfg.run: lambda path: shutil.copytree(live_dir, path),
    }
    with contextlib.ExitStack() as outputs:
        for target, write in writers.items():
            with no_space_error(root / target):
                write(outputs.enter_context(atomic_path(root / target)))


def write_predictions(preds_dir: Path, test: pd.DataFrame, valid: pd.DataFrame, weights: dict | None = None) -> None:
    """test.csv and valid.csv, and a fold's weights beside them (model.pth)."""
    preds_dir.mkdir(parents=True)
    test.to_csv(preds_dir / "test.csv", index=False)
    valid.to_csv(preds_dir / "valid.csv", index=False)
    if weights is not None:
        save_torch(weights, preds_dir / "model.pth")


def model_weights(member: MemberConfig, **weights) -> dict:
    """What models/<member>.pth holds: `state_dict` (or a fold model's each, `folds`) and what is needed to rebuild
    the model (arch, targets, class order)."""
    return dict(arch=member.arch, targets=member.targets, n_out=member.n_out, classes=list(CLASSES), **weights)


def validation_summary(valid: pd.DataFrame) -> dict:
    """Error rate, accuracy and the most confused (actual, predicted) pairs of the TTA validation probabilities."""
    if valid.empty:
        return dict(valid_error_rate=None, valid_accuracy=None, most_confused=[])
    predicted = np.asarray(CLASSES)[valid[list(CLASSES)].to_numpy().argmax(axis=1)]
    accuracy = float((predicted == valid["label"].to_numpy()).mean())
    pairs = pd.DataFrame({"actual": valid["label"], "predicted": predicted}).query("actual != predicted")
    most_confused = [
        dict(actual=a, predicted=p, count=int(n)) for (a, p), n in pairs.value_counts().head(MOST_CONFUSED).items()
    ]
    return dict(valid_error_rate=1 - accuracy, valid_accuracy=accuracy, most_confused=most_confused)


def log_interpretation(live, valid: pd.DataFrame, table: pd.DataFrame) -> None:
    """Confusion matrix and the top-losses image grid (the seeds' data-cleaning step) as DVC plots.

    Hand-written rather than fastai's ClassificationInterpretation: that does not handle the multi-target model, and
    these use the TTA probabilities the ensemble will use. A bare Figure, not pyplot's: it draws without a display
    and without choosing a GUI backend.
    """
    if valid.empty:
        return
    probs = valid[list(CLASSES)].to_numpy()
    predicted = probs.argmax(axis=1)
    live.log_sklearn_plot(
        "confusion_matrix", valid["label"].tolist(), [CLASSES[i] for i in predicted], name="confusion_matrix.json"
    )
    losses = -np.log(np.clip(probs[np.arange(len(valid)), valid["label"].map(CLASSES.index).to_numpy()], 1e-12, None))
    paths = dict(zip(table["image_id"], table["path"]))
    worst = np.argsort(-losses)[:TOP_LOSSES]
    cols, rows = 3, max(1, int(np.ceil(len(worst) / 3)))
    fig = Figure(figsize=(3 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()  # not .flat: an iterator, empty after the first loop
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, worst):
        ax.imshow(Image.open(paths[valid["image_id"].iloc[i]]))
        guess = predicted[i]
        ax.set_title(
            f"{CLASSES[guess]}\nactual {valid['label'].iloc[i]}\nloss {losses[i]:.2f} p {probs[i, guess]:.2f}",
            fontsize=7,
        )
    fig.suptitle("top losses (predicted / actual / loss / probability)", fontsize=9)
    fig.tight_layout()
    live.log_image("top_losses.png", fig)


def variety_error(learn, table: pd.DataFrame) -> float | None:
    """The multi-target model's variety error rate on the validation set (no TTA: it is a by-product)."""
    if learn.loss_func.__class__ is not vision.DiseaseVarietyLoss or not table["is_valid"].any():
        return None
    probs, _ = learn.get_preds(dl=distributed.local_dl(learn.dls, table.loc[table["is_valid"], ["path"]]))
    varieties = np.asarray(VARIETIES)[probs[:, len(CLASSES) :].argmax(dim=1).numpy()]
    return float((varieties != table.loc[table["is_valid"], "variety"].to_numpy()).mean())


# -- the stage -----------------------------------------------------------------------------------------------------


def run_stage(
    cfg: StageConfig, data_dir: Path = DATA_DIR, root: Path = Path("."), oom_retries: int = 0
) -> dict | None:
    """Train one member and write all its outputs under `root`; returns its metrics (None on the ranks but 0 of a
    DDP run: all train and predict, rank 0 alone writes). `oom_retries`: the launcher's restarts after an
    out-of-memory error, each of which doubled accum. A failed or killed run leaves the published outputs as they
    were, and its rerun resumes from the checkpoint (after the last epoch too: it then only predicts again)."""
    root = Path(root)
    accum, accum_source = member_accum(
        cfg.member, root / vision.probe_decision_path(cfg.name), distributed.process_batch(cfg.bs)
    )
    accum *= 2**oom_retries  # the launcher's restarts doubled it
    table = split_table(data_dir, cfg.validation, cfg.fold)
    checkpoints = Checkpoints(root / CHECKPOINTS_DIR / cfg.run, run_fingerprint(cfg, table))
    # Before Live: a fresh start empties the folder Live writes into. Rank 0 writes, every rank waits for it.
    distributed.from_rank0(lambda: checkpoints.state() or checkpoints.start())
    live = Live(dir=str(checkpoints.live_dir), resume=True, **LIVE_OPTIONS) if distributed.is_rank0() else None
    seed_everything(cfg.seed + distributed.rank())
    log(STAGE, f"{cfg.run}: {cfg.member.arch}, accum {accum} ({accum_source}), {len(table)} images in {data_dir}")
    learn, trained = train_with_oom_fallback(cfg, table, accum, checkpoints, live, retries=oom_retries)

    predicting = time.perf_counter()
    frames = prediction_frames(learn, table, data_dir, use_tta=cfg.tta)
    predict_seconds = time.perf_counter() - predicting
    if frames is None:
        return None
    test, valid = frames
    if cfg.fold is None:  # a fold's held-out share is interpreted with the others, by its member's train@
        log_interpretation(live, valid, table)
    live.end()
    metrics = dict(
        profile=cfg.profile, member=cfg.name, **({} if cfg.fold is None else dict(fold=cfg.fold)),
        arch=cfg.member.arch, targets=cfg.member.targets, schedule=cfg.member.schedule, epochs=cfg.member.epochs,
        full=cfg.validation.full, tta=cfg.tta, accum_source=accum_source,
        device=str(compute_device()), processes=distributed.world_size(),
        process_step_images=vision.batch_size(distributed.process_batch(cfg.bs), trained["accum"]),
        # The optimiser's own count (fastai's step_stat), over its last phase: all epochs of fit_one_cycle, the
        # unfrozen ones of fine_tune (freezing builds a new optimiser).
        optimizer_steps=max((int(state.get("step", 0)) for state in learn.opt.state.values()), default=0),
        precision=vision.precision_for(cfg.precision, torch.cuda.is_available()),
        num_workers=vision.loader_workers(cfg.num_workers, compute_device()),
        **trained,  # accum, oom_retries, lr, resumed_from_epoch, train_seconds, peak memory, ...
        predict_seconds=round(predict_seconds, 2),
        train_images=int((~table["is_valid"]).sum()),
        valid_variety_error_rate=variety_error(learn, table),
        **validation_summary(valid),
    )
    state_dict = {k: v.detach().cpu() for k, v in learn.model.state_dict().items()}
    write_outputs(root, cfg, model_weights(cfg.member, state_dict=state_dict), frames, metrics, checkpoints.live_dir)
    shutil.rmtree(checkpoints.directory, ignore_errors=True)
    return metrics


def gather_folds(cfg: StageConfig, data_dir: Path = DATA_DIR, root: Path = Path(".")) -> dict:
    """train@<member> with K folds: the member is its K fold models. Its test probabilities are their mean, its
    validation ones every training image's out-of-fold probabilities (in train.csv order), its weights all K models;
    written as a single model's outputs are, with the accuracy on all OOF rows and the spread over the folds."""
    root, table, folds = Path(root), split_table(data_dir, cfg.validation), []
    for k in cfg.validation.fold_ids:  # fold@<member>-<k>'s probabilities, its held-out rows checked, and its weights
        where, rerun = root / FOLDS_DIR / f"{cfg.name}-{k}", f"run `dvc repro fold@{cfg.name}-{k}`"
        try:
            test, valid = (pd.read_csv(where / f"{part}.csv", dtype={"image_id": str}) for part in ("test", "valid"))
            folds.append((test, valid, torch.load(where / "model.pth", weights_only=True)["state_dict"]))
        except FileNotFoundError as err:
            raise TrainError(f"{err.filename}: not found; {rerun}") from None
        if valid["image_id"].tolist() != table.loc[table["fold"] == k, "image_id"].tolist():
            raise TrainError(f"{where}/valid.csv: not the held-out images of fold {k} of train.csv; {rerun}")
    tests, valids, fold_models = zip(*folds)
    if any(test["image_id"].tolist() != tests[0]["image_id"].tolist() for test in tests):
        raise TrainError(f"{root / FOLDS_DIR}: the folds of {cfg.name} predicted different test images; rerun them")
    test = tests[0][["image_id"]].join(sum(t[list(CLASSES)] for t in tests) / len(tests))
    oof = pd.concat(valids).set_index("image_id").loc[table["image_id"]].reset_index()
    fold_accuracy = {str(k): validation_summary(v)["valid_accuracy"] for k, v in zip(cfg.validation.fold_ids, valids)}
    live_dir = root / CHECKPOINTS_DIR / cfg.name / "dvclive"
    shutil.rmtree(live_dir, ignore_errors=True)
    live = Live(dir=str(live_dir), **LIVE_OPTIONS)
    for accuracy in fold_accuracy.values():  # the curve of fold accuracies: one step per fold
        live.log_metric("fold_accuracy", accuracy)
        live.next_step()
    log_interpretation(live, oof, table)
    live.end()
    metrics = dict(
        profile=cfg.profile, member=cfg.name, arch=cfg.member.arch, targets=cfg.member.targets,
        epochs=cfg.member.epochs, full=False, tta=cfg.tta, folds=cfg.validation.folds, validated_on="oof",
        fold_accuracy=fold_accuracy, fold_accuracy_std=round(float(np.std(list(fold_accuracy.values()))), 6),
        train_images=len(table), **validation_summary(oof),
    )
    write_outputs(root, cfg, model_weights(cfg.member, folds=list(fold_models)), (test, oof), metrics, live_dir)
    shutil.rmtree(live_dir.parent)
    return metrics


# FileNotFoundError: an input gone (its path named)
@stage_main(STAGE, ParamsError, TrainError)
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("member", help="a member name under train.members in params.yaml")
    parser.add_argument("--fold", type=int, help="train this fold's model (validation.fold_ids); without it, with "
                                                  "validation.folds > 1, gather the member's fold models")
    # Set by the launcher when it restarts every rank after an out-of-memory error (pipeline.distributed).
    parser.add_argument("--oom-retries", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = load_stage_config(read_params(), args.member, args.fold)
    data_dir = member_data_dir(cfg.member.images)
    if not (data_dir / "train.csv").is_file():
        raise TrainError(f"{data_dir}/train.csv: not found; run `dvc repro {WRITTEN_BY[data_dir]}` first")
    if cfg.validation.cross_validated and cfg.fold is None:
        with no_space_error(CHECKPOINTS_DIR / cfg.name):  # DVCLive's writes
            metrics = gather_folds(cfg, data_dir)
        log(STAGE, f"{cfg.name}: {metrics['folds']} folds, out-of-fold accuracy {metrics['valid_accuracy']:.4f}")
        return
    if cfg.validation.full and distributed.is_rank0():
        banner(STAGE, f"{cfg.name}: validation.full is true: training on ALL images, no held-out metrics")
    processes = distributed.process_count(cfg.devices)
    if processes > 1 and not distributed.launched():
        log(STAGE, f"{cfg.run}: starting {processes} processes (train.devices {cfg.devices})")
        relaunch = [cfg.name, *([] if cfg.fold is None else ["--fold", str(cfg.fold)])]
        distributed.launch_with_oom_retries("pipeline.train", relaunch, processes, lambda m: log(STAGE, m))
        return
    # Writes outside atomic_path (DVCLive's, lr_find's) go into the member's checkpoint folder.
    with distributed.worker(), no_space_error(CHECKPOINTS_DIR / cfg.run):
        metrics = run_stage(cfg, data_dir, oom_retries=args.oom_retries)
    if metrics is not None:
        log(STAGE, f"{cfg.run}: valid error rate {metrics['valid_error_rate']}, {metrics['train_seconds']} s")


if __name__ == "__main__":
    main()
