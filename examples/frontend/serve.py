"""Serve the example frontend on http://127.0.0.1:8000 (the development FRONTEND_URL),
with /forgot-password, /reset-password and /verify-email, the paths the email links
open, answered by index.html as any single-page host does:
`python3 examples/frontend/serve.py [PORT]`."""

import functools
import http.server
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# FRONTEND_URL/forgot-password (the notices' "reset your password" link), and the default
# PASSWORD_RESET_URL and EMAIL_VERIFY_URL (the links that carry a token in the fragment).
LINK_PAGES = ("/forgot-password", "/reset-password", "/verify-email")


class Handler(http.server.SimpleHTTPRequestHandler):
    def translate_path(self, path: str) -> str:
        if path.split("?", 1)[0].split("#", 1)[0].rstrip("/") in LINK_PAGES:
            path = "/index.html"
        return super().translate_path(path)


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    handler = functools.partial(Handler, directory=str(HERE))
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        print(f"example frontend on http://127.0.0.1:{port}/", flush=True)
        server.serve_forever()
