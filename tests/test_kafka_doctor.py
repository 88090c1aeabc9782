"""`selfix doctor` against the real broker: one line per Kafka check, the setting to fix named, no secret shown."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.servers.kafka_broker import KafkaBroker
from tests.servers.node_plugin import ROOT

pytestmark = pytest.mark.kafka


def doctor(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "SPOOL_DIR": str(tmp_path / "spool"), "STORE_DIR": str(tmp_path / "store"),
            "MODELS_DIR": str(tmp_path), "TEMP_DIR": str(tmp_path), "COMFY_PORT": "9", **env}
    return subprocess.run([sys.executable, "-m", "selfix", "doctor"], env=full, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def kafka_lines(out: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in out.stdout.splitlines() if line.startswith(("ok   kafka", "FAIL kafka"))]


def test_doctor_reports_each_kafka_check(kafka_broker: KafkaBroker, kafka_topic_factory: Callable[..., str],
                                         tmp_path: Path) -> None:
    topics = {"KAFKA_TOPIC_INPUT": kafka_topic_factory(partitions=2), "KAFKA_TOPIC_OUTPUT": kafka_topic_factory(),
              "KAFKA_TOPIC_DLQ": f"missing-{uuid.uuid4().hex[:6]}"}
    out = doctor({**kafka_broker.settings_env("scram"), **topics}, tmp_path)
    lines = kafka_lines(out)
    assert lines[0].startswith("ok   kafka.connect:") and "SCRAM-SHA-256 as selfix-scram" in lines[0], out.stdout
    assert lines[1] == f"ok   kafka.topic.input: topic '{topics['KAFKA_TOPIC_INPUT']}': 2 partition(s)"
    assert lines[2].startswith("ok   kafka.topic.output:")
    assert lines[3].startswith("FAIL kafka.topic.dlq:") and "KAFKA_TOPIC_DLQ" in lines[3]
    assert out.returncode != 0
    assert KafkaBroker.SCRAM_PASSWORD not in out.stdout + out.stderr


def test_doctor_names_the_sasl_settings_on_a_wrong_password(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    wrong = f"wrong-{uuid.uuid4().hex[:6]}"
    out = doctor({**kafka_broker.settings_env("plain"), "KAFKA_SASL_PASSWORD": wrong}, tmp_path)
    lines = kafka_lines(out)
    assert lines[0].startswith("FAIL kafka.connect:") and "KAFKA_SASL_PASSWORD" in lines[0], out.stdout
    assert all("not checked: no connection" in line for line in lines[1:])
    assert wrong not in out.stdout + out.stderr and out.returncode != 0
