"""Secrets never leave in what a stage writes or logs: `redact` hides credentials in URLs, query
strings and secret-named keys."""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
# Name segments (split on _ - . and camelCase) that mark a secret: `api_key`, `accessToken`,
# `WANDB_API_KEY`, but not plain words that merely contain one, like `tokenizer`.
_SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "pwd",
                 "credential", "credentials", "auth", "signature", "sig", "sas"}
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):"
                           r"(?P<secret>[^@/\s]+)@")
_QUERY_PARAM = re.compile(r"(?P<name>[?&;][^=&;#\s]+)=(?P<value>[^&;#\s]*)")


def is_secret_name(name: str) -> bool:
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower()
    return any(w in _SECRET_WORDS for w in re.split(r"[^a-z0-9]+", words))


def redact(value: Any) -> Any:
    """A copy of `value` safe to log or write beside artifacts: values under secret-looking keys
    (at any depth) become "***", and so do passwords inside URLs (`s3://user:pw@host`) and
    secret-looking query parameters (`...?token=...`, `X-Amz-Signature=...`)."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_name(k) and v not in (None, "") else redact(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        value = _URL_USERINFO.sub(rf"\g<scheme>\g<user>:{REDACTED}@", value)
        return _QUERY_PARAM.sub(
            lambda m: f"{m['name']}={REDACTED}" if is_secret_name(m["name"][1:]) else m[0],
            value)
    return value
