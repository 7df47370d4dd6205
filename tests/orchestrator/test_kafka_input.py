"""The job's Kafka input never drops a message it was handed: one that a poll returns while the input holds
(editors busy; a rebalance can assign a partition inside that poll, unpaused) is applied in order later, so the
offsets the job commits never pass an edit it did not apply."""

from collections import deque

from orchestrator.inputs import KafkaInput
from streams.kafka import KafkaItem, KafkaSettings
from streams.record import EditRecord


class _Consumer:
    """Hands out one message per poll, paused or not (the rebalance race, made certain)."""

    def __init__(self, items):
        self.items = deque(items)
        self.paused = False

    def pause_all(self):
        self.paused = True

    def resume_all(self):
        self.paused = False

    def poll(self, max_records=None, timeout_s=None):
        return [self.items.popleft()] if self.items else []


def _item(i):
    rec = EditRecord(id=f"u{i}", prompt=f"The capital of X{i} is", target="Paris")
    return KafkaItem(topic="edits", partition=0, offset=i, key=rec.id, record=rec, error=None)


def test_a_message_polled_while_holding_is_applied_in_order(monkeypatch):
    consumer = _Consumer([_item(i) for i in range(4)])
    monkeypatch.setattr("orchestrator.inputs.KafkaEditConsumer", lambda settings: consumer)
    inp = KafkaInput(KafkaSettings(bootstrap="127.0.0.1:9", topic="edits", group="g"))
    first = inp.next(wait=False)
    assert first is not None and first[1].id == "u0"
    inp.hold()  # the editors are busy; this poll hands out u1 anyway
    inp.hold()  # and u2
    assert consumer.paused
    ids = []
    while (got := inp.next(wait=False)) is not None:
        ids.append(got[1].id)
    assert ids == ["u1", "u2", "u3"]
    assert inp.checkpoint_state() == {"offsets": [["edits", 0, 4]]}
