"""The view's session store (snapbus._store) and replay stash (snapbus._stash), alone: no
broker; the store model-tested against a dict.

Random sequences of puts, deletes, bulk loads (good values, and values that peek fine but do
not decode), reads and checkpoint round trips are applied to a `SessionStore` and to a plain
``dict[str, WorkspaceSnapshot]``; after each step every read of the store (get, len, ids,
snapshots, the three indexes, select) must agree with the model.
"""

from __future__ import annotations

import marshal
import uuid
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from snapbus._partition import partition_of
from snapbus._stash import Stash, Stashed
from snapbus._store import SessionStore
from snapbus.codec import default_codec
from snapbus.errors import DecodeError
from snapbus.snapshot import WorkspaceSnapshot
from tests.strategies import KNOWN_STATES, texts

CODEC = default_codec()
IDS = [str(uuid.UUID(int=n)) for n in range(1, 7)]  # few sessions: ops collide
REPOS = [str(uuid.UUID(int=100 + n)) for n in range(3)]
AGENTS = ["auth0|a", "auth0|b", "agent-ü"]


@st.composite
def snapshots(draw: st.DrawFn) -> WorkspaceSnapshot:
    return WorkspaceSnapshot(
        session_id=draw(st.sampled_from(IDS)),
        repo_id=draw(st.sampled_from(REPOS)),
        agent_id=draw(st.sampled_from(AGENTS)),
        agent_name=draw(texts()),
        changeset_id=draw(st.uuids()),
        intent=draw(st.sampled_from(["", "fix", "refactor 😀"])),
        base_commit="0123456789abcdef0123456789abcdef01234567",
        state=draw(st.sampled_from(KNOWN_STATES)),
        mode="ephemeral",
    )


operations = st.lists(st.one_of(
    st.tuples(st.just("put"), snapshots()),
    st.tuples(st.just("delete"), st.sampled_from(IDS)),
    st.tuples(st.just("load"), st.lists(snapshots(), max_size=4)),
    st.tuples(st.just("load_bad"), snapshots()),
    st.tuples(st.just("get"), st.sampled_from(IDS)),
    st.tuples(st.just("checkpoint"), st.none()),
), max_size=30)


def _bad_value(snapshot: WorkspaceSnapshot) -> bytes:
    """A value whose header and indexed fields peek fine but that does not decode."""
    value = CODEC.encode(snapshot)[:-3]
    assert CODEC.peek(value) is not None
    return value


class Model:
    """The store as a dict, plus the keys holding a bad value not read yet."""

    def __init__(self) -> None:
        self.sessions: dict[str, WorkspaceSnapshot] = {}
        self.bad: set[str] = set()

    def ids(self) -> set[str]:
        return {*self.sessions, *self.bad}


def check(store: SessionStore, model: Model) -> None:
    assert len(store) == len(model.ids())
    assert set(store.ids()) == model.ids()
    # the indexes hold every stored session, good or not read yet
    for index, field in zip(store.indexes(), ("repo_key", "agent_id", "state"), strict=True):
        assert all(members for members in index.values())
        grouped = {key for members in index.values() for key in members}
        assert grouped == model.ids()
        for value, members in index.items():
            assert len(set(members)) == len(members)
            for key in members:
                if key in model.sessions:
                    assert getattr(model.sessions[key], field) == value


