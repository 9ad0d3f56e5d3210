"""Which login flow the settings ask for, and the login itself (simple-salesforce, unpatched)."""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jwt
import requests
from simple_salesforce.exceptions import SalesforceAuthenticationFailed
from simple_salesforce.login import SalesforceLogin

from app.config import Settings
from app.errors import ConfigError, SalesforceLoginFailed, SalesforceUnavailable

_FLOWS_HELP = (
    "set SFRELAY_SF_PRIVATE_KEY_FILE + SFRELAY_SF_CONSUMER_KEY + SFRELAY_SF_USERNAME (JWT "
    "bearer, recommended), or SFRELAY_SF_CONSUMER_KEY + SFRELAY_SF_CONSUMER_SECRET (client "
    "credentials), or SFRELAY_SF_USERNAME + SFRELAY_SF_PASSWORD (OAuth password flow with the "
    "consumer key/secret, else SOAP login with SFRELAY_SF_SECURITY_TOKEN)"
)


# Salesforce's SOAP login() exists up to API 64.0 (help article 005132110).
SOAP_LOGIN_LAST_VERSION = 64.0
# What to do about an API version Salesforce has retired (REST 410 GONE, SOAP
# UNSUPPORTED_API_VERSION): versions are retired after 3 years at least.
RETIRED_VERSION_HINT = (
    "set SFRELAY_SF_API_VERSION to a version the org serves "
    f"({Settings.model_fields['sf_api_version'].default}, sfrelay's default, or later)"
)


class AuthFlow(enum.StrEnum):
    JWT_BEARER = "jwt-bearer"
    CLIENT_CREDENTIALS = "client-credentials"
    OAUTH_PASSWORD = "oauth-password"  # noqa: S105 (a flow name)
    SOAP_LOGIN = "soap-login"


@dataclass(frozen=True, slots=True, repr=False)
class Credentials:
    """What one login needs; repr=False: it holds secrets and must never reach a log."""

    flow: AuthFlow
    domain: str
    api_version: str
    username: str | None = None
    password: str | None = None  # OAuth password flow: password + security token
    security_token: str | None = None
    consumer_key: str | None = None
    consumer_secret: str | None = None
    private_key_file: Path | None = None


def _secret(value: object) -> str | None:
    text = value.get_secret_value() if hasattr(value, "get_secret_value") else value
    return text if isinstance(text, str) and text else None


def salesforce_configured(settings: Settings) -> bool:
    """Whether any Salesforce credential is set (otherwise sfrelay works from push alone)."""
    return any(
        (
            settings.sf_username,
            settings.sf_consumer_key,
            settings.sf_private_key_file,
            _secret(settings.sf_password),
            _secret(settings.sf_consumer_secret),
        )
    )


def credentials(settings: Settings) -> Credentials:
    """The login the settings describe; ConfigError names what is missing."""
    username = settings.sf_username
    password = _secret(settings.sf_password)
    token = _secret(settings.sf_security_token)
    key = settings.sf_consumer_key
    secret = _secret(settings.sf_consumer_secret)
    domain, version = settings.sf_domain, settings.sf_api_version
    if settings.sf_private_key_file is not None:
        missing = [
            name
            for name, value in (("SFRELAY_SF_CONSUMER_KEY", key), ("SFRELAY_SF_USERNAME", username))
            if not value
        ]
        if missing:
            raise ConfigError(
                f"Salesforce JWT bearer login (SFRELAY_SF_PRIVATE_KEY_FILE is set) also needs "
                f"{' and '.join(missing)}: the Connected App's consumer key and the integration "
                "user's username"
            )
        return Credentials(
            AuthFlow.JWT_BEARER,
            domain,
            version,
            username=username,
            consumer_key=key,
            private_key_file=settings.sf_private_key_file,
        )
    if key and secret and not username:
        if domain in ("login", "test"):
            raise ConfigError(
                "Salesforce client credentials login needs your My Domain: set "
                "SFRELAY_SF_DOMAIN to it (e.g. acme.my, or acme--uat.sandbox.my for a sandbox); "
                "login.salesforce.com and test.salesforce.com do not issue such tokens"
            )
        return Credentials(
            AuthFlow.CLIENT_CREDENTIALS, domain, version, consumer_key=key, consumer_secret=secret
        )
    if username and password:
        if key and secret:
            # The OAuth password flow takes the security token appended to the password.
            return Credentials(
                AuthFlow.OAUTH_PASSWORD,
                domain,
                version,
                username=username,
                password=password + (token or ""),
                consumer_key=key,
                consumer_secret=secret,
            )
        if float(version) >= SOAP_LOGIN_LAST_VERSION + 1:
            raise ConfigError(
                f"SOAP login() does not exist in API {version} (Salesforce removed it from 65.0 "
                "and retires it in Summer '27): set SFRELAY_SF_CONSUMER_KEY/SECRET for the OAuth "
                "password flow, or better SFRELAY_SF_PRIVATE_KEY_FILE for JWT bearer"
            )
        return Credentials(
            AuthFlow.SOAP_LOGIN,
            domain,
            version,
            username=username,
            password=password,
            security_token=token or "",
        )
    raise ConfigError(f"the Salesforce settings are incomplete: {_FLOWS_HELP}")


