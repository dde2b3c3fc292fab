"""Both profiles are complete, valid parameter files; params.yaml switches between them without losing edits."""

import pytest

from pipeline.params import profile_of, read_params
from pipeline.profile import PROFILE_DIR, ProfileError, switch_profile, unedited_profile
from pipeline.vision import load_train_config

PROFILE_FILES = sorted(PROFILE_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_profile_file_names_itself(path):
    assert profile_of(read_params(path)) == path.stem


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_profile_train_section_validates(path):
    config = load_train_config(read_params(path))
    assert config.members


def test_profiles_share_the_same_sections():
    sections = {path.stem: set(read_params(path)) for path in PROFILE_FILES}
    assert sections["demo"] == sections["competition"]


def test_competition_profile_is_the_seeds_ensemble():
    members = load_train_config(read_params(PROFILE_DIR / "competition.yaml")).members
    archs = {m.arch for m in members.values()}
    assert archs == {
        "convnext_large_in22k",
        "vit_large_patch16_224",
        "swinv2_large_window12_192_22k",
        "swin_large_patch4_window7_224",
    }
    assert all(m.epochs == 12 and m.lr == 0.01 and m.schedule == "fine_tune" and m.pretrained for m in members.values())


def test_switch_writes_the_profile(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((PROFILE_DIR / "demo.yaml").read_text())
    switch_profile("competition", params)
    assert unedited_profile(params) == "competition"


def test_switch_refuses_to_drop_local_edits(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((PROFILE_DIR / "demo.yaml").read_text() + "# my tweak\n")
    with pytest.raises(ProfileError, match=r"has edits that are in no profile file"):
        switch_profile("competition", params)
    assert params.read_text().endswith("# my tweak\n")


def test_forced_switch_keeps_a_backup(tmp_path):
    params = tmp_path / "params.yaml"
    edited = (PROFILE_DIR / "demo.yaml").read_text() + "# my tweak\n"
    params.write_text(edited)
    switch_profile("competition", params, force=True)
    assert (tmp_path / "params.yaml.bak").read_text() == edited
    assert unedited_profile(params) == "competition"
