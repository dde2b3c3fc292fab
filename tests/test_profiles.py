"""Profiles: each fact written once (a base plus what each profile changes), params.yaml rendered from them, and a
switch that carries the user's edits over and never loses them."""

from pathlib import Path

import pytest
import yaml

from pipeline import profile
from pipeline.check_params import check_params
from pipeline.profile import (
    BASE_FILE,
    PROFILE_DIR,
    ProfileError,
    LOCAL_FILE,
    main,
    render_params,
    render_text,
    switch_profile,
)
from pipeline.params import PROFILES
from pipeline.vision import load_train_config

ROOT = Path(__file__).parents[1]


def overlay(name):
    return yaml.safe_load((PROFILE_DIR / f"{name}.yaml").read_text())


def leaves(values, path=()):
    """Every (path, value) of nested mappings, lists and scalars taken whole."""
    if isinstance(values, dict):
        for key, value in values.items():
            yield from leaves(value, (*path, key))
    else:
        yield path, values


@pytest.fixture
def demo_params(tmp_path, monkeypatch):
    """A project folder on the demo profile, as the working directory (params.local.yaml is found there)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "params.yaml"
    path.write_text(render_text("demo"))
    return path


def edit(path, change):
    """Apply `change` to the parsed params in `path` and write them back (comments are lost: a value edit)."""
    values = yaml.safe_load(path.read_text())
    change(values)
    path.write_text(yaml.safe_dump(values, sort_keys=False))


# -- the files -------------------------------------------------------------------------------------------------------


def test_committed_params_yaml_is_the_render_of_its_profile_and_params_local_yaml():
    committed = (ROOT / "params.yaml").read_text()
    name = yaml.safe_load(committed)["profile"]
    assert committed == render_text(name, ROOT / LOCAL_FILE), (
        f"params.yaml is not pipeline/profiles/base.yaml + {name}.yaml + params.local.yaml: put your values in "
        "params.local.yaml, then `make profile`"
    )


@pytest.mark.parametrize("name", PROFILES)
def test_each_profile_renders_a_params_file_every_stage_accepts(name):
    params = render_params(name)
    check_params(params)
    assert params["profile"] == name


def test_rendering_keeps_the_comments_of_base_and_profile():
    text = render_text("competition")
    assert "# candidate gradient-accumulation factors" in text  # from base.yaml
    assert "# members not listed weigh 1; the seeds count the vit members twice" in text  # from competition.yaml


def test_a_profile_restates_nothing_the_base_says():
    base = dict(leaves(yaml.safe_load(BASE_FILE.read_text())))
    for name in PROFILES:
        restated = [path for path, value in leaves(overlay(name)) if path in base and base[path] == value]
        assert restated == [], f"{name}.yaml repeats base.yaml at {restated}"


def test_a_value_every_profile_sets_alike_belongs_in_the_base():
    first, *others = (dict(leaves(overlay(name))) for name in PROFILES)
    alike = [path for path, value in first.items() if path != ("profile",) and all(o.get(path) == value for o in others)]
    assert alike == []


@pytest.mark.parametrize("name", PROFILES)
def test_a_setting_all_members_share_is_written_once_in_member_defaults(name):
    members = overlay(name)["train"]["members"].values()
    keys = set().union(*members)
    shared = [key for key in keys if all(key in m for m in members) and len({repr(m[key]) for m in members}) == 1]
    assert shared == []


def test_member_defaults_reach_every_member_and_a_members_own_key_wins():
    members = load_train_config(render_params("competition")).members
    assert all(m.epochs == 12 and m.lr == 0.01 and m.schedule == "fine_tune" and m.pretrained for m in members.values())
    demo = load_train_config(render_params("demo")).members
    assert (demo["convnext_squish"].targets, demo["resnet_pad_multi"].targets) == ("label", "label+variety")


def test_competition_profile_is_the_seeds_ensemble():
    members = load_train_config(render_params("competition")).members
    assert {m.arch for m in members.values()} == {
        "convnext_large_in22k",
        "vit_large_patch16_224",
        "swinv2_large_window12_192_22k",
        "swin_large_patch4_window7_224",
    }
    assert render_params("competition")["ensemble"]["weights"]["vit_large_squish"] == 2


# -- switching -------------------------------------------------------------------------------------------------------


def local(path, text):
    (path.parent / "params.local.yaml").write_text(text)


def test_switch_writes_the_rendered_profile(demo_params):
    switch_profile("competition", demo_params)
    assert demo_params.read_text() == render_text("competition")
    assert not demo_params.with_name("params.yaml.bak").exists()  # nothing of the user's to keep


def test_a_missing_params_file_is_written(tmp_path):
    switch_profile("demo", tmp_path / "params.yaml", tmp_path / "params.local.yaml")
    assert (tmp_path / "params.yaml").read_text() == render_text("demo")


def test_params_local_yaml_goes_on_top_of_every_profile_with_its_comments(demo_params):
    local(demo_params, "collab:\n  epochs: 9                  # my note\ntrain:\n  bs: 16\n")
    for name in PROFILES:
        message = switch_profile(name, demo_params)
        switched = yaml.safe_load(demo_params.read_text())
        assert (switched["collab"]["epochs"], switched["train"]["bs"]) == (9, 16)
        rendered = dict(leaves(render_params(name)))
        assert [path for path, value in leaves(switched) if rendered.get(path) != value] == [("train", "bs"),
                                                                                           ("collab", "epochs")]
        assert "epochs: 9                  # my note" in demo_params.read_text() and "params.local.yaml" in message


def test_an_added_member_in_params_local_yaml_joins_the_profiles_members(demo_params):
    local(demo_params, "train:\n  members:\n    tiny:\n      arch: resnet10t\n")
    switch_profile("competition", demo_params)
    members = yaml.safe_load(demo_params.read_text())["train"]["members"]
    assert members["tiny"] == {"arch": "resnet10t"} and "vit_large_640" in members


@pytest.mark.parametrize("folds, full, fold_ids", [(1, "false", []), (3, "false", [0, 1, 2]), (3, "true", [])])
def test_the_fold_stages_ids_are_written_from_validation_folds(demo_params, folds, full, fold_ids):
    local(demo_params, f"validation:\n  folds: {folds}\n  full: {full}\n")
    switch_profile("demo", demo_params)
    assert yaml.safe_load(demo_params.read_text())["validation"]["fold_ids"] == fold_ids
    assert f"fold_ids: {fold_ids}".replace("'", "") in demo_params.read_text()  # one line, with its comment


def test_without_a_name_the_profile_params_yaml_names_is_rendered_again(demo_params):
    switch_profile("competition", demo_params)
    local(demo_params, "seed: 7\n")
    switch_profile(None, demo_params)
    assert yaml.safe_load(demo_params.read_text())["seed"] == 7
    assert yaml.safe_load(demo_params.read_text())["profile"] == "competition"


def test_a_value_changed_in_params_yaml_is_refused_naming_it_and_the_file_is_untouched(demo_params):
    edit(demo_params, lambda p: p["train"]["members"]["convnext_squish"].update(epochs=8))  # as dvc exp run -S does
    before = demo_params.read_text()
    with pytest.raises(ProfileError, match=r"you changed train.members.convnext_squish.epochs there, not in "
                                           r"params.local.yaml; move your values into params.local.yaml"):
        switch_profile("competition", demo_params)
    assert demo_params.read_text() == before and not demo_params.with_name("params.yaml.bak").exists()


def test_a_value_changed_in_params_yaml_is_refused_even_when_rendering_the_same_profile_again(demo_params):
    edit(demo_params, lambda p: p["data"].update(skip_bad_images=1))  # 1 is not false: a change
    with pytest.raises(ProfileError, match=r"you changed data.skip_bad_images"):
        switch_profile("demo", demo_params)


def test_a_key_the_profiles_gained_since_params_yaml_was_written_is_not_a_change_of_yours(demo_params):
    # as after a `git pull` that adds member options to base.yaml: params.yaml predates them
    edit(demo_params, lambda p: [p["train"]["member_defaults"].pop(key) for key in ("min_scale", "accum")])
    assert switch_profile("demo", demo_params).startswith(f"{demo_params} is now the demo profile")
    assert yaml.safe_load(demo_params.read_text())["train"]["member_defaults"]["min_scale"] == 0.75


def changed_base(monkeypatch, folder, old, new):
    """base.yaml with `old` replaced by `new`, as after a `git pull` or a fork's own edit of it."""
    base = folder / "base.yaml"
    base.write_text(BASE_FILE.read_text().replace(old, new))
    monkeypatch.setattr(profile, "BASE_FILE", base)


