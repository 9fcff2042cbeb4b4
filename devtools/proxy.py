"""A TCP proxy between the app and PostgreSQL that cuts, hangs or loses traffic on demand."""

from __future__ import annotations

import select
import socket
import struct
import threading


class TcpProxy:
    """A TCP proxy on a loopback port between the app and PostgreSQL, that a test turns:

    - `pass_traffic()`: forward both ways (the start state);
    - `cut()`: reset every open connection and refuse new ones (a server restart);
    - `hang()`: stop forwarding on open connections and accept new ones without ever
      answering (a frozen server or a network that drops packets);
    - `lose_next_answer()`: forward the next message a client sends, let the server
      answer it, then reset that connection instead of passing the answer on.

    Everything runs in threads of the test process; `close()` ends them all.
    """

    POLL = 0.02

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode = "pass"
        self.accepted = 0
        self.lost_answers: list[bytes] = []
        self._lose_next = False
        self._lock = threading.Lock()
        self._pipes: list[_Pipe] = []
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self.port = 0
        self._listen()

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(self.POLL)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept, args=(listener,), name="proxy-accept", daemon=True)
        self._acceptor.start()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                pipe = _Pipe(client, self)
                self._pipes.append(pipe)
            pipe.start()

    def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
        if listener is not None:
            listener.close()

    def _drop_connections(self) -> None:
        with self._lock:
            pipes, self._pipes = self._pipes, []
        for pipe in pipes:
            pipe.kill()
        for pipe in pipes:
            pipe.join(timeout=5)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(pipe.is_alive() for pipe in self._pipes)

    def pass_traffic(self) -> None:
        if self.mode == "hang":
            self._drop_connections()  # the app gave up on them; they carry nothing valid
        self.mode = "pass"
        if self._listener is None:
            self._listen()

    def cut(self) -> None:
        self.mode = "cut"
        self._stop_listening()
        self._drop_connections()

    def hang(self) -> None:
        self.mode = "hang"

    def lose_next_answer(self) -> None:
        with self._lock:
            self._lose_next = True

    def _take_lose_next(self) -> bool:
        with self._lock:
            taken, self._lose_next = self._lose_next, False
            return taken

    def close(self) -> None:
        self.mode = "closed"
        self._stop_listening()
        self._drop_connections()

    def threads(self) -> list[threading.Thread]:
        """The proxy's threads still running (none after close())."""
        alive = [self._acceptor] if self._acceptor is not None and self._acceptor.is_alive() else []
        return alive + [pipe for pipe in self._pipes if pipe.is_alive()]


class _Pipe(threading.Thread):
    """One proxied connection: forwards bytes both ways while the proxy passes traffic."""

    def __init__(self, client: socket.socket, proxy: TcpProxy) -> None:
        super().__init__(name="proxy-pipe", daemon=True)
        self.client = client
        self.proxy = proxy
        self.upstream: socket.socket | None = None
        self._killed = threading.Event()

    def kill(self) -> None:
        self._killed.set()

    def run(self) -> None:
        try:
            self._forward()
        finally:
            # An abortive close (RST), as when a server dies, rather than a polite FIN.
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.client.close()
            if self.upstream is not None:
                self.upstream.close()

    def _forward(self) -> None:
        while not self._killed.is_set():
            if self.proxy.mode != "pass":  # hang: hold the connection, answer nothing
                self._killed.wait(TcpProxy.POLL)
                continue
            if self.upstream is None:
                try:
                    self.upstream = socket.create_connection(self.proxy.upstream, timeout=5)
                except OSError:
                    return
            readable, _, _ = select.select([self.client, self.upstream], [], [], TcpProxy.POLL)
            for source in readable:
                target = self.upstream if source is self.client else self.client
                try:
                    data = source.recv(65536)
                    if not data:
                        return
                    target.sendall(data)
                    if source is self.client and self.proxy._take_lose_next():
                        self._swallow_answer()
                        return
                except OSError:
                    return

    def _swallow_answer(self) -> None:
        assert self.upstream is not None
        if select.select([self.upstream], [], [], 5)[0]:
            self.proxy.lost_answers.append(self.upstream.recv(65536))
