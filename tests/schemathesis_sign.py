"""schemathesis hook module: signs every request the way order-service and
shipping-service sign their calls to each other (resilience::signing, v1),
so the signed pass of tests/schemathesis.sh fuzzes the service-to-service
routes (POST /shipments, the shipment-events callback, the feeds) past their
401. Loaded with SCHEMATHESIS_HOOKS=schemathesis_sign (PYTHONPATH=tests/);
the secret is $SERVICE_SECRET.

The signature is computed on the prepared request (final method, path and
query, headers and body bytes), just before it is sent.
"""

import hashlib
import hmac
import os
import secrets
import time

import requests

_SECRET = os.environ["SERVICE_SECRET"].encode()
_SIGNED_HEADERS = ("idempotency-key", "x-client-id")
_send = requests.Session.send


def _header(prepared, name):
    for k, v in prepared.headers.items():
        if k.lower() == name:
            return v if isinstance(v, str) else v.decode("latin-1")
    return ""


def _sign(prepared):
    body = prepared.body or b""
    if isinstance(body, str):
        body = body.encode("utf-8")
    ts = str(int(time.time()))
    nonce = secrets.token_hex(16)
    lines = ["v1", prepared.method, prepared.path_url, ts, nonce]
    lines += [f"{h}:{_header(prepared, h)}" for h in _SIGNED_HEADERS]
    lines.append(hashlib.sha256(body).hexdigest())
    canonical = "\n".join(lines).encode("latin-1")
    sig = hmac.new(_SECRET, canonical, hashlib.sha256).hexdigest()
    prepared.headers["x-service-timestamp"] = ts
    prepared.headers["x-service-nonce"] = nonce
    prepared.headers["x-service-signature"] = f"v1={sig}"


def _signed_send(self, request, **kwargs):
    try:
        _sign(request)
    except (UnicodeError, ValueError):
        pass  # a header that cannot be encoded: the request goes unsigned
    return _send(self, request, **kwargs)


requests.Session.send = _signed_send
