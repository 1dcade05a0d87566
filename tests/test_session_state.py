"""What a Session and the store do for their callers: its mode, its cache dropped or adopted, a key's two modes."""

from __future__ import annotations

from sidecar.sessions.state import MODES, Segment, Session, file_stem
from sidecar.sessions.store import SessionStore


def test_a_session_names_its_mode_and_file_stem() -> None:
    assert [Session("k", delta).mode for delta in MODES] == ["delta", "base"]
    assert Session("k", True).file_stem == file_stem("k", True) == "k.delta"
    assert Session("k", False).file_stem == file_stem("k", False) == "k.base"


def test_a_session_adopts_a_rebuilt_copy_and_drops_its_cache() -> None:
    session = Session("k", True, tokens=[1], saved_states=["s"], saved_checkpoints={1: ["s"]}, prefilled_tokens=2)
    rebuilt = Session("k", True, tokens=[1, 2, 3], segments=[Segment(0, 3, "write")], cache=["kv"], prefilled_tokens=3)
    session.adopt(rebuilt)
    assert (session.tokens, session.segments, session.cache) == ([1, 2, 3], [Segment(0, 3, "write")], ["kv"])
    # The δ-states read from disk are in the cache now; the replayed tokens count as prefilled.
    assert (session.saved_states, session.saved_checkpoints, session.prefilled_tokens) == (None, {}, 5)
    session.drop_cache()
    assert session.cache is None and session.tokens == [1, 2, 3]


def test_the_store_peeks_at_both_modes_of_a_key_delta_first() -> None:
    store = SessionStore(max_sessions=4, max_kv_bytes=1 << 20, state_dir=None, fingerprint=None)
    assert store.peek_modes("k") == []
    base = store.get("k", False)
    assert store.peek_modes("k") == [base]
    delta = store.get("k", True)
    assert store.peek_modes("k") == [delta, base] and store.peek_modes("other") == []
