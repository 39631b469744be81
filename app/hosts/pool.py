"""The host pool: one lazy grpc.aio channel per host agent, replaced when its address changes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from app.config import MiB, Settings
from app.errors import HostUnavailable
from app.hosts.client import HostClient
from app.hosts.local import LocalAgent
from app.pb import agent_pb2_grpc

logger = logging.getLogger(__name__)

# Keepalive pings on a quiet stream notice an agent that vanished without closing its sockets.
# The agent's server must tolerate them: grpc.http2.max_ping_strikes=0 (or a
# grpc.http2.min_recv_ping_interval_without_data_ms at most this), else it answers a stream that
# stays quiet for three pings with GOAWAY "too_many_pings".
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000


def channel_options(
    settings: Settings, *, keepalive_time_ms: int = KEEPALIVE_TIME_MS
) -> list[tuple[str, Any]]:
    """The options of every channel to a host agent."""
    connect_ms = max(1, int(settings.host_connect_timeout_sec * 1000))
    return [
        ("grpc.max_send_message_length", 64 * MiB),
        ("grpc.max_receive_message_length", 64 * MiB),
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", min(KEEPALIVE_TIMEOUT_MS, keepalive_time_ms)),
        # Any unanswered ping (flow control sends its own) ends the connection this soon, not after
        # the default minute during which keepalive holds back.
        ("grpc.http2.ping_timeout_ms", min(KEEPALIVE_TIMEOUT_MS, keepalive_time_ms)),
        # By default a client stops pinging after two pings without data: a quiet stream would go blind.
        ("grpc.http2.max_pings_without_data", 0),
        # gRPC core gives a connection attempt max(this, backoff), 20 s by default: a blackholed
        # host must fail within the connect timeout instead.
        ("grpc.min_reconnect_backoff_ms", connect_ms),
        # A restarted agent is reachable again within a second, not after minutes of backoff.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1_000),
    ]


@dataclass(frozen=True, slots=True)
class _Host:
    address: str
    channel: grpc.aio.Channel
    stub: Any


class HostPool:
    """Channels to the host agents, by host id; one per host, opened on first use."""

    def __init__(self, settings: Settings, *, keepalive_time_ms: int = KEEPALIVE_TIME_MS) -> None:
        self._settings = settings
        self._options = channel_options(settings, keepalive_time_ms=keepalive_time_ms)
        self._addresses: dict[str, str] = {}
        self._hosts: dict[str, _Host] = {}
        self._local: dict[str, LocalAgent] = {}
        self._retiring: dict[grpc.aio.Channel, asyncio.Task[None]] = {}

    def set_local(self, host_id: str, agent: LocalAgent) -> None:
        """Calls to host_id go to the agent of this process directly, not through a channel."""
        self._local[host_id] = agent

    def set_hosts(self, hosts: Mapping[str, str]) -> None:
        """Replaces the known hosts (id -> HOST:PORT); channels to changed or removed ones close."""
        self._addresses = dict(hosts)
        for host_id, host in list(self._hosts.items()):
            if self._addresses.get(host_id) != host.address:
                del self._hosts[host_id]
                self._retire(host_id, host.channel)

    def host_ids(self) -> list[str]:
        """The ids of the hosts known now."""
        return list(self._addresses)

    def client(self, host_id: str) -> HostClient:
        """A client for one host; an unknown host id raises HostUnavailable."""
        address = self._addresses.get(host_id)
        if address is None:
            raise HostUnavailable(f"host {host_id} is not registered")
        local = self._local.get(host_id)
        if local is not None:
            return HostClient(host_id, local, local.stub, self._settings, health=local.health)
        host = self._hosts.get(host_id)
        if host is None:
            channel = grpc.aio.insecure_channel(address, options=self._options)
            host = _Host(address, channel, agent_pb2_grpc.AgentStub(channel))
            self._hosts[host_id] = host
        return HostClient(host_id, host.channel, host.stub, self._settings)

    async def close(self) -> None:
        """Closes every channel; calls still running on them end with HostUnavailable."""
        hosts, self._hosts = self._hosts, {}
        local, self._local = self._local, {}
        for agent in local.values():
            await agent.close()
        retiring, self._retiring = self._retiring, {}
        for task in retiring.values():
            task.cancel()
        await asyncio.gather(*retiring.values(), return_exceptions=True)
        channels = [host.channel for host in hosts.values()] + list(retiring)
        await asyncio.gather(*(channel.close() for channel in channels), return_exceptions=True)

    def _retire(self, host_id: str, channel: grpc.aio.Channel) -> None:
        # Calls under way get the usual call timeout to finish; a stream longer than that ends
        # with HostUnavailable and its caller reconnects to the new address.
        logger.info("host %s moved or left; closing its old channel", host_id)
        task = asyncio.get_running_loop().create_task(
            channel.close(grace=self._settings.host_call_timeout_sec), name=f"close-channel-{host_id}"
        )
        self._retiring[channel] = task

        def forget(done: asyncio.Task[None]) -> None:
            self._retiring.pop(channel, None)
            if not done.cancelled() and done.exception() is not None:
                logger.debug("closing the old channel of host %s failed: %r", host_id, done.exception())

        task.add_done_callback(forget)