def login(creds: Credentials, session: requests.Session) -> tuple[str, str]:
    """(session id, instance host) from a fresh login; never logs or returns a secret in text."""
    domain = creds.domain
    if creds.flow is AuthFlow.JWT_BEARER:
        assert creds.private_key_file is not None
        if not creds.private_key_file.is_file():
            raise ConfigError(
                f"SFRELAY_SF_PRIVATE_KEY_FILE: no file at {creds.private_key_file} (the PEM "
                "private key whose certificate is uploaded to the Connected App)"
            )
        call = partial(
            SalesforceLogin,
            username=creds.username,
            consumer_key=creds.consumer_key,
            privatekey_file=str(creds.private_key_file),
        )
        if domain.lower() not in ("login", "test"):
            # The JWT's audience is login or test.salesforce.com only (a My Domain is refused
            # there); the token is still asked of the My Domain.
            call = partial(call, instance_url=domain)
            domain = "test" if _sandbox(domain) else "login"
    elif creds.flow is AuthFlow.CLIENT_CREDENTIALS:
        call = partial(
            SalesforceLogin, consumer_key=creds.consumer_key, consumer_secret=creds.consumer_secret
        )
    elif creds.flow is AuthFlow.OAUTH_PASSWORD:
        call = partial(
            SalesforceLogin,
            username=creds.username,
            password=creds.password,
            consumer_key=creds.consumer_key,
            consumer_secret=creds.consumer_secret,
        )
    else:
        call = partial(
            SalesforceLogin,
            username=creds.username,
            password=creds.password,
            security_token=creds.security_token,
            sf_version=creds.api_version,
        )
    try:
        # simple-salesforce also warns "user hasn't approved this consumer" with a URL for
        # interactive consent; the error below says what an integration user needs instead.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            session_id, instance = call(session=session, domain=domain)
    except SalesforceAuthenticationFailed as exc:
        code = exc.code
        if isinstance(code, int) and code >= 500:
            raise SalesforceUnavailable(
                f"Salesforce login ({creds.flow}) failed with HTTP {code}: try again later",
                str(code),
            ) from None
        hint = RETIRED_VERSION_HINT if code == "UNSUPPORTED_API_VERSION" else None
        raise SalesforceLoginFailed(
            f"Salesforce refused the login ({creds.flow} at {creds.domain}.salesforce.com): "
            f"{code}: {exc.auth_message.strip()[:300]}; {hint or _login_hint(creds.flow)}",
            None if code is None else str(code),
        ) from None
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        raise ConfigError(
            f"SFRELAY_SF_PRIVATE_KEY_FILE {creds.private_key_file} cannot sign the JWT "
            f"({type(exc).__name__}): it must be the RSA private key in PEM form"
        ) from None
    except requests.RequestException as exc:
        raise SalesforceUnavailable(
            f"cannot reach {creds.domain}.salesforce.com to log in: {type(exc).__name__}; "
            "check the network and SFRELAY_SF_DOMAIN",
        ) from None
    if not session_id or not instance:
        raise SalesforceLoginFailed(f"Salesforce login ({creds.flow}) returned no session")
    return str(session_id), str(instance)


def _sandbox(my_domain: str) -> bool:
    """A sandbox's or scratch org's My Domain (acme--uat.sandbox.my, acme--uat.my before
    enhanced domains, x.scratch.my), whose JWT audience is test.salesforce.com."""
    name = my_domain.lower()
    return "--" in name or any(f".{part}." in f".{name}." for part in ("sandbox", "scratch"))


def _login_hint(flow: AuthFlow) -> str:
    if flow is AuthFlow.JWT_BEARER:
        return (
            "check SFRELAY_SF_CONSUMER_KEY, SFRELAY_SF_USERNAME, that the certificate of "
            "SFRELAY_SF_PRIVATE_KEY_FILE is the Connected App's, and that the user is "
            "pre-authorized (Admin approved users + the user's profile or permission set)"
        )
    if flow is AuthFlow.CLIENT_CREDENTIALS:
        return (
            "check SFRELAY_SF_CONSUMER_KEY/SECRET and that the Connected App enables the "
            "client credentials flow with a Run As user"
        )
    if flow is AuthFlow.OAUTH_PASSWORD:
        return (
            "check SFRELAY_SF_USERNAME, SFRELAY_SF_PASSWORD, SFRELAY_SF_SECURITY_TOKEN and the "
            "Connected App's consumer key/secret"
        )
    return "check SFRELAY_SF_USERNAME, SFRELAY_SF_PASSWORD and SFRELAY_SF_SECURITY_TOKEN"
