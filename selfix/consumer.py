"""The consumer process: tasks in → validated job files in inbox/ (or a failed result straight to outbox/).

Without KAFKA_BOOTSTRAP_SERVER it only adopts files that people drop into inbox/ by hand (any file name): each is
validated (selfix/admission.py) and renamed to the canonical, ordered name the runner reads. With Kafka it does
that too, and runs `selfix.kafka.intake.KafkaIntake`, whose docstring says how offsets are committed, when
partitions pause, and what revocation, SIGTERM and refused credentials do.
"""

from __future__ import annotations

import time

from loguru import logger

from selfix.admission import adopt_dropped, limits_of
from selfix.files import DiskFull
from selfix.kafka.intake import KafkaIntake
from selfix.process import EXIT_ABORTED, EXIT_OK, Program, StopFlags, run
from selfix.settings import Settings
from selfix.spool import Spool
from selfix.templates import Catalog

POLL_S = 0.2


def run_offline(settings: Settings, spool: Spool, catalog: Catalog, flags: StopFlags) -> int:
    limits = limits_of(settings)
    disk = DiskFull("consumer")
    while not flags.stopping.is_set():
        flags.beat()
        delay = POLL_S
        if adopt_dropped(spool, limits, catalog, disk) is False:
            delay = max(POLL_S, disk.retry_at - time.monotonic())
        flags.wait(delay)
    return EXIT_ABORTED if flags.abort.is_set() else EXIT_OK


def run_kafka(settings: Settings, spool: Spool, catalog: Catalog, flags: StopFlags) -> int:
    return KafkaIntake(settings, spool, catalog, flags).run()


def serve(program: Program) -> int:
    settings, spool, flags = program.settings, program.spool, program.flags
    catalog = Catalog.load(settings.templates_dir)
    if settings.kafka_enabled:
        return run_kafka(settings, spool, catalog, flags)
    logger.info("consumer: no KAFKA_BOOTSTRAP_SERVER, taking jobs from files dropped into {}", spool.inbox)
    return run_offline(settings, spool, catalog, flags)


def main() -> int:
    return run("consumer", serve)


if __name__ == "__main__":
    raise SystemExit(main())
