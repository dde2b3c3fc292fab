"""The `params` stage: every key of params.yaml is checked by its stage's own loader before any stage runs."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import check_params as check
from pipeline import train
from pipeline.params import ParamsError, read_params

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def demo():
    return read_params(ROOT / "params.yaml")


def edited(params, change):
    params = copy.deepcopy(params)
    change(params)
    return params


def test_the_committed_params_pass():
    check.check_params(read_params(ROOT / "params.yaml"))


def test_the_params_check_imports_no_torch(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    check_and_list = "import sys; from pipeline import check_params; check_params.main(); print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", check_and_list], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "False\n"


def test_probe_accums_are_checked_against_the_batch_of_one_of_the_processes(demo):
    def two_processes(params):
        params["train"].update(bs=32, devices=2)
        params["probe"]["accums"] = [1, 2, 32]

    with pytest.raises(ParamsError, match=r"'probe.accums' has 32, more than train.bs 32 // 2 process\(es\) = 16"):
        check.check_params(edited(demo, two_processes))


def test_a_typo_in_collab_is_named(demo):
    with pytest.raises(ParamsError, match=r"^params.yaml: unknown key 'collab.epohcs'; remove it or use one of: bs,"):
        check.check_params(edited(demo, lambda p: p["collab"].update(epohcs=5)))


def test_a_weight_for_a_member_that_does_not_exist_is_named(demo):
    with pytest.raises(ParamsError, match=r"key 'ensemble.weights.convnext_sqiush' names no member of train.members"):
        check.check_params(edited(demo, lambda p: p["ensemble"]["weights"].update(convnext_sqiush=2)))


def test_a_section_no_stage_reads_is_named(demo):
    with pytest.raises(ParamsError, match=r"unknown section 'colab': no stage reads it; remove it or use one of: collab,"):
        check.check_params(edited(demo, lambda p: p.update(colab={"epochs": 5})))


def test_a_bad_member_default_is_named_where_it_is_written(demo):
    with pytest.raises(ParamsError, match=r"key 'train.member_defaults.lr' is 'fast'; expected float or one of 'find'"):
        check.check_params(edited(demo, lambda p: p["train"]["member_defaults"].update(lr="fast")))


# -- issue 11, cases 9 and 11: missing sections and values the run would trip over, named up front ------------------


def test_a_deleted_validation_section_is_an_error_as_any_other_section(demo):
    with pytest.raises(ParamsError, match=r"^params.yaml: missing section 'validation'; add it back"):
        train.load_stage_config(edited(demo, lambda p: p.pop("validation")), "convnext_squish")


def test_folds_without_their_fold_ids_are_named_with_the_fix(demo):
    with pytest.raises(ParamsError, match=r"key 'validation.fold_ids' is \[\]; folds 3 .*needs \[0, 1, 2\] \(`make profile`"):
        check.check_params(edited(demo, lambda p: p["validation"].update(folds=3)))


def test_a_fold_that_params_has_no_stage_for_is_named(demo):
    with pytest.raises(ParamsError, match=r"key 'validation.fold_ids' is \[\]: no fold 0; set validation.folds"):
        train.load_stage_config(demo, "convnext_squish", fold=0)


def test_a_member_accum_larger_than_bs_is_named(demo):
    bad = edited(demo, lambda p: p["train"]["members"]["convnext_squish"].update(accum=64))
    with pytest.raises(ParamsError, match=r"^params.yaml: key 'train.members.convnext_squish.accum' is 64, more than "
                                          r"train.bs 32; use an accum <= bs"):
        check.check_params(bad)


def test_a_default_accum_larger_than_bs_is_named_where_it_is_written(demo):
    bad = edited(demo, lambda p: p["train"]["member_defaults"].update(accum=33))
    with pytest.raises(ParamsError, match=r"key 'train.member_defaults.accum' is 33, more than train.bs 32"):
        check.check_params(bad)


@pytest.mark.parametrize("valid_pct", [1.5, 0.0, -0.2])
def test_a_valid_pct_outside_0_1_is_named(demo, valid_pct):
    with pytest.raises(ParamsError, match=rf"^params.yaml: key 'validation.valid_pct' is {valid_pct}; use a fraction"):
        check.check_params(edited(demo, lambda p: p["validation"].update(valid_pct=valid_pct)))


def test_train_stops_on_a_bad_valid_pct_before_touching_data(demo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(edited(demo, lambda p: p["validation"].update(valid_pct=1.5))))
    with pytest.raises(SystemExit, match=r"^train: params.yaml: key 'validation.valid_pct' is 1.5; use a fraction"):
        train.main(["convnext_squish"])


# -- the stage ------------------------------------------------------------------------------------------------------


def test_the_output_is_the_same_whatever_the_params(demo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outputs = []
    for epochs in (5, 7):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(edited(demo, lambda p: p["collab"].update(epochs=epochs))))
        check.main()
        outputs.append(check.OUTPUT.read_bytes())
    assert outputs[0] == outputs[1]


def test_a_bad_key_is_a_one_line_exit_naming_params_yaml(demo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(edited(demo, lambda p: p["collab"].update(epohcs=5))))
    with pytest.raises(SystemExit) as stopped:
        check.main()
    assert str(stopped.value).startswith("params: params.yaml: unknown key 'collab.epohcs'")
    assert "\n" not in str(stopped.value) and not check.OUTPUT.exists()


def _write_params(repo, params):
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _dvc(repo, *args):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(repo)}
    result = subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True, env=env)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.slow
def test_dvc_repro_stops_on_a_bad_key_before_any_stage_and_a_good_edit_reruns_only_the_check(demo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = edited(demo, lambda p: p["data"]["synthetic"].update(train_per_class=2, n_test=2, image_size=[16, 16]))
    params["collab"]["epohcs"] = 5
    _write_params(repo, params)
    assert _dvc(repo, "init", "--no-scm", "-q")[0] == 0

    failed, output = _dvc(repo, "repro")
    assert failed and "unknown key 'collab.epohcs'" in output
    assert "Running stage 'params'" in output and output.count("Running stage") == 1
    assert not (repo / "data").exists()  # neither paddy_data nor movielens_data ran

    del params["collab"]["epohcs"]
    _write_params(repo, params)
    code, output = _dvc(repo, "repro", "paddy_data")
    assert code == 0, output
    data_written = (repo / "data" / "paddy" / "SOURCE.json").stat().st_mtime_ns

    params["collab"]["epochs"] = 3
    _write_params(repo, params)
    code, output = _dvc(repo, "repro", "paddy_data")
    assert code == 0, output
    assert "Running stage 'params'" in output and "Running stage 'paddy_data'" not in output
    assert (repo / "data" / "paddy" / "SOURCE.json").stat().st_mtime_ns == data_written
    code, output = _dvc(repo, "status", "--json")
    changed = json.loads(output.strip().splitlines()[-1])
    assert "params" not in changed and "paddy_data" not in changed
