"""Credentials never leave the process: they are used to connect, and written nowhere.

A tracking URI may carry a secret: `http://user:password@host:5000`, a database URI such as
`postgresql://mlflow:secret@db/mlflow`, or a `?token=` query parameter. Whatever mlexp
writes or prints (params, config.json, the outbox, the start and end lines, errors) goes
through `redact`, which masks them as git and pip do: `http://user:***@host`.

An HTTP(S) URI with a user and password is taken apart once, when a command starts
(`adopt_uri_credentials`): the user and password become MLflow's own MLFLOW_TRACKING_USERNAME
and MLFLOW_TRACKING_PASSWORD in this process's environment (where MLflow's client reads them,
and where a sweep's children inherit them), and the URI goes on without them. A database URI
keeps its password (SQLAlchemy needs it to connect), but every copy that is written is redacted.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit, urlunsplit

from mlexp.errors import MlexpError

MASK = "***"
# scheme://user:password@ -> scheme://user:***@ (and a bare secret before @ in user-less forms)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<secret>[^@/\s]+)@")
_SECRET_QUERY = re.compile(r"(?P<key>[?&;](?:password|passwd|pwd|token|access_token|api_key|apikey|secret)=)"
                           r"(?P<value>[^&;#\s]+)", re.IGNORECASE)
USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


def redact(text: str | None) -> str | None:
    """`text` with every URI credential masked: passwords in userinfo, secret query values."""
    if not text:
        return text
    masked = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", str(text))
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}{MASK}", masked)


def adopt_uri_credentials(uri: str | None) -> str | None:
    """An http(s) URI's user and password moved to MLflow's environment variables; the URI
    without them. Other URIs are returned as they are (a database URI needs its password)."""
    if not uri or not uri.lower().startswith(("http://", "https://")):
        return uri
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    for variable, value in ((USERNAME_ENV, user), (PASSWORD_ENV, password)):
        if value and os.environ.get(variable) not in (None, "", value):
            raise MlexpError(f"the tracking URI {redact(uri)} carries a {variable.rsplit('_', 1)[1].lower()} that "
                             f"differs from ${variable}; keep credentials in one place ($MLFLOW_TRACKING_USERNAME "
                             "and $MLFLOW_TRACKING_PASSWORD)")
        if value:
            os.environ[variable] = value
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def adopt_environment() -> None:
    """$MLFLOW_TRACKING_URI with http(s) credentials: the same, once, for the whole process tree."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    clean = adopt_uri_credentials(uri)
    if clean != uri:
        os.environ["MLFLOW_TRACKING_URI"] = clean