def test_a_changed_profile_file_is_not_a_change_of_yours(demo_params, monkeypatch):
    changed_base(monkeypatch, demo_params.parent, "seed: 42", "seed: 7")
    assert switch_profile(None, demo_params).startswith(f"{demo_params} is now the demo profile")
    assert yaml.safe_load(demo_params.read_text())["seed"] == 7


def test_a_value_you_changed_is_still_refused_after_a_profile_file_changed(demo_params, monkeypatch):
    demo_params.write_text(demo_params.read_text().replace("  bs: ", "  bs: 1", 1))  # comments kept: an edit by hand
    changed_base(monkeypatch, demo_params.parent, "seed: 42", "seed: 7")
    with pytest.raises(ProfileError, match=r"you changed .*train.bs"):
        switch_profile(None, demo_params)


def test_a_new_value_in_params_local_yaml_wins_over_the_one_it_wrote_before(demo_params):
    local(demo_params, "train:\n  bs: 16\n")
    switch_profile("demo", demo_params)
    local(demo_params, "train:\n  bs: 8\n")
    switch_profile("competition", demo_params)
    assert yaml.safe_load(demo_params.read_text())["train"]["bs"] == 8


def test_a_forced_switch_writes_the_profile_and_keeps_the_changed_file(demo_params):
    edit(demo_params, lambda p: p["train"].update(bs=16))
    edited = demo_params.read_text()
    message = switch_profile("competition", demo_params, force=True)
    assert demo_params.read_text() == render_text("competition")
    assert demo_params.with_name("params.yaml.bak").read_text() == edited
    assert "train.bs" in message and "params.yaml.bak" in message


