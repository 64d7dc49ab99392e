"""Waits of the tests on a server's real state, under deadlines (never a fixed sleep)."""

from __future__ import annotations

from typing import Dict

from fastps._local_job import poll_until


def wait_parked(server, requests: int, what: str = "", timeout: float = 10.0) -> Dict[str, int]:
    """Until ``server`` (a ``_C.PsServer``) holds exactly ``requests`` parked requests; returns
    its parked counters then. ``what`` names the requests for the failure message."""
    poll_until(lambda: server.parked()["requests"] == requests, timeout,
               f"{requests} parked request(s){' (' + what + ')' if what else ''} on the server",
               state=lambda: str(server.parked()))
    return server.parked()


def wait_queues_freed(server, timeout: float = 10.0) -> None:
    """Until ``server`` holds no queued reply bytes (its non-reading peer was dropped)."""
    poll_until(lambda: server.stats()["queued_bytes"] == 0, timeout, "the server to free its reply queues",
               state=lambda: str(server.stats()), interval=0.05)
