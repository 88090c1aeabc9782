"""Shared fixtures. Real servers come from the plugins under tests/servers/."""

pytest_plugins = [
    "tests.servers.kafka_plugin",
    "tests.servers.minio_plugin",
    "tests.servers.node_plugin",
]
