"""Profiles: params.yaml is pipeline/profiles/base.yaml with one profile on top (`python -m pipeline.profile NAME`).

base.yaml holds the params every profile shares; demo.yaml and competition.yaml hold only what differs. Rendering
puts a profile on the base: mappings merge key by key; anything else (a number, a string, a list) replaces the
base's value; a key the base lacks goes right after the key that precedes it in the profile file; comments come
along (the profile's, where both files comment a key). ruamel.yaml (the YAML library DVC reads params with) keeps
the comments.

A switch is a three-way merge of parsed values, as git merges lines: your edits are where params.yaml differs from
a fresh render of the profile it names. They are carried onto the new profile, except where the new profile
changes the same key to something else: then the switch refuses, naming the key, and `--force` lets the profile
win. Comment edits are no edits; whenever the old file's text differs from that fresh render, it is kept as
params.yaml.bak, so nothing typed into it is lost.
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError
from ruamel.yaml.representer import RoundTripRepresenter

from pipeline.common import atomic_path
from pipeline.params import PARAMS_FILE, PROFILES

PROFILE_DIR = Path(__file__).parent / "profiles"
BASE_FILE = PROFILE_DIR / "base.yaml"
HEADER = (
    "# paddy-pipeline parameters: pipeline/profiles/base.yaml with pipeline/profiles/{name}.yaml on top, as written by\n"
    "# `make profile PROFILE={name}`. Edit freely: a profile switch carries your edits over (README \"Profiles\").\n"
    "# Every stage reads only its own section(s); dvc.yaml lists which.\n"
)
# A top-level key whose value is a block (a section): the rendered file has one blank line before each.
SECTION_LINE = re.compile(r"^[^\s#][^:]*:\s*(#.*)?$")


class ProfileError(RuntimeError):
    """A refused switch or a broken profile file; the message says why and what to do."""


class _Removed:
    """Where a key is absent: a value no YAML file can hold."""

    def __repr__(self) -> str:
        return "<removed>"


REMOVED = _Removed()


class _Representer(RoundTripRepresenter):
    """Writes `null` as `null` (ruamel's default is an empty value, which reads as a missing setting)."""


_Representer.add_representer(
    type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null")
)


def profile_file(name: str) -> Path:
    if name not in PROFILES:
        raise ProfileError(f"unknown profile {name!r}; use one of: {', '.join(PROFILES)}")
    return PROFILE_DIR / f"{name}.yaml"


# -- rendering ------------------------------------------------------------------------------------------------------


def render_text(name: str) -> str:
    """params.yaml for profile `name`: the base with the profile on top, with comments."""
    return _text(name, _render(name))


def _render(name: str) -> CommentedMap:
    merged = _load_file(BASE_FILE)
    merged.ca.comment = None  # the base's header is about base.yaml, not about params.yaml
    merge_onto(merged, _load_file(profile_file(name)))
    return merged


def _text(name: str, document: CommentedMap) -> str:
    return _tidy(HEADER.format(name=name) + _leading_comments(profile_file(name)) + _dump(document))


def render_params(name: str) -> dict:
    """Profile `name`'s params as DVC and the stages read them (plain values, no comments)."""
    return _values(render_text(name), profile_file(name))


def merge_onto(base: CommentedMap, overlay: CommentedMap) -> None:
    """Put `overlay` on `base` in place: mappings merge key by key, any other value replaces base's."""
    previous = None
    for key, value in overlay.items():
        if isinstance(base.get(key), dict) and isinstance(value, dict):
            merge_onto(base[key], value)
        elif key in base:
            base[key] = value
        else:
            base.insert(_position_after(base, previous), key, value)
        _copy_comment(overlay, base, key)
        previous = key


def _position_after(mapping: CommentedMap, previous: Any) -> int:
    return 0 if previous is None else list(mapping).index(previous) + 1


def _copy_comment(source: CommentedMap, target: CommentedMap, key: Any) -> None:
    comment = source.ca.items.get(key)
    if comment is not None and getattr(comment[2], "value", "").strip():
        target.ca.items[key] = comment


def _yaml() -> YAML:
    yaml = YAML()
    yaml.Representer = _Representer
    yaml.width = 4096  # never wrap a long string value onto a second line
    return yaml


def _load_file(path: Path) -> CommentedMap:
    try:
        document = _yaml().load(path.read_text())
    except (OSError, YAMLError) as err:
        raise ProfileError(f"{path}: cannot be read as YAML ({str(err).splitlines()[0]}); fix the file") from None
    if not isinstance(document, CommentedMap):
        raise ProfileError(f"{path}: expected a mapping of sections at the top level")
    return document


def _leading_comments(path: Path) -> str:
    lines = path.read_text().splitlines(keepends=True)
    return "".join(lines[: next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))])


def _dump(document: CommentedMap) -> str:
    stream = io.StringIO()
    _yaml().dump(document, stream)
    return stream.getvalue()


