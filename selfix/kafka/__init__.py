"""Kafka for the consumer and uploader processes and for `selfix doctor`, one module per concern:

- `config`: librdkafka properties built from Settings (pure), `redact`, `Throttle`, `LibrdkafkaLog`;
- `errors`: `classify_kafka_error` (one line naming the setting to fix), `is_retriable`, `ErrorTriage` (a client's
  error_cb: what ends the process, what is only logged), the PublishError family;
- `offsets`: `OffsetTracker`, what may be committed (pure);
- `ledger`: `PublishedLedger`, which offsets wait for a published result and which to read again (pure);
- `deadletters`: `DeadLetters`, messages without a readable taskId on their way to KAFKA_TOPIC_DLQ;
- `producer`: `KafkaSender`, one idempotent producer per process, and its `Delivery`;
- `publisher`: the uploader's `ResultPublisher`, status events, `ProgressWatcher`;
- `doctor`: `check_kafka`;
- `intake`: `KafkaIntake`, the consumer process's loop (poll, rebalance, flow control, drain). It is not
  re-exported here: it sits on the spool side (admission, control), and control imports this package.

Code outside the package imports from the package; modules inside it, and the tests of one module, import from
that module.
"""

from selfix.kafka.config import (
    LibrdkafkaLog,
    Throttle,
    consumer_config,
    default_client_id,
    producer_config,
    redact,
)
from selfix.kafka.doctor import check_kafka
from selfix.kafka.errors import (
    ErrorTriage,
    MessageRejected,
    PublishError,
    PublishRefused,
    classify_kafka_error,
    is_rejection,
    is_retriable,
)
from selfix.kafka.offsets import TP, OffsetTracker
from selfix.kafka.producer import Delivery, KafkaSender
from selfix.kafka.publisher import EVENT_HEADER, ProgressWatcher, ResultPublisher, event_message

__all__ = [
    "EVENT_HEADER", "TP", "Delivery", "ErrorTriage", "KafkaSender", "LibrdkafkaLog", "MessageRejected", "OffsetTracker",
    "ProgressWatcher", "PublishError", "PublishRefused", "ResultPublisher", "Throttle", "check_kafka",
    "classify_kafka_error", "consumer_config", "default_client_id", "event_message", "is_rejection", "is_retriable",
    "producer_config", "redact",
]
