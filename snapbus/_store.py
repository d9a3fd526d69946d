"""The view's session store: snapshots by session id, lazily decoded, with exact indexes
(internal; no Kafka here).

A session is in one of two dicts, keyed by its canonical session id string: `data` (decoded
`WorkspaceSnapshot`) or `encoded` (a value not read yet, kept compact: `Codec.compact`, without
the header and the session id), so a read never touches a value to tell which it is. Three
exact indexes (repo_id, agent_id, state -> session ids) follow every change. `put` makes a
change and returns it; `load` is the bulk load of the initial replay; `export` and `install`
are the checkpoint's side. A value found bad on its first read leaves the store at once (every
read agrees it is absent) and is handed to `on_bad`.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import Any

from snapbus import checkpoint
from snapbus.codec import Codec
from snapbus.errors import DecodeError
from snapbus.snapshot import WorkspaceSnapshot

__all__ = ["Index", "SessionStore"]

_Fields = tuple[str, str, str]
"""The indexed fields of a session: (repo_key, agent_id, state)."""

Index = dict[str, "list[str] | tuple[str, ...] | set[str]"]
"""An exact index: value -> the keys of the sessions having it, a list while there are at
most `_SMALL_GROUP` (a set of 5 strings takes 728 bytes, a list 120), else a set. Lists, not
tuples: adding to a tuple copies it, touching every member's refcount, which made indexing the
sessions of a large replay cost more than reading them. But a checkpoint keeps its small
groups as tuples, and they stay tuples after loading until they change: the cyclic collector
stops tracking a tuple of strings at its first pass, while hundreds of thousands of lists
would make each of its full passes during and after the load walk them all (`frozen`)."""
_SMALL_GROUP = 32
_INSTALL_CHUNK = 20_000  # decoded sessions installed between two yields


def _add_new(index: Index, value: str, key: str) -> None:
    """Add `key`, known to be in no group of `index`, to the group of `value`."""
    members = index.get(value)
    if members is None:
        index[value] = [key]
    elif isinstance(members, list):  # (first: the common case while indexing a replay)
        if len(members) < _SMALL_GROUP:
            members.append(key)
        else:
            index[value] = {*members, key}
    elif isinstance(members, set):
        members.add(key)
    else:  # (a group loaded from a checkpoint, changed for the first time)
        index[value] = [*members, key] if len(members) < _SMALL_GROUP else {*members, key}


def _add(index: Index, value: str, key: str) -> None:
    """Add `key` to the group of `value` (if it is not there yet)."""
    members = index.get(value)
    if members is None or key not in members:
        _add_new(index, value, key)


def _discard(index: Index, value: str, key: str) -> None:
    """Remove `key` from the group of `value`, and the group when it is empty."""
    members = index.get(value)
    if members is None:
        return
    if isinstance(members, list):
        if key in members:
            members.remove(key)
            if not members:
                del index[value]
    elif isinstance(members, tuple):  # (loaded from a checkpoint: a list once it changes)
        if key in members:
            rest = [member for member in members if member != key]
            if rest:
                index[value] = rest
            else:
                del index[value]
    else:
        members.discard(key)
        if len(members) <= _SMALL_GROUP // 2:  # (half: no flapping at the boundary)
            if members:
                index[value] = list(members)
            else:
                del index[value]


def _frozen(index: Index) -> Index:
    """A copy of `index` whose list groups are tuples (`SessionStore.frozen`)."""
    return {value: tuple(members) if type(members) is list else members
            for value, members in index.items()}


def _fields(snapshot: WorkspaceSnapshot) -> _Fields:
    return snapshot.repo_key, snapshot.agent_id, snapshot.state


def _ignore(key: str, error: DecodeError) -> None:
    pass


Change = tuple["WorkspaceSnapshot | None", "WorkspaceSnapshot | None"]
"""What `SessionStore.put` changed: (old, new); None for absent."""


class SessionStore:
    """Sessions by canonical session id string, with exact indexes; see the module."""

    __slots__ = ("by_agent", "by_repo", "by_state", "codec", "data", "encoded", "on_bad")

    def __init__(self, codec: Codec,
                 on_bad: Callable[[str, DecodeError], None] = _ignore) -> None:
        self.codec = codec
        self.on_bad = on_bad
        """Called with a session whose value was found bad on its first read (it left)."""
        self.data: dict[str, WorkspaceSnapshot] = {}
        """Decoded sessions. Never rebound: a reader may bind it."""
        self.encoded: dict[str, bytes] = {}
        """Sessions not read yet, by their compact value."""
        self.by_repo: Index = {}
        self.by_agent: Index = {}
        self.by_state: Index = {}

    # ------------------------------------------------------------------ reads

    def __len__(self) -> int:
        return len(self.data) + len(self.encoded)

    def __contains__(self, key: str) -> bool:
        """Whether `key` is stored (decoded or not: a value not read yet may turn out bad)."""
        return key in self.data or key in self.encoded

    def ids(self) -> list[str]:
        """Every stored key, decoded sessions first."""
        return [*self.data, *self.encoded]

    def get(self, key: str) -> WorkspaceSnapshot | None:
        """The session's snapshot (decoded now if not read yet); None when absent or bad."""
        found = self.data.get(key)
        if found is not None:
            return found
        value = self.encoded.get(key)
        return None if value is None else self.decoded(key, value)

    def decoded(self, key: str, value: bytes) -> WorkspaceSnapshot | None:
        """Decode a session's value on its first read and keep the snapshot instead.

        A bad value (its header and indexed fields were fine) leaves the store at once and
        goes to `on_bad`; returns None then.
        """
        full = self.codec.expand(key, value)
        try:
            snapshot = self.codec.decode(full, key=key)
        except DecodeError as exc:
            if self.encoded.get(key) is value:
                del self.encoded[key]
                self._unindex(key, self._peeked_fields(full))
                self.on_bad(key, exc)
            return None
        if self.encoded.get(key) is value:
            del self.encoded[key]
            self.data[key] = snapshot
        return snapshot

    def snapshots(self, keys: Collection[str] | None = None) -> list[WorkspaceSnapshot]:
        """The snapshots of `keys` that are present (default: every session)."""
        if keys is None:
            return [*self.data.values(), *self.snapshots(list(self.encoded))]
        data, encoded = self.data, self.encoded
        try:
            return [data[key] for key in keys]  # (every one read before: one C loop)
        except KeyError:
            pass
        while True:
            found = []
            for key in keys:
                snapshot = data.get(key)
                if snapshot is None:
                    value = encoded.get(key)
                    if value is None:
                        continue
                    snapshot = self.decoded(key, value)
                    if snapshot is None:
                        # a bad value left its index groups, which `keys` may be (and then
                        # changed under this loop): walk it again, without that session
                        break
                found.append(snapshot)
            else:
                return found

    def select(self, repo: str | None = None, agent: str | None = None,
               state: str | None = None) -> list[WorkspaceSnapshot]:
        """The snapshots matching every filter given (all of them when none is), walking the
        smallest of the groups involved."""
        indexed = [index.get(key, set()) for index, key in (
            (self.by_repo, repo), (self.by_agent, agent), (self.by_state, state))
            if key is not None]
        if not indexed:
            return self.snapshots()
        if len(indexed) == 1:
            return self.snapshots(indexed[0])
        smallest = min(indexed, key=len)
        others = [members for members in indexed if members is not smallest]
        return self.snapshots([key for key in smallest
                               if all(key in members for members in others)])

    def indexes(self) -> tuple[Index, Index, Index]:
        """The indexes by repo_id, agent_id and state."""
        return self.by_repo, self.by_agent, self.by_state

    def frozen(self) -> tuple[Index, Index, Index]:
        """The indexes as a checkpoint keeps them: copies whose small groups are tuples
        (`Index`); the sets are the store's own."""
        return _frozen(self.by_repo), _frozen(self.by_agent), _frozen(self.by_state)

    # ------------------------------------------------------------------ writes

    def put(self, key: str, new: WorkspaceSnapshot | None) -> Change | None:
        """Make `new` the session's snapshot (None: delete); return (old, new), or None when
        nothing changed (an equal snapshot, or deleting an absent session). ``old`` is None
        for a session created, or whose value not read yet was bad."""
        data = self.data
        old = data.get(key)
        old_fields = None if old is None else _fields(old)
        if old is None:
            value = self.encoded.pop(key, None)
            if value is not None:  # never read: decode it to compare and report the change
                full = self.codec.expand(key, value)
                old_fields = self._peeked_fields(full)
                with contextlib.suppress(DecodeError):  # (a bad value, being replaced)
                    old = self.codec.decode(full, key=key)
        if new is None:
            if old_fields is None:
                return None
            data.pop(key, None)
            self._unindex(key, old_fields)
        elif old_fields is None:
            data[key] = new
            self._index(key, _fields(new))
        else:
            data[key] = new
            if old == new:
                return None
            self._reindex(key, old_fields, _fields(new))
        return old, new

    def load(self, keys: Sequence[bytes | None], values: Sequence[bytes | None],
             peeked: Iterable[tuple[str, str, str, str] | None]) -> list[int]:
        """Bulk load of the initial replay: store each value whose `Codec.peek` fields are
        given, whose key is its session id and whose session is not stored yet, encoded;
        return the positions of the others (the caller decodes and `put`s them)."""
        data, encoded, compact = self.data, self.encoded, self.codec.compact
        by_repo, by_agent, by_state = self.by_repo, self.by_agent, self.by_state
        left = []
        for at, key, value, fields in zip(itertools.count(), keys, values, peeked):
            if value is not None and fields is not None:
                sid, repo, agent, state = fields
                # (sid is canonical: so is the key when equal)
                if key == sid.encode() and sid not in data and sid not in encoded:
                    encoded[sid] = compact(value)
                    _add_new(by_repo, repo, sid)
                    _add_new(by_agent, agent, sid)
                    _add_new(by_state, state, sid)
                    continue
            left.append(at)
        return left

    # ------------------------------------------------------------------ checkpoints

    def export(self) -> dict[str, checkpoint.Session]:
        """Every session as a checkpoint keeps it: encoded ones as they are, decoded ones as
        their values."""
        sessions: dict[str, checkpoint.Session] = dict(self.encoded)
        sessions.update((key, snapshot._values()) for key, snapshot in self.data.items())
        return sessions

    def install(self, sessions: dict[str, Any],
                indexes: tuple[Index, Index, Index]) -> Iterator[None]:
        """Replace an empty store's content with a checkpoint's (`sessions` is taken over):
        encoded values stay as they are, sessions saved decoded become snapshots again.
        A generator: it yields between chunks, for the caller to let its event loop run."""
        decoded = list(itertools.compress(  # (found at C speed: a million items take 30 ms)
            sessions.items(), map(operator.is_, map(type, sessions.values()),
                                  itertools.repeat(tuple))))
        from_trusted, data = WorkspaceSnapshot._from_trusted, self.data
        for start in range(0, len(decoded), _INSTALL_CHUNK):
            for key, row in decoded[start:start + _INSTALL_CHUNK]:
                del sessions[key]
                data[key] = from_trusted(row)
            yield
        del decoded
        self.encoded = sessions
        self.by_repo, self.by_agent, self.by_state = indexes

    # ------------------------------------------------------------------ indexes

    def _peeked_fields(self, full: bytes) -> _Fields:
        peeked = self.codec.peek(full)
        assert peeked is not None  # it was peeked when stored
        return peeked[1], peeked[2], peeked[3]

    def _index(self, key: str, fields: _Fields) -> None:
        for index, value in zip(self.indexes(), fields, strict=True):
            _add(index, value, key)

    def _reindex(self, key: str, old: _Fields, new: _Fields) -> None:
        for index, before, after in zip(self.indexes(), old, new, strict=True):
            if before != after:
                _discard(index, before, key)
                _add(index, after, key)

    def _unindex(self, key: str, fields: _Fields) -> None:
        for index, value in zip(self.indexes(), fields, strict=True):
            _discard(index, value, key)