def _tidy(text: str) -> str:
    """One blank line before each top-level section and none elsewhere, whichever file a line came from."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    tidy: list[str] = []
    for line in lines:
        if SECTION_LINE.match(line):
            start = len(tidy)
            while start > header and tidy[start - 1].startswith("#"):
                start -= 1  # a comment written right above a section stays with it
            if start > header:
                tidy.insert(start, "")
        tidy.append(line)
    return "\n".join(tidy) + "\n"


def _values(text: str, path: Path) -> Any:
    try:
        return YAML(typ="safe").load(text)
    except YAMLError as err:
        raise ProfileError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None


# -- switching ------------------------------------------------------------------------------------------------------


def value_edits(old: Any, new: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Each place where `new` differs from `old`, as (path of keys, new's value there or REMOVED), outermost first.

    Mappings are compared key by key; anything else is one value (a list is edited as a whole).
    """
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(key for key in new if key not in old)]:
            yield from value_edits(old.get(key, REMOVED), new.get(key, REMOVED), (*path, key))
    elif not _same(old, new):
        yield path, new


def _same(a: Any, b: Any) -> bool:
    """Equal values of equal types (YAML's `1`, `1.0` and `true` are three different settings)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _lookup(values: Any, path: tuple) -> Any:
    for key in path:
        if not isinstance(values, dict) or key not in values:
            return REMOVED
        values = values[key]
    return values


def _overlap(a: tuple, b: tuple) -> bool:
    """One path is the other or lies inside it."""
    return a[: len(b)] == b or b[: len(a)] == a


def dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def _carry(edit: tuple, target: CommentedMap, edited: CommentedMap) -> None:
    """Apply the user's edit at path `edit` (taken, with its comment, from document `edited`) to `target`."""
    *parents, key = edit
    for parent in parents:
        target, edited = target[parent], edited[parent]
    if key not in edited:
        del target[key]
        return
    if key not in target:
        earlier = list(edited)[: list(edited).index(key)]
        previous = next((k for k in reversed(earlier) if k in target), None)
        target.insert(_position_after(target, previous), key, edited[key])
    else:
        target[key] = edited[key]
    _copy_comment(edited, target, key)


def switch_profile(name: str, params_file: Path = PARAMS_FILE, force: bool = False) -> str:
    """Write profile `name` to params_file, carrying the user's edits over; returns what was done, in one line."""
    params_file = Path(params_file)
    backup = params_file.with_name(params_file.name + ".bak")
    fresh = render_text(name)
    if not params_file.is_file():
        _write(params_file, fresh)
        return f"{params_file} is now the {name} profile"
    text = params_file.read_text()
    try:
        current, edited = YAML(typ="safe").load(text), _yaml().load(text)
    except YAMLError as err:
        current = edited = None
        problem = f"is not valid YAML ({str(err).splitlines()[0]})"
    else:
        problem = f"names no profile (profile: {current.get('profile')!r})" if isinstance(current, dict) else "is not a mapping"
    origin = current.get("profile") if isinstance(current, dict) else None
    if origin not in PROFILES:
        if not force:
            raise ProfileError(
                f"{params_file} {problem}, so your edits cannot be told from a profile's values; fix it, or rerun "
                f"with --force (writes the plain {name} profile and keeps your file as {backup})"
            )
        shutil.copyfile(params_file, backup)
        _write(params_file, fresh)
        return f"{params_file} is now the plain {name} profile; your old file is {backup}"

    pristine = render_text(origin)
    old, new = render_params(origin), render_params(name)
    result = _render(name)
    profile_changes = [path for path, _ in value_edits(old, new)]
    carried, collisions = [], []
    for path, value in value_edits(old, current):
        if _same(_lookup(new, path), value):
            continue  # the new profile says the same
        clash = next((change for change in profile_changes if _overlap(change, path)), None)
        if clash is not None:
            collisions.append((path, clash))
        else:
            _carry(path, result, edited)
            carried.append(dotted(path))
    if collisions and not force:
        path, clash = collisions[0]
        more = f" ({len(collisions) - 1} more collide)" if len(collisions) > 1 else ""
        raise ProfileError(
            f"{params_file}: your edit of '{dotted(path)}' collides with the {name} profile, which changes "
            f"'{dotted(clash)}'{more}; undo the edit, or rerun with --force (the profile wins and your file is kept "
            f"as {backup})"
        )
    if text != pristine:
        shutil.copyfile(params_file, backup)
    _write(params_file, _text(name, result))
    done = [f"{params_file} is now the {name} profile"]
    if carried:
        done.append(f"your edits carried over: {', '.join(carried)}")
    if collisions:
        done.append(f"the profile won over your edits of: {', '.join(dotted(path) for path, _ in collisions)}")
    if text != pristine:
        done.append(f"your old file is {backup}")
    return "; ".join(done)


def _write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", choices=PROFILES)
    parser.add_argument("--force", action="store_true", help="switch even where your edits collide with the profile")
    parser.add_argument("--print", action="store_true", help="print the profile's params.yaml instead of writing it")
    args = parser.parse_args(argv)
    try:
        if args.print:
            print(render_text(args.profile), end="")
        else:
            print(switch_profile(args.profile, force=args.force))
    except ProfileError as err:
        raise SystemExit(f"profile: {err}") from None


if __name__ == "__main__":
    main()
