"""Credentials in URLs: shown without them, and moved out of MLFLOW_TRACKING_URI at start-up.

MLflow's client reads a tracking server's user and password from MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD on every request, so a tracking URI without them still authenticates;
that clean URI is then the only one runs, Prefect parameters, artifacts and log lines can show.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from urllib.parse import unquote, unquote_plus

# The `user:password@` between `scheme://` and the host (up to the authority's last `@`).
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#]*)@")
# Query parameters that carry tokens, keys and signatures (presigned S3, GCS and Azure SAS URLs).
_SECRET_PARAMETER = re.compile(
    r"token|passw|pwd|secret|key|sig|credential|auth|^x-amz-|^x-goog-", re.IGNORECASE
)


def redact_url(url: str) -> str:
    """`url` without its user, password and secret-looking query parameters; the rest unchanged."""
    url = _USERINFO.sub(r"\g<scheme>", url, count=1)
    before_fragment, hash_mark, fragment = url.partition("#")
    path, question_mark, query = before_fragment.partition("?")
    if not question_mark:
        return url
    kept = [
        parameter
        for parameter in query.split("&")
        if not _SECRET_PARAMETER.search(unquote_plus(parameter.partition("=")[0]))
    ]
    return path + ("?" + "&".join(kept) if kept else "") + hash_mark + fragment


def move_tracking_credentials(environ: MutableMapping[str, str] = os.environ) -> None:
    """Move `user:password@` from MLFLOW_TRACKING_URI to MLFLOW_TRACKING_USERNAME/PASSWORD.

    Only for http(s) URIs, the ones MLflow sends those variables to; a variable already set wins.
    """
    uri = environ.get("MLFLOW_TRACKING_URI", "")
    found = _USERINFO.match(uri)
    if found is None or found["scheme"].lower() not in ("http://", "https://"):
        return
    username, _, password = found["userinfo"].partition(":")
    for name, value in (
        ("MLFLOW_TRACKING_USERNAME", username),
        ("MLFLOW_TRACKING_PASSWORD", password),
    ):
        if value and not environ.get(name):
            environ[name] = unquote(value)
    environ["MLFLOW_TRACKING_URI"] = found["scheme"] + uri[found.end() :]
