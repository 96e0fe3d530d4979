"""A TCP proxy on 127.0.0.1 that tests use to lose a server's reply.

ReplyDroppingProxy accepts each client connection, opens one to the server,
and relays the two directions in two threads. A subclass connects to its
server and decides, per chunk, which request arms the drop and what happens
to the reply.
"""

import socket
import threading


class ReplyDroppingProxy:
    """The accept loop shared by the proxies, with ``armed`` and ``dropped``.

    A test sets ``armed`` to start looking for the request whose reply is
    lost. The proxy sets ``dropped`` once it has dropped that reply.
    """

    def __init__(self) -> None:
        self.armed = threading.Event()
        self.dropped = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing():
                client.close()
                continue
            server = self.connect()
            state = self.new_state()
            for target in (self._pass_requests, self._pass_replies):
                threading.Thread(
                    target=target, args=(client, server, state), daemon=True
                ).start()

    def refusing(self) -> bool:
        """Return whether to close a new client connection at once."""
        return False

    def connect(self) -> socket.socket:
        """Open a connection to the server."""
        raise NotImplementedError

    def new_state(self) -> dict:
        """Return the state that one connection's two threads share."""
        return {"drop": False}

    def _pass_requests(self, client, server, state) -> None:
        raise NotImplementedError

    def _pass_replies(self, client, server, state) -> None:
        raise NotImplementedError


def close_both(*sockets) -> None:
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
