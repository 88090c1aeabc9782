"""A small client of supervisord's XML-RPC interface (unix socket or http), as the watchdog and `selfix status` use it.

Each call opens its own connection (supervisor's transport keeps one persistent connection that must not be shared
between threads) with a socket timeout, so a wedged supervisord cannot hang the caller.
"""

from __future__ import annotations

import socket
import xmlrpc.client
from dataclasses import dataclass
from typing import Any

from supervisor.xmlrpc import SupervisorTransport, UnixStreamHTTPConnection

# supervisord's process states (supervisor.states.ProcessStates), by the names its XML-RPC `statename` gives.
STOPPED = "STOPPED"
STARTING = "STARTING"
RUNNING = "RUNNING"
BACKOFF = "BACKOFF"
STOPPING = "STOPPING"
EXITED = "EXITED"
FATAL = "FATAL"
UNKNOWN = "UNKNOWN"
STOPPED_STATES = (STOPPED, EXITED, FATAL)  # not running and not about to run by itself (supervisor's own set
# adds UNKNOWN); FATAL needs a start from outside


class SupervisorError(Exception):
    """supervisord could not be reached or refused the call."""


@dataclass(frozen=True)
class ProgramInfo:
    name: str
    state: str  # supervisord statename: one of the constants above
    pid: int
    started: float  # epoch seconds of the last start (supervisord's `start`)
    description: str = ""

    @property
    def running(self) -> bool:
        return self.state == RUNNING


def _transport(serverurl: str, timeout: float) -> Any:
    """supervisor's transport, with a socket timeout on its connections (it has none of its own)."""
    transport = SupervisorTransport(None, None, serverurl)
    make = transport._get_connection

    def get_connection() -> Any:
        conn = make()
        if isinstance(conn, UnixStreamHTTPConnection):
            def connect() -> None:
                conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.sock.settimeout(timeout)
                conn.sock.connect(conn.socketfile)

            conn.connect = connect
        else:
            conn.timeout = timeout
        return conn

    transport._get_connection = get_connection
    return transport


class Supervisor:
    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url
        self.timeout = timeout

    def _proxy(self) -> Any:
        transport = _transport(self.url, self.timeout)
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self._proxy().supervisor, method)(*args)
        except xmlrpc.client.Fault as exc:
            raise SupervisorError(f"supervisor.{method}{args}: {exc.faultString}") from exc
        except (OSError, xmlrpc.client.ProtocolError, ValueError) as exc:
            raise SupervisorError(f"supervisor.{method}: {self.url}: {type(exc).__name__}: {exc}") from exc

    def programs(self) -> dict[str, ProgramInfo]:
        return {
            p["name"]: ProgramInfo(p["name"], str(p["statename"]), int(p.get("pid") or 0), float(p.get("start") or 0),
                                   str(p.get("description", "")))
            for p in self._call("getAllProcessInfo")
        }

    def program(self, name: str) -> ProgramInfo:
        p = self._call("getProcessInfo", name)
        return ProgramInfo(p["name"], str(p["statename"]), int(p.get("pid") or 0), float(p.get("start") or 0),
                           str(p.get("description", "")))

    def stop(self, name: str) -> None:
        """Ask supervisord to stop `name` (SIGTERM to its group, SIGKILL after stopwaitsecs) and return at once."""
        self._call("stopProcess", name, False)

    def start(self, name: str) -> None:
        self._call("startProcess", name, False)

    def signal(self, name: str, sig: str) -> None:
        self._call("signalProcess", name, sig)
