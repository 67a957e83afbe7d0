#!/usr/bin/env python3
"""Generate SigV4 test vectors for granary's node/src/auth/sigv4.rs with real botocore.

Two kinds of vectors:
  * `client:*` — a real botocore `codeartifact` client (rest-json serializer, real
    query/path encoding) with the clock frozen and the HTTP send intercepted
    (`before-send`), so what is captured is exactly what would go on the wire.
  * `raw:*` — `botocore.auth.SigV4Auth` / `SigV4QueryAuth` applied to a hand-made
    `botocore.awsrequest.AWSRequest`, for path/query/header shapes the CodeArtifact
    model never produces (percent-encoded path labels, dot segments, repeated keys,
    duplicated headers, presigned URLs).

Prints Rust source (a `VECTORS` array) on stdout.
"""
import datetime
import logging
import hashlib
from unittest import mock
from urllib.parse import urlsplit

import botocore
import botocore.session
from botocore.auth import SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest, AWSResponse
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.utils import percent_encode_sequence

ENDPOINT = "http://localhost:8080"
HOST = "localhost:8080"
SIGNED_SKIP = {"user-agent", "amz-sdk-invocation-id", "amz-sdk-request", "content-length"}


def rs(s):
    """Rust string literal."""
    out = []
    for ch in s:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif 0x20 <= ord(ch) < 0x7F:
            out.append(ch)
        else:
            out.append("\\u{%x}" % ord(ch))
    return '"' + "".join(out) + '"'


def to_str(v):
    return v.decode("latin-1") if isinstance(v, bytes) else str(v)


VECTORS = []


