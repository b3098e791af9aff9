"""Masking of secrets for display: `/status`, log lines, error texts.

One place decides what a secret looks like, so the settings view, the log filter and
anything else that shows text to an operator mask the same things:

- the userinfo of a URL, whole: ``redis://user:pw@host`` and ``redis://:pw@host`` become
  ``redis://***@host`` (a user name alone may be a token too: ``https://TOKEN@host``);
- query parameters whose name says secret (password, passwd, pwd, token, secret, key,
  auth, api_key, ..., any case): ``?password=x`` becomes ``?password=***``;
- in free text (`mask_text`, for log lines): ``password=x``, ``'token': 'x'`` and
  ``Bearer x`` forms;
- in nested data (`redact`): the value of every key whose name says secret, at any depth
  (``None`` stays ``None``: "not set" is not a secret), and every string as above.

No imports from the rest of lmcache: every layer (storage, server, http, logs) may use it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

# A name that says "secret": dict keys, query parameters, ``name=value`` in text.
# ``token(?!s)``: "tokens" counts things (``max_tokens``), it does not hold a token.
_SECRET_NAME = re.compile(
    r"pass(?:word|wd)|pwd|secret|token(?!s)|credential|api_?key|access_?key|private_?key",
    re.IGNORECASE,
)
# Query parameters also count when named exactly like these.
_SECRET_PARAM = re.compile(r"key|auth|sig|signature", re.IGNORECASE)

# scheme://userinfo@ : userinfo runs to the last "@" before the host's end (RFC 3986).
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]{0,31}://)[^/?#\s\"'<>`]*@")
# ?name=value or &name=value (also ;name=value), value up to the next separator.
_QUERY_PARAM = re.compile(r"([?&;])([^=&#;?\s\"'<>`]+)=([^&#;\s\"'<>`]*)")
# name=value, name: value, 'name': 'value', "name"="value" in free text.
_TEXT_PAIR = re.compile(
    r"(?<![\w.\-])([A-Za-z_][\w.\-]*)([\"']?\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s\"'&,;)}\]]+)"
)
_BEARER = re.compile(r"\b(Bearer|Basic)(\s+)[A-Za-z0-9._~+/=\-]+", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """Whether a key or parameter named `name` holds a secret (``admin_token``, ``password``)."""
    return _SECRET_NAME.search(name) is not None


def _secret_param(name: str) -> bool:
    return is_secret_name(name) or _SECRET_PARAM.fullmatch(name) is not None


def _mask_param(match: re.Match[str]) -> str:
    sep, name, value = match.groups()
    if not value or not _secret_param(name):
        return match.group(0)
    return f"{sep}{name}={MASK}"


def mask_url(text: str) -> str:
    """`text` with the credentials of every URL in it masked (userinfo, secret parameters).

    Works on a bare URL and on any text that contains URLs; text without URLs or
    secret parameters comes back unchanged.
    """
    if "@" in text and "://" in text:
        text = _USERINFO.sub(rf"\1{MASK}@", text)
    if "=" in text:
        text = _QUERY_PARAM.sub(_mask_param, text)
    return text


def _mask_pair(match: re.Match[str]) -> str:
    name, sep, value = match.groups()
    if not is_secret_name(name) or value.strip("\"'").startswith(MASK):
        return match.group(0)
    quote = value[0] if value[0] in "\"'" else ""
    return f"{name}{sep}{quote}{MASK}{quote}"


def mask_text(text: str) -> str:
    """`mask_url`, plus ``password=x`` / ``'token': 'x'`` pairs and ``Bearer x`` in free text."""
    text = mask_url(text)
    if "=" in text or ":" in text:
        text = _TEXT_PAIR.sub(_mask_pair, text)
    return _BEARER.sub(rf"\1\2{MASK}", text)


def _secret_value(value: Any) -> Any:
    if value is None:
        return None
    return MASK


def redact(value: Any) -> Any:
    """A copy of `value` (dicts, lists, tuples, strings, ...) fit for display.

    Values of secret-named keys become ``"***"`` at any depth (``None`` stays ``None``);
    strings are passed through `mask_url`; objects with ``get_secret_value`` (pydantic's
    ``SecretStr``) become ``"***"``; everything else is returned as it is.
    """
    if isinstance(value, Mapping):
        return {
            k: _secret_value(v) if isinstance(k, str) and is_secret_name(k) else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return mask_url(value)
    if hasattr(value, "get_secret_value"):
        return MASK
    return value
