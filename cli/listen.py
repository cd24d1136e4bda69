"""Before a front end listens on a network address: can it, and may it without a login?"""

from __future__ import annotations

import ipaddress
import socket


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:  # a name: where it resolves to
        return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def check_port(host: str, port: int) -> None:
    """Raise OSError (one line) unless (host, port) can be listened on: before the model loads."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port or --host") from None


def check_exposure(host: str, guarded: bool, no_auth: bool, guard: str) -> None:
    """ValueError (one line) when `host` is reachable from other machines and nothing guards it:
    `guard` names the option that would (e.g. "--auth USER:PASSWORD")."""
    if not is_loopback(host) and not guarded and not no_auth:
        raise ValueError(
            f"--host {host} makes this reachable from other machines: give {guard}, or --no-auth "
            "to allow anyone who can reach the port"
        )


def url_host(host: str) -> str:
    """An IPv6 address in brackets, as a URL needs it."""
    return f"[{host}]" if ":" in host else host