class _Canonical(logging.Handler):
    """Collects the canonical requests botocore logs while signing."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seen = []

    def emit(self, record):
        if record.msg.startswith("CanonicalRequest:"):
            self.seen.append(record.args[0] if isinstance(record.args, tuple) else record.args)


CANONICAL = _Canonical()
_auth_logger = logging.getLogger("botocore.auth")
_auth_logger.setLevel(logging.DEBUG)
_auth_logger.addHandler(CANONICAL)
_auth_logger.propagate = False


def record(name, ak, sk, region, ts, method, url, headers, body):
    parts = urlsplit(url)
    hdrs = [("host", HOST)]
    for k, v in headers.items():  # every (name, value) pair, repeats included, in order
        if k.lower() in SIGNED_SKIP:
            continue
        hdrs.append((k.lower(), to_str(v)))
    if isinstance(body, str):
        body = body.encode()
    canonical = CANONICAL.seen.pop()
    assert not CANONICAL.seen
    VECTORS.append(
        dict(
            name=name, ak=ak, sk=sk, region=region, now=ts, method=method,
            path=parts.path, query=parts.query, headers=hdrs,
            body=(body or b"").decode("utf-8"), canonical=canonical,
        )
    )


def frozen(ts):
    dt = datetime.datetime.strptime(ts, "%Y%m%dT%H%M%SZ")
    return mock.patch("botocore.auth.get_current_datetime", return_value=dt)


def client_vector(name, op, kwargs, ts, ak="AKIDEXAMPLE",
                  sk="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", region="us-east-1", token=None):
    captured = []

    def before_send(request, **kw):
        captured.append(request)
        return AWSResponse(request.url, 200, {}, None)

    s = botocore.session.get_session()
    c = s.create_client(
        "codeartifact", region_name=region, endpoint_url=ENDPOINT,
        aws_access_key_id=ak, aws_secret_access_key=sk, aws_session_token=token,
        config=Config(retries={"max_attempts": 0}, parameter_validation=False),
    )
    c.meta.events.register("before-send", before_send)
    with frozen(ts):
        try:
            getattr(c, op)(**kwargs)
        except Exception:
            pass  # the fake response does not parse; the request is what we want
    (r,) = captured
    record("client:" + name, ak, sk, region, ts, r.method, r.url, r.headers, r.body)


def raw_vector(name, method, path, query_pairs=None, raw_query=None, headers=(), body=b"",
               ts="20261125T120000Z", ak="AKIDEXAMPLE", sk="raw-secret", region="us-east-1",
               presign_expires=None):
    url = ENDPOINT + path
    if query_pairs is not None:
        url += "?" + percent_encode_sequence(query_pairs)
    elif raw_query is not None:
        url += "?" + raw_query
    req = AWSRequest(method=method, url=url, data=body)
    for k, v in headers:
        req.headers[k] = v  # HTTPHeaders appends: repeated names give repeated headers
    creds = Credentials(ak, sk)
    with frozen(ts):
        if presign_expires is None:
            SigV4Auth(creds, "codeartifact", region).add_auth(req)
        else:
            SigV4QueryAuth(creds, "codeartifact", region, expires=presign_expires).add_auth(req)
    record("raw:" + name, ak, sk, region, ts, method, req.url, req.headers, body)


# --- real client calls -------------------------------------------------------------------
client_vector("CreateDomain", "create_domain", {"domain": "my-domain"}, "20261125T120000Z")
client_vector("GetRepositoryEndpoint", "get_repository_endpoint",
              {"domain": "d", "repository": "r", "format": "npm"}, "20261125T235959Z")
client_vector("DeleteDomain", "delete_domain", {"domain": "my-domain", "domainOwner": "111122223333"},
              "20260101T000000Z", region="eu-west-2")
client_vector("PutDomainPermissionsPolicy", "put_domain_permissions_policy",
              {"domain": "my-domain",
               "policyDocument": '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":"codeartifact:*"}]}'},
              "20261125T120000Z")
client_vector("ListPackages-encoded-query", "list_packages",
              {"domain": "my-domain", "repository": "my repo", "format": "npm",
               "namespace": "@sc ope", "packagePrefix": "a/b=c%2f~+&é"}, "20261125T120000Z")
client_vector("GetAuthorizationToken-session-token", "get_authorization_token",
              {"domain": "my-domain", "domainOwner": "111122223333", "durationSeconds": 3600},
              "20261125T120000Z", ak="ASIAEXAMPLE", token="FwoGZXIvYXdzEXAMPLE//token+with/slashes=")
client_vector("PublishPackageVersion-body", "publish_package_version",
              {"domain": "my-domain", "repository": "my-repo", "format": "generic",
               "namespace": "ns", "package": "pkg", "packageVersion": "1.0.0",
               "assetName": "hello.txt", "assetContent": b"hello world\n",
               "assetSHA256": hashlib.sha256(b"hello world\n").hexdigest(), "unfinished": True},
              "20261125T120000Z")

# --- hand-made requests through SigV4Auth ------------------------------------------------
raw_vector("path-percent-encoded-labels", "GET", "/v1/package/%40scope%2Fname/a%20b~c%3A1",
           query_pairs=[("domain", "d")])
raw_vector("path-dot-segments-and-double-slash", "GET", "/v1//a/./b/../c/", query_pairs=[])
raw_vector("query-repeated-unsorted-empty", "GET", "/v1/x",
           raw_query="b=2&a=3&a=1&c=&d&A=z&a%20b=%2Fx%3D%40")
raw_vector("headers-spaces-and-duplicates", "POST", "/v1/x", query_pairs=[("domain", "d")],
           headers=[("Content-Type", "application/json"), ("X-Custom", "  a   b\tc  "),
                    ("X-Multi", "one"), ("X-Multi", " two ")],
           body=b'{"a": "b",  "c": [1, 2]}')
raw_vector("presigned-get", "GET", "/v1/repository/endpoint",
           query_pairs=[("domain", "d"), ("repository", "r"), ("format", "npm")],
           presign_expires=900)

# --- output -------------------------------------------------------------------------------
print(f"// Generated by scripts/gen_sigv4_vectors.py with botocore {botocore.__version__}; do not edit by hand.")
print("const VECTORS: &[Vector] = &[")
for v in VECTORS:
    print("    Vector {")
    print(f"        name: {rs(v['name'])},")
    print(f"        access_key: {rs(v['ak'])},")
    print(f"        secret: {rs(v['sk'])},")
    print(f"        region: {rs(v['region'])},")
    print(f"        now: {rs(v['now'])},")
    print(f"        method: {rs(v['method'])},")
    print(f"        path: {rs(v['path'])},")
    print(f"        query: {rs(v['query'])},")
    print("        headers: &[")
    for k, val in v["headers"]:
        print(f"            ({rs(k)}, {rs(val)}),")
    print("        ],")
    print(f"        body: {rs(v['body'])},")
    print(f"        canonical: {rs(v['canonical'])},")
    print("    },")
print("];")