def check_reads(store: SessionStore, model: Model) -> None:
    """Reads decode every value: the bad ones leave (as `on_bad` says)."""
    for repo in REPOS:
        for state in (None, *KNOWN_STATES):
            expected = {s for s in model.sessions.values()
                        if s.repo_key == repo and state in (None, s.state)}
            found = store.select(repo, None, state)
            model.bad.clear()  # (a select reads them: gone now)
            assert set(found) == expected
            assert len(found) == len(expected)
    assert sorted(map(str, store.snapshots())) == sorted(map(str, model.sessions.values()))
    for key in IDS:
        assert store.get(key) == model.sessions.get(key)
        assert (key in store) == (key in model.sessions)
    assert not model.bad
    check(store, model)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_the_store_agrees_with_a_dict(ops: list[tuple[str, Any]]) -> None:
    lost: list[str] = []

    def on_bad(key: str, error: DecodeError) -> None:
        lost.append(key)

    store, model = SessionStore(CODEC, on_bad), Model()
    for op, arg in ops:
        if op == "put":
            key = arg.key
            before = model.sessions.get(key)
            change = store.put(key, arg)
            model.bad.discard(key)
            model.sessions[key] = arg
            if before == arg:
                assert change is None
            else:
                assert change is not None
                assert change[1] is arg
                assert change[0] == before
        elif op == "delete":
            present = arg in model.ids()
            before = model.sessions.pop(arg, None)
            model.bad.discard(arg)
            change = store.put(arg, None)
            assert (change is not None) == present
            if change is not None:
                assert change == (before, None)
        elif op == "load":
            values = [CODEC.encode(s) for s in arg]
            keys = [s.key.encode() for s in arg]
            left = store.load(keys, values, map(CODEC.peek, values))
            taken = set()
            for at, snapshot in enumerate(arg):
                fresh = snapshot.key not in model.ids() and snapshot.key not in taken
                assert (at not in left) == fresh
                if fresh:
                    taken.add(snapshot.key)
                    model.sessions[snapshot.key] = snapshot
        elif op == "load_bad":
            value = _bad_value(arg)
            left = store.load([arg.key.encode()], [value], [CODEC.peek(value)])
            if arg.key in model.ids():
                assert left == [0]
            else:
                assert left == []
                model.bad.add(arg.key)
        elif op == "get":
            assert store.get(arg) == model.sessions.get(arg)
            if arg in model.bad:
                model.bad.discard(arg)
                assert lost[-1] == arg
        elif op == "checkpoint":
            check_reads(store, model)  # (export keeps bad values: read them first)
            copy = SessionStore(CODEC, on_bad)
            # (as a checkpoint file has them: small groups tuples, which the next ops change)
            saved = marshal.loads(marshal.dumps((store.export(), store.frozen())))
            for _ in copy.install(*saved):
                pass
            assert copy.data.keys() | copy.encoded.keys() == model.ids()
            store = copy
        check(store, model)
    check_reads(store, model)


def test_put_returns_the_change_of_a_value_not_read_yet() -> None:
    first = WorkspaceSnapshot(session_id=IDS[0], repo_id=REPOS[0], agent_id="a",
                              agent_name="", changeset_id=uuid.UUID(int=9), intent="",
                              base_commit="", state="active", mode="ephemeral")
    store = SessionStore(CODEC)
    value = CODEC.encode(first)
    assert store.load([first.key.encode()], [value], [CODEC.peek(value)]) == []
    assert store.data == {}
    assert len(store) == 1
    second = first.replace(state="merged")
    assert store.put(first.key, second) == (first, second)
    assert store.by_state == {"merged": [first.key]}


def test_a_bad_value_read_through_its_group_hides_no_other_session() -> None:
    # a group is a list up to 32 members, then a set: reading it decodes the values not read
    # yet, and a bad one leaves the group while it is walked
    for size in (3, 40):
        store = SessionStore(CODEC)
        group = [WorkspaceSnapshot(session_id=uuid.UUID(int=n + 1), repo_id=REPOS[0],
                                   agent_id="a", agent_name="", changeset_id=uuid.UUID(int=9),
                                   intent="", base_commit="", state="active",
                                   mode="ephemeral") for n in range(size)]
        values = [CODEC.encode(s) for s in group]
        values[1] = _bad_value(group[1])
        assert store.load([s.key.encode() for s in group], values,
                          map(CODEC.peek, values)) == []
        good = {s for at, s in enumerate(group) if at != 1}
        assert set(store.snapshots(store.by_repo[REPOS[0]])) == good
        assert set(store.select(REPOS[0], None, "active")) == good
        assert len(store) == size - 1


def test_the_stash_keeps_each_keys_latest_value_and_leaves_out_misplaced_keys() -> None:
    partitions = 4
    keys = [f"{uuid.UUID(int=n)}".encode() for n in range(1, 30)]
    home = {key: partition_of(key, partitions) for key in keys}
    here = [key for key in keys if home[key] == 0][:3]
    elsewhere = next(key for key in keys if home[key] != 0)
    for keep_records in (False, True):
        stash = Stash(keep_records=keep_records)
        first = [Stashed(key, b"old", offset) for offset, key in enumerate(here)]
        stash.add(0, [*first, Stashed(elsewhere, b"x", 3), Stashed(None, b"no key", 4)])
        stash.add(0, [Stashed(here[0], b"new", 5), Stashed(here[1], None, 6)])
        (latest,) = stash.take(partitions)
        assert latest.stashed == 5
        assert latest.misplaced == [elsewhere]
        got = dict(zip(latest.keys, latest.values, strict=True))
        assert got == {here[0]: b"new", here[1]: None, here[2]: b"old", None: b"no key"}
        if keep_records:  # in offset order, for the TTL's timestamps
            assert latest.records is not None
            assert [r.offset for r in latest.records] == [2, 4, 5, 6]
        else:
            assert latest.records is None
        assert list(stash.take(partitions)) == []
    stash = Stash(keep_records=False)
    stash.add(1, [Stashed(b"k", b"v", 0), Stashed(b"j", b"v", 1)])
    assert stash.drop() == 2
    assert list(stash.take(partitions)) == []
