"""Logging for every sfrelay process, set up in one place: text (default) or JSON lines.

`configure(fmt)` sets the root logger for `sfrelay serve`, `sfrelay worker`, `sfrelay up` and
the other commands; `uvicorn_config(fmt)` is the same configuration as the dictConfig uvicorn
applies in each of its processes (`sfrelay serve --workers N`), its access log included.

Every handler scrubs what it prints (`RedactSecrets`): query parameters that carry secrets
(judged as the application decodes them), Salesforce session ids, and anything shaped like an
email address; and it escapes, in what a line quotes, the characters that would forge another
line or rewrite the terminal showing it (app.visible: a newline in a request's path, a
terminal escape in a percent-encoded query).

With `SFRELAY_LOG_FORMAT=json` each line is one JSON object with the keys `ts` (UTC, ISO 8601),
`level`, `logger`, `msg`, then the line's structured fields (`fields(...)`), and for uvicorn's
access log `client`, `method`, `path` (scrubbed) and `status`; a character a terminal acts on
is written as a `\\uNNNN` escape, the same value for a JSON reader.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import orjson

from app.visible import visible, visible_json

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# uvicorn's own text formats, unchanged.
UVICORN_DEFAULT_FORMAT = "%(levelprefix)s %(message)s"
UVICORN_ACCESS_FORMAT = '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s'

_SECRET_PARAM = re.compile(
    r"((?:^|[?&;\s])(?:token|access_token|sessionid|session_id|sid|password)=)[^&;\s]+", re.I
)
# A Salesforce session id: the organization id, "!", then the session's secret.
_SESSION_ID = re.compile(r"\b00D[A-Za-z0-9]{12}(?:[A-Za-z0-9]{3})?![A-Za-z0-9._\-]+")
_PERCENT_WORD = re.compile(r"\S*%[0-9A-Fa-f]{2}\S*")
# Anything shaped like an email address (a database error may quote one).
_EMAIL = re.compile(r"[^\s@'\"<>(),;:=/?&]+@[^\s@'\"<>(),;:/?&]+")


def _decoded(word: str) -> str:
    for _ in range(3):  # %2574oken is %74oken is token
        decoded = unquote(word)
        if decoded == word:
            break
        word = decoded
    return word


def scrub(text: str) -> str:
    """`text` without secrets: query parameters judged as the application decodes them
    (`?%74oken=` is `?token=`), and anything shaped like a Salesforce session id."""
    if "%" in text:
        text = _PERCENT_WORD.sub(lambda m: _decoded(m.group()), text)
    return _SESSION_ID.sub("***", _SECRET_PARAM.sub(r"\1***", text))


# Every pattern above needs one of these: a text without them is clean as it is (most log
# arguments: Ids, counts, object names), and the regular expressions are skipped.
_MARKS = frozenset("=!%@")


# A URL's query parameter that holds a password: libpq's sslpassword (a client key's).
_PASSWORD_PARAM = re.compile(r"((?:^|[?&])[^=&]*password=)[^&#]*", re.I)


def without_password(url: str) -> str:
    """A Redis or database URL as it may be shown: its password, and any query parameter
    named *password (libpq's sslpassword), as ***."""
    url = _PASSWORD_PARAM.sub(r"\1***", url)
    parts = urlsplit(url)
    try:
        password = parts.password
    except ValueError:  # not a URL one can read: say less rather than leak
        return url.rpartition("@")[2]
    if password is None:
        return url
    user = f"{parts.username}:***" if parts.username else ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc.rpartition('@')[2]}"))


def scrub_line(text: str) -> str:
    """`scrub`, and email addresses masked: what any log line may show."""
    if _MARKS.isdisjoint(text):
        return text
    text = scrub(text)
    return _EMAIL.sub("***@***", text) if "@" in text else text


def _scrub_arg(value: object) -> object:
    """A log argument without secrets, and visible-safe (after scrub, which decodes
    percent-encoded words): strings, and objects printed as their str(), such as httpx's URL in
    its "HTTP Request: POST <url>" line (replaced by the scrubbed text)."""
    if isinstance(value, str):
        return visible(scrub_line(value))
    if value is None or isinstance(value, int | float | bytes):
        return value
    text = str(value)
    clean = visible(scrub_line(text))
    return value if clean == text else clean


