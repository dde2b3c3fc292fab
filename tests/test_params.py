"""params.yaml is read once into typed configs; every mistake is one line naming the file, the key and the fix."""

from dataclasses import dataclass, field
from typing import Annotated, Literal

import pytest

from pipeline.params import Check, FieldError, ParamsError, from_mapping, known_values, load_section, profile_of, read_params
from pipeline import vision
from pipeline.vision import MemberConfig, load_train_config


@dataclass(frozen=True)
class Inner:
    name: str
    size: int | tuple[int, int] = 8


@dataclass(frozen=True)
class Outer:
    lr: float | Literal["find"]
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    inners: dict[str, Inner] = field(default_factory=dict)
    values: list[int] = field(default_factory=list)
    count: Annotated[int | None, Check(lambda n: n is None or n >= 1, "use null or a positive count")] = None

    def __post_init__(self):
        if self.values and min(self.values) < 0:
            raise ValueError("values must not be negative")
        if self.lr == 0:
            raise FieldError("lr", "is 0.0; use a positive number")


def build(raw):
    return from_mapping(Outer, raw, "section", "params.yaml")


def test_valid_mapping_builds_typed_config():
    config = build({"lr": 1, "inners": {"x": {"name": "n", "size": [3, 4]}}, "values": [1, 2]})
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.inners["x"].size == (3, 4)


def test_yaml_exponent_string_is_read_as_a_float():
    assert build({"lr": "1e-3"}).lr == pytest.approx(0.001)


def test_literal_alternative_accepted():
    assert build({"lr": "find"}).lr == "find"


def test_unknown_key_names_dotted_key_and_known_keys():
    with pytest.raises(ParamsError, match=r"unknown key 'section.inners.x.nmae'.*use one of: name, size"):
        build({"lr": 1.0, "inners": {"x": {"nmae": "n"}}})


def test_missing_required_key_is_named():
    with pytest.raises(ParamsError, match=r"missing key 'section.lr'"):
        build({})


def test_wrong_type_names_key_value_and_expected_type():
    with pytest.raises(ParamsError, match=r"key 'section.flag' is 'yes'; expected bool"):
        build({"lr": 1.0, "flag": "yes"})


def test_bool_is_not_accepted_as_int():
    with pytest.raises(ParamsError, match=r"section.values\[0\]"):
        build({"lr": 1.0, "values": [True]})


def test_literal_lists_allowed_values():
    with pytest.raises(ParamsError, match=r"key 'section.mode' is 'c'; use one of: a, b"):
        build({"lr": 1.0, "mode": "c"})


def test_tuple_length_checked():
    with pytest.raises(ParamsError, match=r"has 3 items; expected 2"):
        build({"lr": 1.0, "inners": {"x": {"name": "n", "size": [1, 2, 3]}}})


def test_post_init_error_carries_the_section():
    with pytest.raises(ParamsError, match=r"key 'section': values must not be negative"):
        build({"lr": 1.0, "values": [-1]})


def test_a_field_error_names_the_dotted_key():
    with pytest.raises(ParamsError, match=r"^params.yaml: key 'section.lr' is 0.0; use a positive number$"):
        build({"lr": 0})


def test_a_value_outside_its_fields_check_names_the_key_and_the_fix():
    assert build({"lr": 1.0, "count": None}).count is None
    with pytest.raises(ParamsError, match=r"^params.yaml: key 'section.count' is 0; use null or a positive count$"):
        build({"lr": 1.0, "count": 0})


def test_a_partial_mapping_is_checked_key_by_key_without_requiring_the_rest():
    assert known_values(Outer, {"flag": True}, "defaults") == {"flag": True}
    with pytest.raises(ParamsError, match=r"key 'defaults.mode' is 'c'; use one of: a, b"):
        known_values(Outer, {"mode": "c"}, "defaults")
    with pytest.raises(ParamsError, match=r"unknown key 'defaults.colour'"):
        known_values(Outer, {"colour": "red"}, "defaults")


def test_every_error_is_one_line():
    with pytest.raises(ParamsError) as caught:
        build({"lr": 1.0, "inners": {"x": {"name": "n", "size": "big"}}})
    assert "\n" not in str(caught.value)


def test_missing_params_file(tmp_path):
    with pytest.raises(ParamsError, match=r"not found"):
        read_params(tmp_path / "params.yaml")


def test_malformed_yaml_names_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("profile: demo\ntrain: [\n")
    with pytest.raises(ParamsError, match=r"params.yaml line \d+: not valid YAML"):
        read_params(path)


def test_unknown_profile_rejected():
    with pytest.raises(ParamsError, match=r"^params.yaml: key 'profile' is 'prod'; use one of: demo, competition$"):
        profile_of({"profile": "prod"})


def test_missing_section_named_with_where_to_find_it():
    with pytest.raises(ParamsError, match=r"missing section 'train'; add it back \(`python -m pipeline.profile demo --print`"):
        load_section(Outer, {}, "train")


def test_member_rejects_unknown_timm_arch():
    """Checked by the loader every probe and train start with (the params stage imports no timm, so no torch)."""
    params = {"train": {"bs": 8, "members": {"ok": {"arch": "resnet10t"}, "m": {"arch": "resnet_9000"}}}}
    with pytest.raises(ParamsError, match=r"'train.members.m': arch 'resnet_9000' is not a timm model"):
        vision.load_train_config(params)


def test_member_rejects_missing_local_weights_file(tmp_path):
    with pytest.raises(ParamsError, match=r"weights file .* not found"):
        from_mapping(MemberConfig, {"arch": "resnet10t", "pretrained": str(tmp_path / "w.pth")}, "train.members.m")


def test_max_steps_per_epoch_must_be_null_or_positive():
    with pytest.raises(ParamsError, match=r"'train.members.m.max_steps_per_epoch' is 0; use null or a positive integer"):
        from_mapping(MemberConfig, {"arch": "resnet10t", "max_steps_per_epoch": 0}, "train.members.m")


def test_unknown_member_name_lists_members():
    config = load_train_config(read_params())
    with pytest.raises(ParamsError, match=r"no member 'nope' under train.members; use one of"):
        config.member("nope")
