"""The probe: peak memory per accum on the smallest class, the accum it chooses, and the decision train reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline import probe
from pipeline.params import ParamsError
from pipeline.probe import ProbeConfig, ProbeError, check_fits, probe_member, smallest_class_table
from pipeline.vision import MemberConfig, accum_to_use, choose_accum

ROOT = Path(__file__).resolve().parents[1]


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
        probe.load_probe_config(params, bs=32)


def test_empty_accums_are_a_params_error():
    with pytest.raises(ParamsError, match="accums"):
        probe.load_probe_config({"probe": {"accums": [], "budget_gib": 16}}, bs=32)


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


# -- CUDA, with torch.cuda replaced (no GPU here) ------------------------------------------------------------------


class FakeCuda:
    """torch.cuda's memory API as the probe uses it: peaks set per run, calls recorded."""

    def __init__(self, peaks: list[tuple[int, int] | None]):
        self.peaks, self.calls, self.run = peaks, [], -1

    def reset_peak_memory_stats(self):
        self.run += 1

    def memory_allocated(self):
        return 0

    def max_memory_allocated(self):
        return self.peaks[self.run][0]

    def max_memory_reserved(self):
        return self.peaks[self.run][1]

    def empty_cache(self):
        self.calls.append("empty_cache")

    def list_gpu_processes(self):
        return "GPU:0\nprocess 123 uses 512.000 MB GPU memory"


def test_cuda_path_reports_reserved_as_peak_and_frees_memory_between_runs(monkeypatch):
    import torch

    gib = 1024**3
    fake = FakeCuda([(3 * gib, 4 * gib), None])
    monkeypatch.setattr(torch, "cuda", fake)

    def fit(member, table, bs, accum, seed, epochs, precision="auto"):
        if fake.peaks[fake.run] is None:
            raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch.cuda, "OutOfMemoryError", torch.OutOfMemoryError, raising=False)
    monkeypatch.setattr(probe, "probe_fit", fit)
    first = probe.measure_cuda(tiny_member(), a_table(), 8, 1, 0, 1)
    assert (first["peak_gib"], first["peak_allocated_gib"], first["above_baseline_gib"]) == (4.0, 3.0, 3.0)
    out_of_memory = probe.measure_cuda(tiny_member(), a_table(), 8, 2, 0, 1)
    assert out_of_memory["peak_gib"] is None and "out of memory" in out_of_memory["error"]
    assert fake.calls.count("empty_cache") == 4  # before and after each run


def test_measure_for_picks_the_cuda_path_on_a_gpu():
    import torch

    assert probe.measure_for(torch.device("cuda")) is probe.measure_cuda
    assert probe.measure_for(torch.device("cpu")) is probe.measure_cpu


# -- end to end on tiny data ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_probe_stage_on_tiny_data_writes_metrics_decision_and_plot(tiny_paddy, tmp_path, monkeypatch):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["probe"] = {"accums": [1, 2], "budget_gib": 16, "epochs": 1}
    params["train"]["bs"] = 8
    params["train"]["members"] = {"tiny": {"arch": "convnext_atto", "resize": 40, "size": 32, "epochs": 1,
                                           "schedule": "fit_one_cycle", "accum": None}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(tiny_paddy, tmp_path / "data" / "paddy")
    monkeypatch.chdir(tmp_path)

    probe.main(["tiny"])

    result = json.loads(Path("metrics/probe/tiny.json").read_text())
    assert result["profile"] == params["profile"] and result["device"] == "cpu"
    assert result["smallest_class"] == {"label": "bacterial_panicle_blight", "count": 4}  # the tiny data's
    assert set(result["peaks"]) == {"1", "2"}
    for run in result["peaks"].values():
        assert run["peak_gib"] > run["above_baseline_gib"] > 0
    assert (result["chosen_accum"], result["accum"], result["accum_source"]) == (1, 1, "probe")
    assert result["grad_accum_check"]["has_batchnorm"] is True
    assert json.loads(Path("metrics/probe/tiny.accum.json").read_text()) == {
        "member": "tiny", "accum": 1, "accum_source": "probe"}
    plot = pd.read_csv("plots/probe/tiny.csv")
    assert list(plot.columns) == ["member", "accum", "peak_gib", "above_baseline_gib", "budget_gib"]
    assert plot["accum"].tolist() == [1, 2] and (plot["budget_gib"] == 16).all()
    assert Path("plots/probe/tiny.png").read_bytes().startswith(b"\x89PNG")


def run_in(repo: Path, *command: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def locked_md5(repo: Path, stage: str, path: str) -> str:
    outs = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]["outs"]
    return next(out["md5"] for out in outs if out["path"] == path)


@pytest.mark.slow
def test_a_forced_reprobe_with_the_same_decision_leaves_the_train_stage_up_to_date(tmp_path):
    """The real dvc.yaml on tiny data: `dvc repro -f probe@m` rewrites the probe's metrics, not train's input."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["synthetic"] = {"train_per_class": 8, "n_test": 10, "image_size": [48, 64]}
    params["probe"] = {"accums": [1, 2], "budget_gib": 16, "epochs": 1}
    params["train"] |= {"bs": 8, "tta": False}
    params["train"]["members"] = {"tiny": {"arch": "convnext_atto", "resize": 40, "size": 32, "epochs": 1,
                                           "schedule": "fit_one_cycle", "accum": None}}
    params["ensemble"]["weights"] = {"tiny": 1}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    run_in(repo, "git", "init", "-q")
    run_in(repo, "dvc", "init", "-q")
    run_in(repo, "git", "add", "-A")
    run_in(repo, "git", "commit", "-qm", "tiny project")  # DVCLive reads the git revision
    run_in(repo, "dvc", "repro", "-q", "train@tiny")
    metrics_md5 = locked_md5(repo, "probe@tiny", "metrics/probe/tiny.json")

    run_in(repo, "dvc", "repro", "-q", "--force", "--single-item", "probe@tiny")

    assert locked_md5(repo, "probe@tiny", "metrics/probe/tiny.json") != metrics_md5  # peaks and seconds moved
    assert json.loads(run_in(repo, "dvc", "status", "--json", "train@tiny")) == {}
    decision_file = repo / "metrics" / "probe" / "tiny.accum.json"
    decision_file.write_text(decision_file.read_text().replace('"accum": 1', '"accum": 2'))
    assert "train@tiny" in json.loads(run_in(repo, "dvc", "status", "--json", "train@tiny"))  # it is train's input


def test_unknown_member_is_a_one_line_exit(tmp_path, monkeypatch):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"^probe: params.yaml: no member 'nope'"):
        probe.main(["nope"])
