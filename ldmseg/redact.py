"""Secrets out of what is printed, logged and stored: URIs with credentials, and configs holding them."""

from __future__ import annotations

from typing import Any

from ldmseg.typed import to_dict


_SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "token", "secret", "key", "signature", "credential")


def redact_uri(uri: str | None) -> str | None:
    """``uri`` with its credentials masked: ``https://user:pw@host/x?token=t`` → ``https://***@host/x?token=***``.

    Tracking and storage URIs may embed credentials; anything printed, logged as a parameter or
    stored in a model folder goes through this first.
    """
    if not uri or "://" not in uri:
        return uri
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if any(w in k.lower() for w in _SECRET_QUERY_KEYS) else v) for k, v in pairs],
                          safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return uri  # nothing secret (and urlunsplit would rewrite ``sqlite:///x`` as ``sqlite:/x``)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def public_dict(cfg: Any) -> dict:
    """:func:`to_dict` of a :class:`Config` with secrets redacted: what gets printed, logged and stored."""
    d = to_dict(cfg)
    if isinstance(d.get("tracking"), dict):
        d["tracking"]["tracking_uri"] = redact_uri(d["tracking"].get("tracking_uri"))
    return d
