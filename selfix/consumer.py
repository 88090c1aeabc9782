"""The consumer process: tasks in → validated job files in inbox/ (or a failed result straight to outbox/).

Without KAFKA_BOOTSTRAP_SERVER it only adopts files that people drop into inbox/ by hand (any file name): each is
validated and renamed to the canonical, ordered name the runner reads.
"""

from __future__ import annotations

from loguru import logger

from selfix.intake import ingest_dropped_files, limits_of
from selfix.process import EXIT_ABORTED, EXIT_OK, StopFlags, boot
from selfix.settings import Settings
from selfix.spool import Spool
from selfix.templates import Catalog

POLL_S = 0.2


def run_offline(settings: Settings, spool: Spool, catalog: Catalog, flags: StopFlags) -> int:
    limits = limits_of(settings)
    while not flags.stopping.is_set():
        spool.beat("consumer")
        ingest_dropped_files(spool, limits, catalog)
        flags.wait(POLL_S)
    return EXIT_ABORTED if flags.abort.is_set() else EXIT_OK


def main() -> int:
    settings = boot("consumer")
    spool = Spool(settings.spool_dir).ensure()
    catalog = Catalog.load(settings.templates_dir)
    flags = StopFlags().install()
    if settings.kafka_enabled:
        from selfix.kafka_consumer import run_kafka  # lazily: offline nodes never load librdkafka

        return int(run_kafka(settings, spool, catalog, flags))
    logger.info("consumer: no KAFKA_BOOTSTRAP_SERVER, taking jobs from files dropped into {}", spool.inbox)
    return run_offline(settings, spool, catalog, flags)


if __name__ == "__main__":
    raise SystemExit(main())
