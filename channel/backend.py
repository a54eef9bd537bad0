"""What every link backend offers the run: open one device's emulated link from a LinkRequest (the LinkBackend protocol).

A backend is a function registered with ``@register_link_backend(name, packet_level=…, shared_cells=…)``
(testbed.core.plugins) in a module of ``channel/``. ``packet_level`` says whether it emulates IP
packets (so a bounded drop-tail ``queue`` means something); ``shared_cells`` whether several devices
can share one bottleneck (``channel.cells``). The scenario reads both from the registration, without
importing the backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from channel.link import LinkCounters, LinkParameters


@dataclass(frozen=True)
class LinkRequest:
    """One device's link as the run asks for it: where the broker is, both directions, the seed and a name."""

    upstream_host: str
    upstream_port: int
    downlink: LinkParameters
    uplink: LinkParameters
    seed: int
    name: str
    reset_after_s: float | None = 10.0
    """After this long down, an outage resets the device's connections (None: never); honoured where the backend can."""


class EmulatedLink(Protocol):
    """An open link: an async context manager with the address a client connects to and counters per direction."""

    @property
    def address(self) -> tuple[str, int]: ...

    @property
    def downlink_counters(self) -> LinkCounters: ...

    @property
    def uplink_counters(self) -> LinkCounters: ...

    async def __aenter__(self) -> EmulatedLink: ...

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None: ...


class LinkBackend(Protocol):
    """A registered backend: from a request to a link (not yet entered)."""

    def __call__(self, request: LinkRequest) -> EmulatedLink: ...
