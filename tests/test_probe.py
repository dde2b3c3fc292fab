"""The probe: peak memory per accum on the smallest class, the accum it chooses, and the decision train reads."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from helpers import copy_repo, members_of, run
from pipeline import probe
from pipeline.params import ParamsError
from pipeline.probe import GIB, ProbeConfig, ProbeError, check_fits, probe_member, smallest_class_table
from pipeline.vision import MemberConfig, accum_to_use, choose_accum

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024**2
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_member(**overrides) -> MemberConfig:
    settings = dict(arch="convnext_atto", resize=40, size=32, epochs=1, schedule="fit_one_cycle") | overrides
    return MemberConfig(**settings)


def fake_measure(peaks_gib: dict[int, float | None]):
    """A measure function returning the given peaks (None: out of memory), recording the accums it was asked."""
    asked = []

    def measure(member, table, bs, accum, seed, epochs):
        asked.append(accum)
        peak = peaks_gib[accum]
        if peak is None:
            return {"peak_gib": None, "error": "CUDA out of memory"}
        return {"peak_gib": peak, "above_baseline_gib": peak, "seconds": 0.0}

    measure.asked = asked
    return measure


def a_table(counts: dict[str, int] | None = None) -> pd.DataFrame:
    """A training table with these many rows per label (by default the real data's smallest class is smallest)."""
    counts = counts or {"bacterial_panicle_blight": 5, "blast": 7}
    labels = [label for label, count in counts.items() for _ in range(count)]
    return pd.DataFrame(
        {"image_id": [f"{i}.jpg" for i in range(len(labels))], "label": labels, "variety": "ADT45", "path": "x"}
    )


# -- the choice ----------------------------------------------------------------------------------------------------


def test_choose_accum_picks_the_smallest_accum_that_fits():
    assert choose_accum({1: 20.0, 2: 12.0, 4: 8.0}, budget_gib=16) == 2
    assert choose_accum({1: 5.0, 2: 4.0, 4: 3.0}, budget_gib=16) == 1


def test_choose_accum_is_none_when_nothing_fits_and_out_of_memory_never_fits():
    assert choose_accum({1: 20.0, 2: 18.0}, budget_gib=16) is None
    assert choose_accum({1: None, 2: 9.0}, budget_gib=16) == 2


def test_train_uses_the_probes_decision_unless_params_set_accum():
    decided = {"member": "m", "accum": 2, "accum_source": "probe"}
    assert accum_to_use(tiny_member(), decided) == (2, "probe")
    assert accum_to_use(tiny_member(accum=8), decided) == (8, "params")


def test_train_refuses_a_probe_that_chose_nothing():
    with pytest.raises(ValueError, match="chose no accum"):
        accum_to_use(tiny_member(), {"member": "m", "accum": None, "accum_source": None})


def test_train_refuses_a_decision_taken_from_an_accum_params_no_longer_set():
    with pytest.raises(ValueError, match="rerun the probe"):
        accum_to_use(tiny_member(), {"member": "m", "accum": 8, "accum_source": "params"})


def test_probe_member_chooses_and_records_every_peak():
    measure = fake_measure({1: 20.0, 2: 12.0, 4: 8.0})
    config = ProbeConfig(accums=[1, 2, 4], budget_gib=16)
    result = probe_member("m", tiny_member(), a_table(), config, bs=8, seed=0, measure=measure)
    assert measure.asked == [1, 2, 4]
    assert result["chosen_accum"] == 2
    assert (result["accum"], result["accum_source"]) == (2, "probe")
    assert [run["fits"] for run in result["peaks"].values()] == [False, True, True]
    check_fits(result)


def test_explicit_accum_overrides_the_choice_and_is_measured_too():
    measure = fake_measure({1: 5.0, 2: 4.0, 4: 3.0, 8: 2.0})
    config = ProbeConfig(accums=[1, 2, 4], budget_gib=16)
    result = probe_member("m", tiny_member(accum=8), a_table(), config, bs=8, seed=0, measure=measure)
    assert measure.asked == [1, 2, 4, 8]
    assert result["chosen_accum"] == 1
    assert (result["accum"], result["accum_source"]) == (8, "params")


def test_nothing_fits_fails_naming_the_member_its_smallest_peak_and_the_fix():
    measure = fake_measure({1: None, 2: 30.0, 4: 18.5})
    config = ProbeConfig(accums=[1, 2, 4], budget_gib=16)
    result = probe_member("big", tiny_member(), a_table(), config, bs=8, seed=0, measure=measure)
    assert result["accum"] is None
    with pytest.raises(ProbeError) as raised:
        check_fits(result)
    message = str(raised.value)
    assert "'big'" in message and "18.50 GiB at accum=4" in message and "probe.accums" in message
    assert "\n" not in message


def test_a_budget_below_every_peak_is_reported_as_not_fitting():
    # issue 11, case 8: `probe.budget_gib: 0.0001` used to say the member "fits the 0.0001 GiB budget with no accum".
    measure = fake_measure({1: 0.61, 2: 0.42})
    config = ProbeConfig(accums=[1, 2], budget_gib=0.0001)
    result = probe_member("tiny", tiny_member(), a_table(), config, bs=8, seed=0, measure=measure)
    with pytest.raises(ProbeError) as raised:
        check_fits(result)
    message = str(raised.value)
    assert message.startswith("member 'tiny' does not fit the 0.0001 GiB budget (probe.budget_gib) at any accum")
    assert "0.42 GiB at accum=2" in message and "raise probe.budget_gib" in message
    assert "fits the" not in message and "\n" not in message


def test_nothing_fits_but_an_explicit_accum_is_used_anyway():
    config = ProbeConfig(accums=[1, 2], budget_gib=16)
    measure = fake_measure({1: 30.0, 2: 20.0, 4: 17.0})
    result = probe_member("m", tiny_member(accum=4), a_table(), config, bs=8, seed=0, measure=measure)
    assert (result["chosen_accum"], result["accum"], result["accum_source"]) == (None, 4, "params")
    check_fits(result)


# -- params --------------------------------------------------------------------------------------------------------


def test_accums_larger_than_the_batch_size_are_a_params_error():
    params = {"probe": {"accums": [1, 64], "budget_gib": 16, "epochs": 1}}
    with pytest.raises(ParamsError, match="probe.accums"):
        probe.load_probe_config(params, bs=32, processes=1)


def test_empty_accums_are_a_params_error():
    with pytest.raises(ParamsError, match="accums"):
        probe.load_probe_config({"probe": {"accums": [], "budget_gib": 16}}, bs=32, processes=1)


# -- the decision train reads -------------------------------------------------------------------------------------


@pytest.mark.parametrize("explicit_accum", [None, 2])
def test_a_reprobe_with_other_peaks_but_the_same_outcome_writes_the_same_decision_bytes(tmp_path, explicit_accum):
    config = ProbeConfig(accums=[1, 2, 4], budget_gib=16)
    member = tiny_member(accum=explicit_accum)
    written = []
    for run, peaks in enumerate(({1: 20.0, 2: 12.0, 4: 8.0}, {1: 19.0, 2: 11.5, 4: 7.9})):
        result = probe_member("m", member, a_table(), config, bs=8, seed=0, measure=fake_measure(peaks))
        result |= {"memory": "fake", "device": "cpu", "seconds": float(run)}
        paths = [tmp_path / str(run) / name for name in ("m.json", "m.accum.json", "m.csv", "m.png")]
        probe.write_outputs(result, *paths)
        written.append([path.read_bytes() for path in paths])
    (metrics, decided, *_), (metrics_again, decided_again, *_) = written
    assert metrics != metrics_again
    assert decided == decided_again
    expected_source = "params" if explicit_accum else "probe"
    assert json.loads(decided) == {"member": "m", "accum": 2, "accum_source": expected_source}


def test_the_decision_of_a_probe_where_nothing_fits_has_no_accum_so_train_refuses_it():
    config = ProbeConfig(accums=[1, 2], budget_gib=16)
    result = probe_member("m", tiny_member(), a_table(), config, bs=8, seed=0, measure=fake_measure({1: 30.0, 2: 20.0}))
    decided = probe.decision(result)
    assert decided == {"member": "m", "accum": None, "accum_source": None}
    with pytest.raises(ValueError, match="chose no accum"):
        accum_to_use(tiny_member(), decided)


# -- the data ------------------------------------------------------------------------------------------------------


def test_smallest_class_table_repeats_training_rows_to_two_batches_and_keeps_a_validation_set():
    table = smallest_class_table(a_table(), bs=8, seed=0)
    assert set(table["label"]) == {"bacterial_panicle_blight"}
    train, valid = table[~table["is_valid"]], table[table["is_valid"]]
    assert len(train) >= 16
    assert len(valid) == 1
    assert not set(valid["image_id"]) & set(train["image_id"])


def test_the_probe_trains_on_the_smallest_class_of_the_data_loaded_and_records_it():
    table = a_table({"bacterial_panicle_blight": 9, "hispa": 4, "blast": 7})
    assert set(smallest_class_table(table, bs=8, seed=0)["label"]) == {"hispa"}
    config = ProbeConfig(accums=[1], budget_gib=16)
    result = probe_member("m", tiny_member(), table, config, bs=8, seed=0, measure=fake_measure({1: 1.0}))
    assert result["smallest_class"] == {"label": "hispa", "count": 4}


def test_a_smallest_class_of_one_image_is_a_clear_error():
    with pytest.raises(ProbeError, match=r"1 hispa image\(s\), its smallest class"):
        smallest_class_table(a_table({"hispa": 1, "blast": 7}), bs=8, seed=0)


# -- CPU measurement: a fresh child process per run ----------------------------------------------------------------


def hold_in_memory(n_bytes: int) -> None:
    """A fit whose memory is known: n_bytes, every page touched."""
    held = np.ones(n_bytes, dtype=np.uint8)
    assert held.sum() == n_bytes


def killed_by_the_kernel() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_cpu_peak_is_each_runs_own_measured_in_a_fresh_process():
    large = probe.peak_rss_in_child(functools.partial(hold_in_memory, 256 * MIB), "large")
    small = probe.peak_rss_in_child(functools.partial(hold_in_memory, 16 * MIB), "small")
    assert 256 * MIB <= large["above_baseline_gib"] * GIB < 320 * MIB
    # A process's peak never falls: measured in one process, the small run would report the large run's peak.
    assert (large["peak_gib"] - small["peak_gib"]) * GIB > 192 * MIB


def test_a_run_killed_by_the_kernel_counts_as_not_fitting():
    outcome = probe.peak_rss_in_child(killed_by_the_kernel, "accum=1")
    assert outcome["peak_gib"] is None and "killed" in outcome["error"]


# -- CUDA measurement: real allocations on a real GPU (skipped without one) ----------------------------------------


def hold_on_gpu(n_bytes: int, then_ask_for: int = 0) -> None:
    """A fit whose CUDA memory is known: holds n_bytes, then (if asked) requests a block that cannot exist."""
    held = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    if then_ask_for:
        torch.empty(then_ask_for, dtype=torch.uint8, device="cuda")
    del held


@pytest.mark.cuda
@needs_cuda
def test_cuda_peak_is_torch_cudas_for_a_known_allocation_and_the_cache_is_emptied_between_runs():
    torch.cuda.empty_cache()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    large = probe.cuda_peak(functools.partial(hold_on_gpu, 512 * MIB))
    small = probe.cuda_peak(functools.partial(hold_on_gpu, 64 * MIB))
    assert large["above_baseline_gib"] * GIB == pytest.approx(512 * MIB, abs=2 * MIB)
    assert small["above_baseline_gib"] * GIB == pytest.approx(64 * MIB, abs=2 * MIB)
    assert large["peak_gib"] == large["peak_reserved_gib"] >= large["peak_allocated_gib"]
    # Reserved memory stays cached after a run unless emptied: then the small run's peak would be the large one's.
    assert 64 * MIB <= small["peak_gib"] * GIB - reserved < 512 * MIB
    assert (torch.cuda.memory_allocated(), torch.cuda.memory_reserved()) == (allocated, reserved)


@pytest.mark.cuda
@needs_cuda
def test_cuda_out_of_memory_counts_as_not_fitting_and_what_the_run_held_is_freed():
    torch.cuda.empty_cache()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    impossible = 2 * torch.cuda.get_device_properties(0).total_memory
    outcome = probe.cuda_peak(functools.partial(hold_on_gpu, 256 * MIB, then_ask_for=impossible))
    assert outcome["peak_gib"] is None and "out of memory" in outcome["error"]
    assert (torch.cuda.memory_allocated(), torch.cuda.memory_reserved()) == (allocated, reserved)


# -- end to end on tiny data ---------------------------------------------------------------------------------------


def run_probe_stage(tiny_paddy, workspace: Path, monkeypatch) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["probe"] = {"accums": [1, 2], "budget_gib": 16, "epochs": 1}
    params["train"]["bs"] = 8
    params["train"]["members"] = {"tiny": {"arch": "convnext_atto", "resize": 40, "size": 32, "epochs": 1,
                                           "schedule": "fit_one_cycle", "accum": None}}
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(tiny_paddy, workspace / "data" / "paddy")
    monkeypatch.chdir(workspace)
    probe.main(["tiny"])
    return params


def check_stage_outputs(params: dict) -> dict:
    result = json.loads(Path("metrics/probe/tiny.json").read_text())
    assert result["profile"] == params["profile"]
    assert result["smallest_class"] == {"label": "bacterial_panicle_blight", "count": 4}  # the tiny data's
    assert set(result["peaks"]) == {"1", "2"}
    assert (result["chosen_accum"], result["accum"], result["accum_source"]) == (1, 1, "probe")
    assert "grad_accum_check" not in result  # proved once in tests/test_grad_accum.py, not on every probe run
    assert json.loads(Path("metrics/probe/tiny.accum.json").read_text()) == {
        "member": "tiny", "accum": 1, "accum_source": "probe"}
    plot = pd.read_csv("plots/probe/tiny.csv")
    assert list(plot.columns) == ["member", "accum", "peak_gib", "above_baseline_gib", "budget_gib"]
    assert plot["accum"].tolist() == [1, 2] and (plot["budget_gib"] == 16).all()
    assert Path("plots/probe/tiny.png").read_bytes().startswith(b"\x89PNG")
    return result


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; a GPU machine runs the CUDA one")
def test_probe_stage_on_tiny_data_on_cpu_writes_metrics_decision_and_plot(tiny_paddy, tmp_path, monkeypatch):
    result = check_stage_outputs(run_probe_stage(tiny_paddy, tmp_path, monkeypatch))
    assert (result["device"], result["memory"]) == ("cpu", "peak RSS of a fresh child process")
    for run in result["peaks"].values():
        assert run["peak_gib"] > run["above_baseline_gib"] > 0


@pytest.mark.slow
@pytest.mark.cuda
@needs_cuda
def test_probe_stage_on_a_gpu_measures_with_torch_cuda(tiny_paddy, tmp_path, monkeypatch):
    result = check_stage_outputs(run_probe_stage(tiny_paddy, tmp_path, monkeypatch))
    assert result["device"].startswith("cuda (") and result["memory"] == "torch.cuda peak reserved"
    for run in result["peaks"].values():
        assert run["peak_reserved_gib"] >= run["peak_allocated_gib"] > run["baseline_gib"]


def locked_md5(repo: Path, stage: str, path: str) -> str:
    outs = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]["outs"]
    return next(out["md5"] for out in outs if out["path"] == path)


