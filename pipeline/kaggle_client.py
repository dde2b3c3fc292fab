"""The official Kaggle client: imported lazily, authenticated quietly, its failures one secret-free line each."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import urllib3

TOKEN_PAGE = "https://www.kaggle.com/settings/api"
NO_CREDENTIALS = (
    f"no Kaggle credentials found; create an API token at {TOKEN_PAGE} and put it in ~/.kaggle/access_token "
    "or the KAGGLE_API_TOKEN variable (or kaggle.json in ~/.kaggle or $KAGGLE_CONFIG_DIR, or KAGGLE_USERNAME and "
    "KAGGLE_KEY)"
)
# What a failed client call raises (kaggle 2.x): requests' errors (OSErrors, with the response), urllib3's that its
# retries let through, OSErrors of the files it writes. Anything else is a bug and raises as itself.
CLIENT_ERRORS = (OSError, urllib3.exceptions.HTTPError)


class KaggleError(RuntimeError):
    """A one-line, secret-free account of what the Kaggle client could not do."""


def credentials_source() -> str | None:
    """Where the Kaggle client (kaggle 2.2.4) would find credentials, in its order, or None; never their value."""
    from kagglesdk import KaggleCredentials, get_access_token_from_env  # here: importing it takes a quarter second

    token, source = get_access_token_from_env()  # a notebook's token, KAGGLE_API_TOKEN, ~/.kaggle/access_token(.txt)
    if token:
        names = {"KAGGLE_API_TOKEN": "the KAGGLE_API_TOKEN variable", "access_token": "~/.kaggle/access_token(.txt)"}
        return names.get(source, "the Kaggle notebook's token")
    environ, home = os.environ, Path.home()
    if environ.get("KAGGLE_USERNAME") and environ.get("KAGGLE_KEY"):
        return "the KAGGLE_USERNAME and KAGGLE_KEY variables"
    # Where the client looks for kaggle.json when imported (which authenticates): $KAGGLE_CONFIG_DIR, ~/.kaggle, XDG's.
    xdg_dir = Path(environ.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle"
    default_dir = home / ".kaggle" if (home / ".kaggle").exists() else xdg_dir
    kaggle_json = Path(environ.get("KAGGLE_CONFIG_DIR") or default_dir) / "kaggle.json"
    oauth = Path(KaggleCredentials.DEFAULT_CREDENTIALS_FILE).expanduser()
    found = [path for path in (kaggle_json, oauth) if path.is_file()]  # the client's order: kaggle.json first
    return str(found[0]) if found else None


def authenticated_api():
    """An authenticated KaggleApi; KaggleError when no credential is usable. Imported here, its output swallowed:
    `import kaggle` authenticates at import time and prints a page of help when it cannot."""
    where = credentials_source()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
            api.authenticate()
        except SystemExit:  # authenticate() exits when no credential it finds is usable
            found = f"could not use the credentials in {where}" if where else "found no credentials"
            raise KaggleError(f"the Kaggle client {found}; {NO_CREDENTIALS}") from None
    return api


def failure_message(err: Exception, competition: str, action: str) -> str:
    """One line for a failed client call (`action`: 'download', 'upload'): HTTP status, OS error or exception type;
    nothing else of it, which can carry headers or signed URLs (callers raise `from None`)."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        return f"Kaggle rejected the credentials (HTTP 401); create a new API token at {TOKEN_PAGE} and put it in place"
    if status == 403:
        return (f"Kaggle refused the {action} (HTTP 403); accept the rules at "
                f"https://www.kaggle.com/competitions/{competition}/rules with the account of your credentials")
    if status == 404:
        return f"Kaggle has no competition {competition!r} (HTTP 404); check https://www.kaggle.com/competitions"
    if status is not None:
        return f"the Kaggle API failed (HTTP {status}) during the {action}; retry later"
    if isinstance(err, OSError) and err.errno is not None:  # a local file, not the network (e.g. a full disk)
        where = f" writing {err.filename}" if err.filename else ""
        return f"the {action} failed{where}: {os.strerror(err.errno)}; fix that and retry"
    return f"the Kaggle API failed ({type(err).__name__}); check the network and retry the {action}"
