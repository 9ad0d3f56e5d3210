"""The exception tree of sfrelay; each transport maps it in one place.

SfrelayError
├── ConfigError               settings or mapping files are wrong: fix them and restart
├── RejectedMessage           the receiver refuses a request (SOAP Fault, nothing stored)
│   ├── BodyTooLarge          413
│   ├── UnsupportedMediaType  415
│   ├── NotAllowed            403: client address outside SFRELAY_ALLOWED_NETWORKS
│   ├── BadToken              401: ?token= missing, wrong or given more than once
│   ├── RequestTimeout        408: the body did not arrive within SFRELAY_READ_TIMEOUT_SECONDS
│   ├── MalformedMessage      400: not XML, DOCTYPE, wrong envelope or operation, > 100
│   └── UnknownOrganization   403: OrganizationId not in SFRELAY_ORG_IDS
├── RetryableError            transient: try again later (Redis down, database locked)
│   └── QueueUnavailable      503: Redis did not confirm the write, nothing was acked
└── PermanentError            retrying cannot help: the record goes to the dead letters
"""

from __future__ import annotations


class SfrelayError(Exception):
    """Base of every error sfrelay raises on purpose."""


class ConfigError(SfrelayError):
    """A setting or a mapping file is wrong; the message says what to change."""


class RejectedMessage(SfrelayError):
    """The receiver refuses the request; the SOAP Fault carries `faultstring`."""

    status_code = 400
    faultcode = "soapenv:Client"

    def __init__(self, faultstring: str) -> None:
        super().__init__(faultstring)
        self.faultstring = faultstring


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


class RetryableError(SfrelayError):
    """Transient: the same work will succeed later."""


class QueueUnavailable(RetryableError):
    """Redis did not confirm the write; the message must not be acked."""


class PermanentError(SfrelayError):
    """Retrying cannot help; the work goes to the dead letters with this reason."""
