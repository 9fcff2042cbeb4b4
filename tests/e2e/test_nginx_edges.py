"""What nginx answers itself, and bodies sent in chunks, through nginx.conf and uWSGI."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import uuid

from stack import PASSWORD


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
    """Send bytes as they are (no client library between) and read the reply to its end."""
    port = stack.https_port if tls else stack.http_port
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
