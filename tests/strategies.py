"""Hypothesis strategies shared by the test suite.

``snapshots()`` draws valid `WorkspaceSnapshot` values covering the corners the wire format must
carry: empty strings, any Unicode code point a UTF-8 string can hold (astral planes and emoji
included; lone surrogates excluded since they cannot be encoded), long texts (10,000 code points)
and both known and unknown ``state``/``mode`` labels.
"""

from __future__ import annotations

from hypothesis import strategies as st

from snapbus.snapshot import WorkspaceSnapshot

__all__ = [
    "KNOWN_MODES",
    "KNOWN_STATES",
    "labels",
    "long_texts",
    "snapshots",
    "texts",
]

KNOWN_STATES = ("active", "submitted", "merged", "abandoned", "expired")
KNOWN_MODES = ("ephemeral", "persistent")

LONG_TEXT_SIZE = 10_000

_EMOJI_AND_ASTRAL = st.sampled_from(
    [
        "😀",
        "🚀",
        "👩\u200d💻",  # ZWJ sequence
        "🏳️\u200d🌈",  # variation selector + ZWJ
        "\U0001d518\U0001d52b",  # mathematical fraktur (astral plane 1)
        "𠜎",  # CJK extension B (astral plane 2)
        "\U0010ffff",  # the last code point
        "\x00",
        "é",
        "e\u0301",  # combining accent
    ]
)


def long_texts(size: int = LONG_TEXT_SIZE) -> st.SearchStrategy[str]:
    """Texts of exactly `size` code points, repeating a drawn (possibly astral) pattern."""

    def stretch(pattern: str) -> str:
        return (pattern * (size // len(pattern) + 1))[:size]

    pattern = st.one_of(_EMOJI_AND_ASTRAL, st.text(min_size=1, max_size=16))
    return pattern.map(stretch)


def texts() -> st.SearchStrategy[str]:
    """Any encodable text: empty, short arbitrary Unicode, emoji/astral, or very long."""
    return st.one_of(
        st.just(""),
        st.text(),  # excludes lone surrogates, includes astral planes
        st.lists(st.one_of(_EMOJI_AND_ASTRAL, st.text(max_size=4)), max_size=8).map("".join),
        long_texts(),
    )


def labels(known: tuple[str, ...]) -> st.SearchStrategy[str]:
    """A known label most of the time, otherwise any text (labels are an open set)."""
    return st.one_of(st.sampled_from(known), texts())


def snapshots(
    *,
    text: st.SearchStrategy[str] | None = None,
) -> st.SearchStrategy[WorkspaceSnapshot]:
    """Valid snapshots; `text` overrides the strategy used for the free-text fields."""
    free = text if text is not None else texts()
    return st.builds(
        WorkspaceSnapshot,
        session_id=st.uuids(),
        repo_id=st.uuids(),
        agent_id=free,
        agent_name=free,
        changeset_id=st.uuids(),
        intent=free,
        base_commit=st.one_of(st.text(alphabet="0123456789abcdef", min_size=40, max_size=40), free),
        state=labels(KNOWN_STATES) if text is None else free,
        mode=labels(KNOWN_MODES) if text is None else free,
    )
