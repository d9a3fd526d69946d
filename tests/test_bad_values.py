"""One rule for a value found bad when first read: absent from every read, reported, and
replaced by the session's last good snapshot when the log has one (docs/bad-values.md)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from aiokafka import AIOKafkaProducer

from snapbus.codec import encode
from snapbus.config import KafkaConfig
from snapbus.publisher import SnapshotPublisher
from snapbus.snapshot import WorkspaceSnapshot
from snapbus.view import SnapshotView
from tests.helpers import eventually, make_snapshot
from tests.test_faults import read_log

if TYPE_CHECKING:
    from tests.conftest import BrokerAddress

REPO = uuid.uuid4()


def bad_value(snapshot: WorkspaceSnapshot) -> bytes:
    """A value whose header and indexed fields read fine but whose Avro body is cut short."""
    return encode(snapshot)[:-4]


def first_reads(sid: uuid.UUID) -> dict[str, Callable[[SnapshotView], Any]]:
    """Each read that can be the first to decode a session's value."""
    def item(view: SnapshotView) -> Any:
        with pytest.raises(KeyError):
            view[sid]

    return {
        "get": lambda view: view.get(sid),
        "getitem": item,
        "in": lambda view: sid in view,
        "by_repo": lambda view: view.by_repo(REPO),
        "by_agent": lambda view: view.by_agent("auth0|bad"),
        "by_state": lambda view: view.by_state("merged"),
        "select": lambda view: view.select(repo_id=REPO, state="merged"),
        "snapshots": lambda view: view.snapshots(),
    }


def assert_absent(view: SnapshotView, sid: uuid.UUID) -> None:
    """Every read agrees the session is not in the view."""
    assert view.get(sid) is None
    assert view.get(sid, "default") == "default"  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        view[sid]
    assert sid not in view
    assert str(sid) not in view
    assert sid not in set(view)
    for found in (view.by_repo(REPO), view.by_agent("auth0|bad"), view.by_state("merged"),
                  view.select(repo_id=REPO, state="merged"), view.snapshots()):
        assert sid not in {s.session_id for s in found}


@pytest.mark.parametrize("first_read", list(first_reads(uuid.UUID(int=0))))
async def test_a_value_found_bad_is_absent_from_every_read(
    broker: BrokerAddress, topic_name: str, first_read: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    goods = [make_snapshot(repo_id=REPO) for _ in range(3)]
    only_bad = make_snapshot(repo_id=REPO, agent_id="auth0|bad", state="merged")
    restored = make_snapshot(repo_id=REPO)  # good, then a bad value
    dead_letters = f"{topic_name}-dlq"
    async with SnapshotPublisher(config) as publisher:
        await publisher.publish_many([*goods, restored])
    raw = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
    await raw.start()
    try:
        bad = [await raw.send_and_wait(topic_name, bad_value(s), key=s.key.encode())
               for s in (only_bad, restored.replace(agent_id="auth0|bad", state="merged"))]
    finally:
        await raw.stop()

    async with SnapshotView(config, fetch_max_wait_ms=20, dead_letter_topic=dead_letters) as view:
        # decoded lazily: not read yet, both are counted as sessions
        assert len(view) == 5
        assert view.stats.decode_errors == 0
        # (both bad values are of repo REPO, agent auth0|bad, state merged: every read
        # below matches them)
        first_reads(only_bad.session_id)[first_read](view)
        first_reads(restored.session_id)[first_read](view)
        # found bad: absent from every read at once, as one state
        assert_absent(view, only_bad.session_id)
        assert_absent(view, restored.session_id)
        assert len(view) == len(list(view)) == len(view.snapshots()) == 3
        # then the session with a good record before is restored; the other stays absent
        await eventually(lambda: view.get(restored.session_id) == restored,
                         what="the last good snapshot restored")
        assert restored.session_id in view
        assert restored in view.by_repo(REPO)
        assert view.by_agent("auth0|bad") == []
        assert view.by_state("merged") == []
        assert_absent(view, only_bad.session_id)
        assert len(view) == len(list(view)) == len(view.snapshots()) == 4
        # each bad record is counted, logged and dead-lettered once, with its coordinates
        await eventually(lambda: view.stats.decode_errors == 2, what="bad records counted")
        await eventually(lambda: view.stats.dead_lettered == 2, what="bad records dead-lettered")
        assert view.status == "live"
    letters = await read_log(broker.bootstrap_servers, dead_letters)
    assert sorted((int(dict(r.headers)["snapbus.source.partition"]),
                   int(dict(r.headers)["snapbus.source.offset"])) for r in letters) == sorted(
        (md.partition, md.offset) for md in bad)

    # a view that decodes everything at start reaches the same state
    async with SnapshotView(config, fetch_max_wait_ms=20, decode="eager") as eager:
        assert {s.session_id: s for s in eager.snapshots()} == {
            s.session_id: s for s in view.snapshots()}
        assert eager.stats.decode_errors == 2
