"""The commit tracker: an offset becomes committable only once every command read before it is handled."""
from __future__ import annotations

import threading

from k2eg.gateway.commits import CommitTracker


def read(t: CommitTracker, partition: int, *offsets: int) -> list:
    return [t.read(partition, o) for o in offsets]


def test_the_commit_point_waits_for_the_oldest_unfinished_command():
    t = CommitTracker()
    at = read(t, 0, 0, 1, 2, 3, 4)
    assert t.settle() == {} and t.unfinished() == 5
    t.done(at[2])
    t.done(at[0])
    assert t.settle() == {0: 1}             # 2 is done but 1 is not: only 0 is committable
    assert t.unfinished() == 3 and t.uncommitted() == 4 and t.oldest() == (0, 1)
    t.done(at[1])
    assert t.settle() == {0: 3}
    t.done(at[4])
    assert t.settle() == {}                 # 3 still runs
    t.done(at[3])
    assert t.settle() == {0: 5}
    assert t.unfinished() == t.uncommitted() == 0 and t.oldest() is None
    assert t.settle() == {}                 # nothing moved since


def test_partitions_are_independent_and_gaps_in_offsets_do_not_hold_the_point_back():
    t = CommitTracker()
    a = read(t, 0, 10, 15)                  # 11..14 never read (compacted away, transaction markers)
    b = read(t, 1, 3)
    for x in (a[1], b[0], a[0]):
        t.done(x)
    assert t.settle() == {0: 16, 1: 4}


def test_a_forgotten_partition_ignores_late_reports_and_starts_afresh():
    t = CommitTracker()
    old = read(t, 0, 5, 6)
    t.forget([0])                           # revoked: its commands run again elsewhere
    t.done(old[0])
    assert t.settle() == {} and t.unfinished() == 0
    new = read(t, 0, 5)                     # assigned again, read again from the committed offset
    t.done(new[0])
    assert t.settle() == {0: 6}
    t.done(old[1])                          # a late report of the first reading: beyond what was read, ignored
    t.done((0, 2))                          # a stale one below the commit point
    assert t.settle() == {} and t.unfinished() == 0


def test_reports_from_many_threads_all_count():
    t = CommitTracker()
    positions = read(t, 0, *range(4000))
    threads = [threading.Thread(target=lambda chunk: [t.done(p) for p in chunk], args=(positions[i::8],))
               for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert t.settle() == {0: 4000} and t.uncommitted() == 0
