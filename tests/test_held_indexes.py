"""The indexes a process holds: bounded, by version, and the callers left to save."""

from __future__ import annotations

from elaoms.memory.held_indexes import HeldIndexes
from elaoms.search.ranking import CallerIndex


def test_the_least_recently_used_index_goes_first_and_a_version_must_match() -> None:
    held = HeldIndexes(2)
    first, second, third = (CallerIndex(vectors=None) for _ in range(3))
    held.put("+1", (1, 1), first)
    held.put("+2", (1, 2), second)
    assert held.get("+1", (1, 1)) is first  # now the most recently used
    held.put("+3", (1, 3), third)

    assert not held.holds("+2")
    assert held.get("+1", (1, 1)) is first and held.get("+3", (1, 3)) is third
    assert held.get("+1", (2, 4)) is None  # the caller's memories changed since
    held.drop("+1")
    assert not held.holds("+1")


def test_callers_to_save_are_taken_once_and_can_be_put_back() -> None:
    held = HeldIndexes(2)
    held.mark_unsaved("+1")
    held.mark_unsaved("+1")
    held.mark_unsaved("+2")

    assert sorted(held.take_unsaved()) == ["+1", "+2"]
    assert held.take_unsaved() == []
    held.remark_unsaved(["+2"])
    assert held.take_unsaved() == ["+2"]
