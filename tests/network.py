"""Where a server listens, seen from outside: helpers of the least-privilege tests."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest


def non_loopback_address() -> str:
    """An IPv4 address of this machine other than loopback; skips the test when the machine
    truly has none (then nothing but loopback could reach any server anyway).

    The address the kernel would send from to a non-local destination (a UDP connect sends
    no packet), else any address the host name resolves to.
    """
    candidates: list[str] = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: routed like any remote address
        candidates.append(str(s.getsockname()[0]))
    with contextlib.suppress(OSError):
        for *_, sockaddr in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            candidates.append(str(sockaddr[0]))
    for address in candidates:
        if not address.startswith("127.") and address != "0.0.0.0":
            return address
    pytest.skip("this machine has no non-loopback IPv4 address: nothing but loopback can "
                "reach its servers")


def accepts(host: str, port: int) -> bool:
    """Does something accept TCP connections at host:port?"""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def wait_accepting(host: str, port: int, timeout: float = 60) -> None:
    """Wait until host:port accepts connections (the server is up)."""
    deadline = time.monotonic() + timeout
    while not accepts(host, port):
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing listens on {host}:{port} after {timeout:.0f}s")
        time.sleep(0.1)


def assert_reachable_only_on_loopback(port: int) -> None:
    """The server on `port` answers on loopback and not on this machine's other address,
    which is itself reachable from here (a control listener proves it, so a refusal means
    the server is not listening there, not that the address is unreachable)."""
    address = non_loopback_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as control:
        control.bind(("0.0.0.0", 0))
        control.listen(1)
        assert accepts(address, control.getsockname()[1]), f"{address} is not reachable here"
    assert accepts("127.0.0.1", port)
    assert not accepts(address, port), f"port {port} answers on {address}"