def test_a_comment_edit_does_not_block_a_switch_and_is_kept_in_the_backup(demo_params):
    commented = demo_params.read_text().replace("seed: 42", "seed: 42  # my note")
    demo_params.write_text(commented)
    message = switch_profile("competition", demo_params)
    assert demo_params.read_text() == render_text("competition")
    assert demo_params.with_name("params.yaml.bak").read_text() == commented
    assert "params.yaml.bak" in message


def test_a_file_naming_no_profile_is_refused_unless_forced(demo_params):
    demo_params.write_text(demo_params.read_text().replace("profile: demo", "profile: mine"))
    with pytest.raises(ProfileError, match=r"names no profile \(profile: 'mine'\)"):
        switch_profile("competition", demo_params)
    switch_profile("competition", demo_params, force=True)
    assert demo_params.read_text() == render_text("competition")
    assert "profile: mine" in demo_params.with_name("params.yaml.bak").read_text()


def test_a_broken_params_local_yaml_is_one_line_naming_it(demo_params, capsys):
    local(demo_params, "train: [unclosed\n")
    with pytest.raises(SystemExit, match=r"^profile: params.local.yaml: cannot be read as YAML .*; fix the file$"):
        main(["competition"])


def test_print_shows_the_profile_without_writing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["competition", "--print"])
    assert capsys.readouterr().out == render_text("competition")
    assert not (tmp_path / "params.yaml").exists()
