"""pytest fixtures for a real Kafka broker (see kafka_broker.py).

Fixtures:
- `kafka_libs`            (session)  Path of the broker's jars: $SELFIX_KAFKA_LIBS, else scripts/lib/install-kafka.
- `kafka_broker`          (session)  a KafkaBroker started once, shared by every test; do not stop or kill it.
- `private_kafka_broker`  (function) a fresh broker of the test's own, for tests that stop/kill/restart it.
- `kafka_topic_factory`   (function) make(partitions=1, prefix="t") -> name of a new topic on `kafka_broker`.
- `kafka_topic`           (function) name of a new one-partition topic on `kafka_broker`.

Without `java` on PATH the Kafka tests are skipped with a message saying so; any other failure to install or start
the broker is an error, never a silent skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.servers.kafka_broker import KafkaBroker

REPO = Path(__file__).resolve().parents[2]
INSTALL_KAFKA = REPO / "scripts" / "lib" / "install-kafka"
LIBS_ENV = "SELFIX_KAFKA_LIBS"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kafka: needs the real Kafka broker started by tests/servers/kafka_plugin.py")


def _require_java() -> None:
    if shutil.which("java") is None:
        pytest.skip("Kafka tests need Java 17+ (`java` not on PATH); install a JDK to run them")


def resolve_kafka_libs() -> Path:
    """$SELFIX_KAFKA_LIBS if set, else run scripts/lib/install-kafka (fast once cached) and use its last line."""
    env = os.environ.get(LIBS_ENV)
    if env:
        return Path(env)
    out = subprocess.run([str(INSTALL_KAFKA)], capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{INSTALL_KAFKA} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def kafka_libs() -> Path:
    _require_java()
    return resolve_kafka_libs()


@pytest.fixture(scope="session")
def kafka_broker(kafka_libs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    with KafkaBroker(kafka_libs, tmp_path_factory.mktemp("kafka")) as broker:
        yield broker


@pytest.fixture
def private_kafka_broker(kafka_libs: Path, tmp_path: Path) -> Iterator[KafkaBroker]:
    with KafkaBroker(kafka_libs, tmp_path / "kafka") as broker:
        yield broker


@pytest.fixture
def kafka_topic_factory(kafka_broker: KafkaBroker) -> Callable[..., str]:
    def make(partitions: int = 1, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        kafka_broker.create_topic(name, partitions)
        return name

    return make


@pytest.fixture
def kafka_topic(kafka_topic_factory: Callable[..., str]) -> str:
    return kafka_topic_factory()
