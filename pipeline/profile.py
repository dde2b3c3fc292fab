"""Profiles: params.yaml is pipeline/profiles/base.yaml, one profile on top, then your own params.local.yaml.

Mappings merge key by key; anything else replaces the value below; a switch refuses to drop a value changed in
params.yaml itself unless `--force` (docs/profiles.md). The merge is ruamel.yaml's (DVC's own YAML library), not
OmegaConf.merge: ruamel keeps the comments that document each key.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError
from ruamel.yaml.representer import RoundTripRepresenter

from pipeline.common import atomic_path, stage_main
from pipeline.params import PARAMS_FILE, PROFILES, fold_ids_for

PROFILE_DIR = Path(__file__).parent / "profiles"
BASE_FILE = PROFILE_DIR / "base.yaml"
LOCAL_FILE = Path("params.local.yaml")
HEADER = (
    "# paddy-pipeline parameters, written by `make profile PROFILE={name}`: pipeline/profiles/base.yaml, then\n"
    "# pipeline/profiles/{name}.yaml, then params.local.yaml if you have one. Keep your own values in params.local.yaml\n"
    "# (docs/profiles.md): a profile switch refuses to drop a value changed here. Every stage reads only its own\n"
    "# section(s); dvc.yaml lists which.\n"
    "# rendered values: {digest} (while they match it, a switch knows you changed nothing here)\n"
)
RENDERED = re.compile(r"^# rendered values: ([0-9a-f]{16}) ", re.MULTILINE)
FOLD_IDS = ("validation", "fold_ids")  # never the user's: always written from validation.folds
# A top-level key whose value is a block (a section), with the comments right above it.
SECTION = re.compile(r"^(?:#.*\n)*[^\s#][^:\n]*:[ \t]*(?:#.*)?$", re.MULTILINE)


class ProfileError(RuntimeError):
    """A refused switch or a broken profile file; the message says why and what to do."""


class _Representer(RoundTripRepresenter):
    """Writes `null` as `null` (ruamel's default is an empty value, which reads as a missing setting)."""


_Representer.add_representer(type(None), lambda self, _: self.represent_scalar("tag:yaml.org,2002:null", "null"))


def profile_file(name: str) -> Path:
    if name not in PROFILES:
        raise ProfileError(f"unknown profile {name!r}; use one of: {', '.join(PROFILES)}")
    return PROFILE_DIR / f"{name}.yaml"


def render_text(name: str, local_file: Path | None = None) -> str:
    """params.yaml for profile `name` (and `local_file`, when it exists), with the comments of every layer."""
    merged, profile = _load_file(BASE_FILE), _load_file(profile_file(name))
    merged.ca.comment = profile.ca.comment  # the profile's header says what it is; base.yaml's is about base.yaml
    for layer in [profile, *([_load_file(local_file)] if local_file and Path(local_file).is_file() else [])]:
        merge_onto(merged, layer)
    _write_fold_ids(merged)
    stream = io.StringIO()
    _yaml().dump(merged, stream)
    header = HEADER.format(name=name, digest=_digest(YAML(typ="safe").load(stream.getvalue())))
    return _tidy(header + stream.getvalue())


def render_params(name: str, local_file: Path | None = None) -> dict:
    """Profile `name`'s params (with `local_file`'s on top) as DVC and the stages read them: plain values."""
    return YAML(typ="safe").load(render_text(name, local_file))


def merge_onto(base: CommentedMap, overlay: CommentedMap) -> None:
    """Put `overlay` on `base` in place; a key base lacks goes right after the key that precedes it in overlay."""
    previous = None
    for key, value in overlay.items():
        if isinstance(base.get(key), dict) and isinstance(value, dict):
            merge_onto(base[key], value)
        elif key in base:
            base[key] = value
        else:
            base.insert(0 if previous is None else list(base).index(previous) + 1, key, value)
        comment = overlay.ca.items.get(key)
        if comment is not None and getattr(comment[2], "value", "").strip():
            base.ca.items[key] = comment
        previous = key


def _write_fold_ids(params: CommentedMap) -> None:
    """validation.fold_ids from the merged validation.folds: the list dvc.yaml's fold stages iterate over."""
    validation = params.get(FOLD_IDS[0])
    if isinstance(validation, dict) and isinstance(validation.get("folds", 1), int):
        ids = CommentedSeq(fold_ids_for(validation.get("folds", 1), validation.get("full") is True))
        ids.fa.set_flow_style()
        validation[FOLD_IDS[1]] = ids


def _yaml() -> YAML:
    yaml = YAML()
    yaml.Representer = _Representer
    yaml.width = 4096  # never wrap a long string value onto a second line
    return yaml


def _load_file(path: Path) -> CommentedMap:
    try:
        document = _yaml().load(Path(path).read_text())
    except (OSError, YAMLError) as err:
        raise ProfileError(f"{path}: cannot be read as YAML ({str(err).splitlines()[0]}); fix the file") from None
    if document is None:
        return CommentedMap()  # an empty params.local.yaml overrides nothing
    if not isinstance(document, CommentedMap):
        raise ProfileError(f"{path}: expected a mapping of sections at the top level")
    return document


def _tidy(text: str) -> str:
    """One blank line before each top-level section and none elsewhere, whichever file a line came from."""
    lines = "".join(f"{line}\n" for line in text.splitlines() if line.strip())
    return SECTION.sub(lambda section: f"\n{section[0]}", lines).lstrip("\n")


def _leaves(values: Any, path: tuple = ()) -> dict[tuple, Any]:
    """{path of keys: value} for every value in nested mappings (a list is one value)."""
    if not isinstance(values, dict):
        return {path: values}
    return {leaf: value for key in values for leaf, value in _leaves(values[key], (*path, key)).items()}


def switch_profile(name: str | None = None, params_file: Path = PARAMS_FILE, local_file: Path = LOCAL_FILE,
                   force: bool = False) -> str:
    """Write profile `name` (default: params_file's) with local_file on top to params_file, refusing to drop a value
    changed in params_file itself unless `force`; returns what was done, in one line."""
    params_file, local_file = Path(params_file), Path(local_file)
    backup = params_file.with_name(params_file.name + ".bak")
    text, values, origin, problem = _current(params_file)
    edits = []
    recorded = RENDERED.search(text or "")
    # Values that still match the digest written with them are the profile's: what differs now is a change of the
    # profile files (a `git pull`, a fork's own edit of base.yaml), never one of yours.
    if origin is not None and (recorded is None or recorded[1] != _digest(values)):
        local = _leaves(_load_file(local_file)) if local_file.is_file() else {}
        rendered = _leaves(render_params(origin, local_file))
        # Only what params.yaml holds: a key it lacks is one the profiles gained since it was written (a `git pull`).
        # A value params.local.yaml sets is the user's declared one: it wins over what params.yaml holds there (at that
        # key, inside it or around it). Compared as JSON: `1`, `1.0`, `true` differ.
        edits = [".".join(map(str, path)) for path, value in _leaves(values).items()
                 if (path not in rendered or _json(value) != _json(rendered[path])) and path != FOLD_IDS
                 and not any(path[: len(own)] == own or own[: len(path)] == path for own in local)]
    name = name or origin
    if name is None:
        raise ProfileError(f"{params_file} {problem}; name the profile to write: one of {', '.join(PROFILES)}")
    if text is not None and origin is None and not force:
        raise ProfileError(f"{params_file} {problem}, so your values cannot be told from a profile's; fix it, or "
                           f"rerun with --force (writes the {name} profile and keeps your file as {backup})")
    if edits and not force:
        raise ProfileError(f"{params_file}: you changed {', '.join(edits[:3])}"
                           f"{' and more' if len(edits) > 3 else ''} there, not in {local_file}; move your values into "
                           f"{local_file} (docs/profiles.md), or rerun with --force (writes the {name} profile and "
                           f"keeps your file as {backup})")
    kept = text is not None and (origin is None or text != render_text(origin, local_file))
    if kept:
        shutil.copyfile(params_file, backup)
    with atomic_path(params_file) as tmp:
        tmp.write_text(render_text(name, local_file))
    done = [f"{params_file} is now the {name} profile" + (f" with {local_file}" if local_file.is_file() else "")]
    if edits:
        done.append(f"the profile won over your changes of: {', '.join(edits)}")
    if kept:
        done.append(f"your old file is {backup}")
    return "; ".join(done)


def _current(params_file: Path) -> tuple[str | None, Any, str | None, str]:
    """params_file's text, its values and the profile it names (both None unless it names one), then what is wrong."""
    if not params_file.is_file():
        return None, None, None, "does not exist"
    text = params_file.read_text()
    try:
        values = YAML(typ="safe").load(text)
    except YAMLError as err:
        return text, None, None, f"is not valid YAML ({str(err).splitlines()[0]})"
    origin = values.get("profile") if isinstance(values, dict) else None
    if origin not in PROFILES:
        return text, None, None, f"names no profile (profile: {origin!r})"
    return text, values, origin, ""


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _digest(values: Any) -> str:
    return hashlib.sha256(_json(values).encode()).hexdigest()[:16]


@stage_main("profile", ProfileError)
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", nargs="?", choices=PROFILES, help="default: the profile params.yaml names")
    parser.add_argument("--force", action="store_true", help="write the profile even over values changed in "
                                                             "params.yaml (kept as params.yaml.bak)")
    parser.add_argument("--print", action="store_true", help="print the params.yaml it would write instead")
    args = parser.parse_args(argv)
    if not args.print:
        return print(switch_profile(args.profile, force=args.force))
    name = args.profile or _current(PARAMS_FILE)[2]
    if name is None:
        raise ProfileError(f"{PARAMS_FILE} names no profile; name one: {', '.join(PROFILES)}")
    print(render_text(name, LOCAL_FILE), end="")


if __name__ == "__main__":
    main()
