"""Read params.yaml once and turn a section of it into a typed, validated config (a frozen dataclass).

An unknown or missing key, a wrong type or a value out of range is a one-line ParamsError naming the file, the dotted
key and the fix. Hand-rolled, not pydantic: its multi-line reports are not the one-line errors this project promises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

PARAMS_FILE = Path("params.yaml")
PROFILES = ("demo", "competition")
# Where every key of a complete params.yaml can be seen, for errors about a missing one.
SHOW_PROFILE = "`python -m pipeline.profile demo --print` shows a complete params.yaml"

C = TypeVar("C")


class ParamsError(ValueError):
    """A bad params.yaml: the message is one line naming the file, the key and the fix."""


@dataclasses.dataclass(frozen=True)
class Check:
    """A field's range, as `Annotated` metadata (pydantic's shape): a value that fails `ok` is the one-line error
    "key '<key>' is <value>; <fix>". Annotate the whole type (`Annotated[int | None, ...]`): a union's error is its
    own. Checks across fields stay in `__post_init__`."""

    ok: Callable[[Any], bool]
    fix: str


PositiveInt = Annotated[int, Check(lambda n: n >= 1, "use a positive integer")]
Positive = Annotated[float, Check(lambda x: x > 0, "use a positive number")]
Fraction = Annotated[float, Check(lambda x: 0 < x < 1, "use a fraction between 0 and 1, e.g. 0.2")]


class FieldError(ValueError):
    """`__post_init__` rejects a field, e.g. FieldError("valid_pct", "is 1.5; use a fraction ..."); from_mapping
    names its dotted key."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def read_params(path: Path | str = PARAMS_FILE) -> dict:
    """The whole params file as a dict; a missing or malformed file is a ParamsError."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the project root, or write it with `make profile PROFILE=demo`")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level; {SHOW_PROFILE}")
    return raw


def profile_of(params: Mapping[str, Any], path: Path | str = PARAMS_FILE) -> str:
    """The profile named at the top of params.yaml (recorded in every metrics file)."""
    return _coerce(Literal[PROFILES], params.get("profile"), "profile", path)


def seed_of(params: Mapping[str, Any], path: Path | str = PARAMS_FILE) -> int:
    """The top-level `seed` every stage that draws random numbers starts from."""
    return _coerce(int, params.get("seed"), "seed", path)


def fold_ids_for(folds: int, full: bool) -> list[int]:
    """`validation.fold_ids` for `validation.folds`: one fold stage per id, none for one shared split or `full`."""
    return [] if folds < 2 or full else list(range(folds))


def section_of(params: Mapping[str, Any], section: str, path: Path | str = PARAMS_FILE) -> Any:
    """`params[section]`; a missing section is an error (no section has defaults)."""
    if section not in params:
        raise ParamsError(f"{path}: missing section '{section}'; add it back ({SHOW_PROFILE})")
    return params[section]


def load_section(cls: type[C], params: Mapping[str, Any], section: str, path: Path | str = PARAMS_FILE) -> C:
    """Build dataclass `cls` from `params[section]`, validating every key and value."""
    return from_mapping(cls, section_of(params, section, path), section, path)


def from_mapping(cls: type[C], raw: Any, key: str, path: Path | str = PARAMS_FILE) -> C:
    """Build dataclass `cls` from mapping `raw` found at dotted `key` of `path`."""
    values = known_values(cls, raw, key, path)
    for field in dataclasses.fields(cls):
        no_default = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if field.init and no_default and field.name not in values:
            raise ParamsError(f"{path}: missing key '{key}.{field.name}'; add it ({SHOW_PROFILE})")
    try:
        return cls(**values)
    except FieldError as err:
        raise ParamsError(f"{path}: key '{key}.{err.field}' {err.problem}") from None
    except (ValueError, TypeError) as err:
        # __post_init__ checks raise plain ValueErrors; give them the file and section they are about.
        raise ParamsError(f"{path}: key '{key}': {err}") from None


def known_values(cls: type[C], raw: Any, key: str, path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    """The keys of mapping `raw` (at dotted `key`), each checked and converted to its type; some may be missing (a
    partial config, e.g. defaults shared by several entries)."""
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{path}: key '{key}' must be a mapping, got {_shown(raw)}")
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [name for name in raw if name not in fields]
    if unknown:
        raise ParamsError(f"{path}: unknown key '{key}.{unknown[0]}'; remove it or use one of: "
                          f"{', '.join(sorted(fields))}")
    hints = get_type_hints(cls, include_extras=True)
    return {name: _coerce(hints[name], raw[name], f"{key}.{name}", path) for name in fields if name in raw}


def _coerce(hint: Any, value: Any, key: str, path: Path | str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin is Annotated:
        coerced = _coerce(args[0], value, key, path)
        for check in args[1:]:
            if not check.ok(coerced):
                raise ParamsError(f"{path}: key '{key}' is {_shown(value)}; {check.fix}")
        return coerced
    if origin in (Union, types.UnionType):
        same_shape_error = None
        for option in args:  # `None` is the option type(None)
            try:
                return _coerce(option, value, key, path)
            except ParamsError as err:
                # A list given for `int | tuple[int, int]` is best explained by the tuple's own complaint.
                if _same_shape(option, value):
                    same_shape_error = err
        if same_shape_error is not None:
            raise same_shape_error
        raise ParamsError(f"{path}: key '{key}' is {_shown(value)}; expected {_type_name(hint)}")
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{path}: key '{key}' is {_shown(value)}; use one of: {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, key, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{path}: key '{key}' is {_shown(value)}; expected a list ({_type_name(hint)})")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ParamsError(f"{path}: key '{key}' has {len(value)} items; expected {len(args)}")
            return tuple(_coerce(a, v, f"{key}[{i}]", path) for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]", path) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ParamsError(f"{path}: key '{key}' is {_shown(value)}; expected a mapping")
        key_type, value_type = args or (str, Any)
        return {_coerce(key_type, k, key, path): _coerce(value_type, v, f"{key}.{k}", path) for k, v in value.items()}
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):  # YAML 1.1 reads `1e-3` (no dot) as a string: the number meant
            return float(value)
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ParamsError(f"{path}: key '{key}' is {_shown(value)}; expected {_type_name(hint)}")


def _same_shape(hint: Any, value: Any) -> bool:
    container = get_origin(hint) or hint
    return (container in (list, tuple) and isinstance(value, (list, tuple))
            or (container is dict or dataclasses.is_dataclass(container)) and isinstance(value, Mapping))


def _type_name(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args if a is not Ellipsis)}]"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