class RedactSecrets(logging.Filter):
    """Scrub tokens, session ids and emails from every log line (uvicorn's access log and ours),
    and escape what could forge a line or rewrite a terminal in what the line quotes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.args and isinstance(record.msg, str):
            # already the whole line (else a format string)
            record.msg = visible(scrub_line(record.msg))
        elif isinstance(record.args, tuple):
            record.args = tuple(_scrub_arg(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _scrub_arg(v) for k, v in record.args.items()}
        return True


_REDACT = RedactSecrets()


def redact_logs() -> None:
    """Put the filter on every handler that can print a request line: the root logger's (ours
    propagate there) and uvicorn's, and on uvicorn's access logger should its handlers change."""
    names = ("", "uvicorn", "uvicorn.error", "uvicorn.access")
    loggers = [logging.getLogger(name) for name in names]
    targets: list[logging.Filterer] = [loggers[-1], *(h for lg in loggers for h in lg.handlers)]
    for target in targets:
        if not any(isinstance(f, RedactSecrets) for f in target.filters):
            target.addFilter(_REDACT)


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a log call: structured fields of the line (JSON keys; text shows `msg`)."""
    return {"sfrelay_fields": values}


_BASE_KEYS = ("ts", "level", "logger", "msg")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the line's fields (scrubbed)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": scrub_line(record.getMessage()),
        }
        extra = getattr(record, "sfrelay_fields", None)
        if isinstance(extra, dict):
            for key, value in extra.items():
                if key not in _BASE_KEYS:
                    line[key] = scrub_line(value) if isinstance(value, str) else value
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            client, method, path, _version, status = args
            line.update(client=client, method=method, path=scrub_line(str(path)))
            line["status"] = status
        if record.exc_info:
            line["exc"] = scrub_line(self.formatException(record.exc_info))
        return visible_json(orjson.dumps(line, default=str).decode())


def uvicorn_config(fmt: LogFormat) -> dict[str, Any]:
    """The dictConfig of a receiver process (uvicorn applies it in each of its workers)."""
    json_formatter = {"()": "app.logs.JsonFormatter"}
    formatters: dict[str, Any] = {
        "sfrelay": json_formatter if fmt == "json" else {"format": TEXT_FORMAT},
        "uvicorn_default": json_formatter
        if fmt == "json"
        else {
            "()": "uvicorn.logging.DefaultFormatter",
            "fmt": UVICORN_DEFAULT_FORMAT,
            "use_colors": None,
        },
        "uvicorn_access": json_formatter
        if fmt == "json"
        else {"()": "uvicorn.logging.AccessFormatter", "fmt": UVICORN_ACCESS_FORMAT},
    }

    def handler(formatter: str, stream: str) -> dict[str, Any]:
        return {
            "()": "app.logs.StandardStream",
            "formatter": formatter,
            "filters": ["redact"],
            "to": stream,
        }

    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": "app.logs.RedactSecrets"}},
        "formatters": formatters,
        "handlers": {
            "sfrelay": handler("sfrelay", "stderr"),
            "uvicorn_default": handler("uvicorn_default", "stderr"),
            "uvicorn_access": handler("uvicorn_access", "stdout"),
        },
        "loggers": {
            "uvicorn": {"handlers": ["uvicorn_default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {
                "handlers": ["uvicorn_access"],
                "level": "INFO",
                "propagate": False,
            },
        },
        "root": {"handlers": ["sfrelay"], "level": "INFO"},
    }


class StandardStream(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to sys.stderr or sys.stdout as they are when a line is written."""

    def __init__(self, to: str = "stderr") -> None:
        self._to = to
        super().__init__()
        self.sfrelay = True  # installed by configure(): configure() may replace it

    @property
    def stream(self) -> Any:
        return getattr(sys, self._to)

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure(fmt: LogFormat = "text") -> None:
    """The root logger of any sfrelay command: the format asked for, every line scrubbed.

    uvicorn's loggers are set by `uvicorn_config` in each of its processes. A root logger that
    already has handlers of another's (an application embedding sfrelay, pytest) is left alone.
    """
    root = logging.getLogger()
    if any(not getattr(h, "sfrelay", False) for h in root.handlers):
        return
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = StandardStream("stderr")
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(_REDACT)
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def configure_default() -> None:
    """Before the settings are read (or when they are invalid): text on standard error."""
    configure("text")
