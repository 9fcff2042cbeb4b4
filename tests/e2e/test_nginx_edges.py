"""What nginx answers itself, and bodies sent in chunks, through nginx.conf and uWSGI."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import uuid

import pytest

from devtools.stack import PASSWORD


class Raw:
    """A reply read from a raw socket: status, headers (lowercased names), body."""

    def __init__(self, data: bytes) -> None:
        head, _, self.body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip()] = value.strip()
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.body = _dechunk(self.body)

    def json(self):
        return json.loads(self.body)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def raw_request(stack, data: bytes, *, tls: bool = True) -> Raw:
    """Send bytes as they are (no client library between) to the HTTPS server's port, in
    TLS or not, and read the reply to its end."""
    port = stack.https_port
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    if tls:
        sock = stack.tls_context().wrap_socket(sock, server_hostname="127.0.0.1")
    with sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return Raw(b"".join(chunks))


def post_chunked(stack, path: str, body: bytes, chunk: int = 1000):
    connection = http.client.HTTPSConnection("127.0.0.1", stack.https_port, timeout=30, context=stack.tls_context())
    try:
        parts = (body[i : i + chunk] for i in range(0, len(body), chunk))
        connection.request("POST", path, body=parts, headers={"Content-Type": "application/json"}, encode_chunked=True)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


# -- Chunked bodies ------------------------------------------------------------------------


def test_a_chunked_body_is_read_through_nginx(stack):
    name = f"user{uuid.uuid4().hex[:10]}"
    body = json.dumps({"email": f"{name}@example.com", "username": name, "password": PASSWORD}).encode()
    status, answer = post_chunked(stack, "/auth/register", body, chunk=7)
    assert status == 201, answer
    assert answer["user"]["username"] == name


def test_a_chunked_body_over_64_kib_is_refused(stack):
    body = b'{"x": "' + b"a" * (64 * 1024) + b'"}'
    status, answer = post_chunked(stack, "/auth/login", body)
    assert status == 413 and answer["error_code"] == "PAYLOAD_TOO_LARGE", answer


# -- The errors nginx answers itself ----------------------------------------------------------

HOST = "Host: 127.0.0.1\r\n"


def assert_raw_envelope(reply: Raw, status: int, code: str) -> dict:
    from test_api_through_nginx import TIMESTAMP_RE, UUID_RE

    assert reply.status == status, (reply.status, reply.headers, reply.body[:300])
    assert reply.headers["Content-Type"].startswith("application/json"), reply.headers
    body = reply.json()
    assert body["error_code"] == code, body
    assert body["detail"]
    assert TIMESTAMP_RE.match(body["timestamp"]), body
    assert UUID_RE.match(body["request_id"]) and reply.headers["X-Request-ID"] == body["request_id"]
    return body


@pytest.mark.parametrize(
    "request_bytes,status,code",
    [
        pytest.param(b"GET /health/live HTTP/1.1\r\n\r\n", 400, "BAD_REQUEST", id="400-no-host"),
        pytest.param(
            b"GET /health/live HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "BAD_REQUEST", id="400-two-hosts"
        ),
        pytest.param(
            b"GET /health/live HTTP/1.1\r\n" + HOST.encode() + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n",
            431,
            "HEADERS_TOO_LARGE",
            id="494-header-too-large",
        ),
        pytest.param(
            b"GET /health/live HTTP/1.1\r\n" + HOST.encode() + b"Cookie: " + b"c=1; " * 2000 + b"\r\n\r\n",
            431,
            "HEADERS_TOO_LARGE",
            id="494-cookie-too-large",
        ),
        pytest.param(b"TRACE / HTTP/1.1\r\n" + HOST.encode() + b"\r\n", 405, "METHOD_NOT_ALLOWED", id="405-trace"),
        pytest.param(
            b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + HOST.encode() + b"\r\n", 414, "URI_TOO_LONG", id="414"
        ),
        pytest.param(
            b"POST /auth/login HTTP/1.1\r\n" + HOST.encode() + b"Transfer-Encoding: gzip\r\n\r\n",
            501,
            "NOT_IMPLEMENTED",
            id="501-transfer-encoding",
        ),
        pytest.param(
            b"GET /health/live HTTP/2.0\r\n" + HOST.encode() + b"\r\n", 505, "HTTP_VERSION_NOT_SUPPORTED", id="505"
        ),
        pytest.param(
            b"GET /metrics HTTP/1.1\r\n" + HOST.encode() + b"Connection: close\r\n\r\n", 404, "NOT_FOUND", id="404"
        ),
        pytest.param(
            b"GET /.authapp-errors/bad_request HTTP/1.1\r\n" + HOST.encode() + b"Connection: close\r\n\r\n",
            404,
            "NOT_FOUND",
            id="404-error-pages-are-internal",
        ),
        pytest.param(b"G@T / HTTP/1.1\r\n" + HOST.encode() + b"\r\n", 400, "BAD_REQUEST", id="400-bad-method"),
    ],
)
def test_nginx_answers_its_own_errors_in_the_envelope(stack, request_bytes, status, code):
    assert_raw_envelope(raw_request(stack, request_bytes), status, code)


def test_plain_http_on_the_https_port_is_answered_in_the_envelope(stack):
    reply = raw_request(
        stack, b"GET /health/live HTTP/1.1\r\n" + HOST.encode() + b"Connection: close\r\n\r\n", tls=False
    )
    assert_raw_envelope(reply, 400, "BAD_REQUEST")  # nginx's 497


def test_every_status_nginx_can_answer_is_mapped():
    """The ones no request can provoke here (408: nginx closes the connection; 495/496: no
    client certificates; 500) are mapped all the same."""
    import re

    from devtools.stack import NGINX_CONF

    text = NGINX_CONF.read_text()
    https = text[text.index("listen 443 ssl") : text.index("# Prometheus scrapes")]
    mapped = {int(code) for line in re.findall(r"error_page ([0-9 ]+) =", https) for code in line.split()}
    assert mapped >= {400, 404, 405, 408, 413, 414, 494, 495, 496, 497, 500, 501, 502, 503, 504, 505}
