"""Switch params.yaml to a profile (`python -m pipeline.profile competition`).

params.yaml is always a copy of one of pipeline/profiles/*.yaml, possibly edited. Switching never throws away
edits silently: if params.yaml matches no profile file, the switch refuses unless `--force`, and even then the old
file is kept as params.yaml.bak.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pipeline.params import PARAMS_FILE, PROFILES, ParamsError, profile_of, read_params

PROFILE_DIR = Path(__file__).parent / "profiles"


class ProfileError(RuntimeError):
    """A refused switch; the message says why and what to do."""


def profile_file(name: str) -> Path:
    if name not in PROFILES:
        raise ProfileError(f"unknown profile {name!r}; use one of: {', '.join(PROFILES)}")
    return PROFILE_DIR / f"{name}.yaml"


def unedited_profile(params_file: Path) -> str | None:
    """The profile params_file is an exact copy of, or None if it has local edits (or is missing)."""
    if not params_file.is_file():
        return None
    text = params_file.read_text()
    return next((name for name in PROFILES if profile_file(name).read_text() == text), None)


def switch_profile(name: str, params_file: Path = PARAMS_FILE, force: bool = False) -> str:
    """Write profile `name` to params_file; returns a one-line description of what was done."""
    source = profile_file(name)
    read_params(source)  # a broken profile file must not replace a working params.yaml
    if params_file.is_file() and unedited_profile(params_file) is None:
        if not force:
            raise ProfileError(
                f"{params_file} has edits that are in no profile file; commit or copy them, or rerun with --force "
                f"(the current file is then kept as {params_file}.bak)"
            )
        shutil.copyfile(params_file, params_file.with_name(params_file.name + ".bak"))
    shutil.copyfile(source, params_file)
    return f"{params_file} is now the {profile_of(read_params(params_file))} profile (from {source})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", choices=PROFILES)
    parser.add_argument("--force", action="store_true", help="switch even if params.yaml has local edits")
    args = parser.parse_args(argv)
    try:
        print(switch_profile(args.profile, force=args.force))
    except (ProfileError, ParamsError) as err:
        raise SystemExit(f"profile: {err}") from None


if __name__ == "__main__":
    main()
