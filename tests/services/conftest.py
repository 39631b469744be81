"""A real host agent on loopback for the service tests that need one."""

from tests.hosts.conftest import agent, capsule_id, client, pool, settings  # noqa: F401
