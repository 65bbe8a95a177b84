"""systemd readiness notification: a few bytes over the $NOTIFY_SOCKET datagram socket.

No libsystemd: the protocol is one datagram of newline-separated KEY=VALUE pairs. A leading
'@' in the socket path means the Linux abstract namespace.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("apm.broker")


def notify(message: str) -> bool:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("could not notify the service manager: %s", exc)
        return False
    return True