@pytest.mark.slow
def test_a_forced_reprobe_with_the_same_decision_leaves_the_train_stage_up_to_date(demo_run, tmp_path):
    """The real dvc.yaml on tiny data: `dvc repro -f probe@m` rewrites the probe's metrics, not train's input."""
    repo = copy_repo(demo_run.repo, tmp_path / "repo")  # every stage up to date, train@<member> trained
    member = members_of(repo)[0]
    metrics_md5 = locked_md5(repo, f"probe@{member}", f"metrics/probe/{member}.json")

    run(repo, "dvc", "repro", "-q", "--force", "--single-item", f"probe@{member}")

    assert locked_md5(repo, f"probe@{member}", f"metrics/probe/{member}.json") != metrics_md5  # seconds moved
    assert json.loads(run(repo, "dvc", "status", "--json", f"train@{member}").stdout) == {}
    decision_file = repo / "metrics" / "probe" / f"{member}.accum.json"
    decision_file.write_text(decision_file.read_text().replace('"accum": 1', '"accum": 2'))
    assert f"train@{member}" in json.loads(run(repo, "dvc", "status", "--json", f"train@{member}").stdout)


def test_unknown_member_is_a_one_line_exit(tmp_path, monkeypatch):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"^probe: params.yaml: no member 'nope'"):
        probe.main(["nope"])
