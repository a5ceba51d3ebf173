"""The profile database: history seeding and edits, feedback, exclusions, conversations,
the refresh queue, and erasure (SQLite files and in-memory)."""

from __future__ import annotations

import itertools
import threading

import pytest

from llmrec.agent import ProfileStore, UnknownConversationError, UnknownItemError


@pytest.fixture(params=["sqlite", "postgresql"])
def profiles(request, tmp_path, tiny_dataset):
    """The profile store on the embedded SQLite file and on a real PostgreSQL server."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'profiles.db'}"
    else:
        url = request.getfixturevalue("postgres")(f"profiles_{next(_DATABASES)}")
    store = ProfileStore(url, tiny_dataset.catalog, tiny_dataset.histories)
    yield store
    store.close()


_DATABASES = itertools.count()


def test_history_is_seeded_from_the_data_set_then_edited(profiles, tiny_dataset):
    base = tiny_dataset.histories["1"]
    assert profiles.history("1") == base
    new = next(i for i in tiny_dataset.catalog.ids if i not in base)
    assert profiles.add_history("1", [new, base[0]]) == [new]  # already there: unchanged
    assert profiles.history("1") == [*base, new]
    assert profiles.remove_history("1", [base[0], new]) == [base[0], new]
    assert profiles.history("1") == base[1:]
    assert [e.source for e in profiles.history_entries("1")] == ["dataset"] * (len(base) - 1)
    assert profiles.queued() == ["1"]
    with pytest.raises(UnknownItemError):
        profiles.add_history("1", ["no-such-item"])
    with pytest.raises(ValueError):
        profiles.history("../etc")
    assert profiles.history("newcomer") == []


def test_feedback_moves_items_between_history_and_exclusions(profiles, tiny_dataset):
    unseen = [i for i in tiny_dataset.catalog.ids if i not in tiny_dataset.histories["2"]]
    profiles.record_feedback("2", unseen[0], "negative", "card")
    assert profiles.exclusions("2") == [unseen[0]]
    assert profiles.queued() == []  # an exclusion does not change what training reads
    profiles.record_feedback("2", unseen[0], "positive", "chat")
    assert profiles.exclusions("2") == []
    assert profiles.history("2")[-1] == unseen[0]
    assert profiles.queued() == ["2"]
    assert [(f.item_id, f.sentiment) for f in profiles.feedback("2")] == [
        (unseen[0], "negative"),
        (unseen[0], "positive"),
    ]
    assert profiles.exclude("2", [unseen[1], unseen[1]]) == [unseen[1]]
    assert profiles.unexclude("2", [unseen[1], unseen[2]]) == [unseen[1]]


def test_conversations_belong_to_their_user(profiles, tiny_dataset):
    cid = profiles.new_conversation("3")
    item = tiny_dataset.catalog.ids[0]
    profiles.add_message("3", cid, "user", "something funny")
    profiles.add_message("3", cid, "assistant", "try this", [item])
    assert [(m.role, m.items) for m in profiles.messages("3", cid)] == [
        ("user", []),
        ("assistant", [item]),
    ]
    assert [(c.id, c.messages) for c in profiles.conversations("3")] == [(cid, 2)]
    with pytest.raises(UnknownConversationError):
        profiles.messages("4", cid)
    with pytest.raises(UnknownConversationError):
        profiles.add_message("4", cid, "user", "hijack")


def test_a_conversation_is_found_by_what_was_said(profiles):
    said = [("user", "something funny"), ("assistant", "1. Try this\n")]
    older, newer = profiles.new_conversation("3"), profiles.new_conversation("3")
    for cid in (older, newer):
        for role, content in said:
            profiles.add_message("3", cid, role, content.strip())
    assert profiles.find_conversation("3", said) == newer  # the newest of equals
    assert profiles.find_conversation("3", said[:1]) is None
    assert (
        profiles.find_conversation("3", [("user", "something funny"), ("assistant", "x")]) is None
    )
    assert profiles.find_conversation("4", said) is None  # never another user's


def test_old_conversations_are_dropped_past_the_limit(tmp_path, tiny_dataset):
    store = ProfileStore("sqlite://", tiny_dataset.catalog, max_conversations=2)
    ids = [store.new_conversation("5") for _ in range(3)]
    assert {c.id for c in store.conversations("5")} == set(ids[1:])


def test_dequeue_keeps_a_user_queued_again_meanwhile(profiles, tiny_dataset):
    item = next(i for i in tiny_dataset.catalog.ids if i not in tiny_dataset.histories["6"])
    profiles.add_history("6", [item])
    first = profiles.queued_at("6")
    assert profiles.dequeue("6", queued_before=first) and profiles.queued() == []
    profiles.remove_history("6", [item])
    assert not profiles.dequeue("6", queued_before=first)  # queued after `first`
    assert profiles.queued() == ["6"]


def test_erase_deletes_everything_and_history_is_not_reimported(profiles, tiny_dataset):
    unseen = [i for i in tiny_dataset.catalog.ids if i not in tiny_dataset.histories["7"]]
    profiles.record_feedback("7", unseen[0], "positive", "chat")
    profiles.record_feedback("7", unseen[1], "negative", "chat")
    cid = profiles.new_conversation("7")
    profiles.add_message("7", cid, "user", "hello")
    other = profiles.history("8")
    report = profiles.erase("7")
    assert report.history == len(tiny_dataset.histories["7"]) + 1
    assert (report.feedback, report.exclusions, report.conversations) == (2, 1, 1)
    assert (report.messages, report.queued) == (1, 1)
    assert profiles.history("7") == [] and profiles.exclusions("7") == []
    assert profiles.feedback("7") == [] and profiles.conversations("7") == []
    assert profiles.queued() == [] and profiles.history("8") == other
    with profiles.db.connect() as conn:  # nothing of user 7 is left in any table
        for table in ("history", "feedback", "exclusions", "conversations", "messages"):
            rows = conn.exec_driver_sql(f"SELECT count(*) FROM {table} WHERE user_id='7'")
            assert rows.scalar() == 0


def test_concurrent_writers_from_threads(profiles, tiny_dataset):
    items = tiny_dataset.catalog.ids

    def work(n: int) -> None:
        for item in items[n::4]:
            profiles.exclude("9", [item])

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(profiles.exclusions("9")) == sorted(items)


def test_an_erased_conversation_is_gone_from_the_database_files(profiles, tmp_path):
    """Erasure a person can check: after erase, no byte of the database or its write-ahead
    log still holds what the user wrote (SQLite keeps deleted rows in free pages and old
    page images in the log unless told otherwise)."""
    if profiles.db.dialect.name != "sqlite":
        pytest.skip("PostgreSQL keeps deleted rows until it reuses their space (privacy.md)")
    secret = "my zebra-4471 password story"
    cid = profiles.new_conversation("7")
    for n in range(50):  # enough to fill pages of their own
        profiles.add_message("7", cid, "user", f"{secret} {n}")
    profiles.history("8")
    profiles.erase("7")
    files = sorted(tmp_path.glob("profiles.db*"))
    assert files and not any(b"zebra-4471" in f.read_bytes() for f in files)
