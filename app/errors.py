"""The exception tree of sfrelay; each transport maps it in one place.

SfrelayError
├── ConfigError               settings or mapping files are wrong: fix them and restart
│   ├── SiteChanged               the Drupal site no longer has what the field map writes (a
│   │                             field deleted while a worker ran): the worker stops, jobs wait
│   ├── SalesforceLoginFailed     Salesforce refused the credentials or the Connected App
│   └── SalesforceQueryRefused    MALFORMED_QUERY / INVALID_FIELD: names the object and field;
│                                 an object the user may not read; a retired API version (410)
├── RejectedMessage           the receiver refuses a request (SOAP Fault, nothing stored)
│   ├── BodyTooLarge          413
│   ├── UnsupportedMediaType  415
│   ├── NotAllowed            403: client address outside SFRELAY_ALLOWED_NETWORKS
│   ├── BadToken              401: ?token= missing, wrong or given more than once
│   ├── RequestTimeout        408: the body did not arrive within SFRELAY_READ_TIMEOUT_SECONDS
│   ├── MalformedMessage      400: not XML, DOCTYPE, wrong envelope or operation, > 100
│   └── UnknownOrganization   403: OrganizationId not in SFRELAY_ORG_IDS
├── ProcessFailed             `sfrelay up`: a process it started did not come up (see its output)
├── RetryableError            transient: try again later (Redis down, database locked)
│   ├── QueueUnavailable      503: Redis did not confirm the write, nothing was acked
│   │   ├── AckNotDurable     503: Redis cannot honour SFRELAY_ACK_DURABILITY (log says why)
│   │   └── NotConfirmed      503: no fsync / replica confirmed the write in time
│   ├── SalesforceUnavailable network error, timeout, 5xx: the next run tries again
│   └── ApiLimitReached       REQUEST_LIMIT_EXCEEDED, or fewer daily API requests left than
│                             SFRELAY_SF_MIN_API_REMAINING: polling waits for the next run
└── PermanentError            retrying cannot help: the record goes to the dead letters
    ├── RecordError           this notification cannot be applied as it is (no Id, bad date)
    └── SalesforceRequestRefused  any other refusal by the Salesforce API (error_code kept)

Every Salesforce error carries `error_code`: Salesforce's errorCode (INVALID_FIELD, ...) or None.
"""

from __future__ import annotations

import re

from app.visible import visible

# A faultstring is shown to Salesforce administrators as the delivery failure reason: short.
FAULTSTRING_MAX = 300
# The full detail goes to the log, bounded: a hostile body must not become a huge log line.
LOG_DETAIL_MAX = 2000
# One "word" (a tag name, an id) longer than this is cut inside a faultstring.
NAME_MAX = 60

_LONG_WORD = re.compile(rf"\S{{{NAME_MAX + 1},}}")


def clip(text: str, limit: int) -> str:
    """`text` on one line (control characters and bidi overrides escaped: app.visible), cut
    to `limit` characters with "…"."""
    text = visible(text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clip_words(text: str, limit: int = FAULTSTRING_MAX) -> str:
    """`clip`, with every word longer than NAME_MAX characters (a tag name, an id) cut too."""
    return clip(_LONG_WORD.sub(lambda m: m.group()[: NAME_MAX - 1] + "…", text), limit)


class SfrelayError(Exception):
    """Base of every error sfrelay raises on purpose."""


class ConfigError(SfrelayError):
    """A setting or a mapping file is wrong; the message says what to change."""


class SiteChanged(ConfigError):
    """The Drupal site changed under a running worker so that the field map no longer fits
    it (a mapped user field deleted in Drupal): every record would fail alike. The worker
    stops and leaves its jobs queued; a restart refuses the field map until it fits again."""

    @classmethod
    def of(cls, refusal: ConfigError) -> SiteChanged:
        """From what Syncer.open would now refuse the field map with."""
        return cls(
            f"the Drupal site changed while the worker ran: {refusal}; the worker stops and "
            "leaves its jobs queued"
        )


class RejectedMessage(SfrelayError):
    """The receiver refuses the request; the SOAP Fault carries `faultstring`."""

    status_code = 400
    faultcode = "soapenv:Client"

    def __init__(self, faultstring: str, detail: str | None = None) -> None:
        """`faultstring` is shown to the sender (clipped); `detail` only goes to the log."""
        super().__init__(faultstring)
        self.faultstring = clip_words(faultstring)
        self.detail = clip(detail, LOG_DETAIL_MAX) if detail is not None else self.faultstring


class BodyTooLarge(RejectedMessage):
    status_code = 413


class UnsupportedMediaType(RejectedMessage):
    status_code = 415


class NotAllowed(RejectedMessage):
    status_code = 403


class BadToken(RejectedMessage):
    status_code = 401


class RequestTimeout(RejectedMessage):
    status_code = 408


class MalformedMessage(RejectedMessage):
    status_code = 400


class UnknownOrganization(RejectedMessage):
    status_code = 403


class ProcessFailed(SfrelayError):
    """A process `sfrelay up` started exited or did not listen in time."""


class RetryableError(SfrelayError):
    """Transient: the same work will succeed later."""


class QueueUnavailable(RetryableError):
    """Redis did not confirm the write; the message must not be acked.

    `str(exc)` (with its cause) goes to the log only: it names addresses and script hashes.
    """

    faultstring = "temporarily unavailable: the queue (Redis) did not confirm the write"


class AckNotDurable(QueueUnavailable):
    """Redis answers but cannot keep an ack's promise (SFRELAY_ACK_DURABILITY): not acked."""

    faultstring = (
        "temporarily unavailable: the receiver's queue cannot store notifications durably "
        "(SFRELAY_ACK_DURABILITY); its operator must fix Redis"
    )


class NotConfirmed(QueueUnavailable):
    """The write landed but its fsync or replica did not confirm it in time: not acked (the
    retry finds its notifications seen, and its own wait covers this write too)."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"the queue (Redis) did not confirm the write: {problem}")
        self.faultstring = f"temporarily unavailable: {self}"  # sfrelay's own words only


class PermanentError(SfrelayError):
    """Retrying cannot help; the work goes to the dead letters with this reason."""


class _SalesforceError(SfrelayError):
    """Mixed into the Salesforce errors: Salesforce's own errorCode travels with the message."""

    def __init__(self, message: str, error_code: str | None = None) -> None:
        super().__init__(message)
        self.error_code = error_code


class SalesforceLoginFailed(_SalesforceError, ConfigError):
    """Salesforce refused the login: the message says which setting to check."""


class SalesforceQueryRefused(_SalesforceError, ConfigError):
    """A query Salesforce refuses as written: usually a mapped field the org lacks, or an
    object the integration user may not read; also a retired API version (410 GONE)."""

    def __init__(
        self,
        message: str,
        error_code: str | None = None,
        sobject: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message, error_code)
        self.sobject = sobject
        self.field = field


class SalesforceUnavailable(_SalesforceError, RetryableError):
    """Salesforce could not be reached or failed (network, timeout, 5xx)."""


class ApiLimitReached(_SalesforceError, RetryableError):
    """The org's daily API requests are (nearly) used up; polling resumes on a later run."""


class SalesforceRequestRefused(_SalesforceError, PermanentError):
    """The Salesforce API refused a request for a reason retrying cannot fix."""


class RecordError(PermanentError):
    """One notification cannot be applied as it is: the sync's `failed` outcome."""
