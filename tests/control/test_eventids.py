"""Event ids (control.eventids): the API names a task's events by their CARAVAN_EVENTS sequence enciphered for
the task, so that no customer learns from them how many events the others made; the platform reads them back."""

from __future__ import annotations

import re
import secrets

import pytest

from control.eventids import ID_LENGTH, ID_PATTERN, EventIds

KEY = bytes(range(32))


def test_an_id_reads_back_as_its_sequence_for_its_task_only() -> None:
    ids = EventIds(KEY)
    for sequence in (1, 2, 3, 1000, 2**32, 2**63 - 1, 2**64 - 1):
        event_id = ids.encode("tk-000000000001", sequence)
        assert re.fullmatch(ID_PATTERN, event_id)  # as the routes' ?after= takes it
        assert ids.decode("tk-000000000001", event_id) == sequence
        assert ids.decode("tk-000000000002", event_id) is None  # another task's stream: no resume point there
        assert EventIds(bytes(32)).decode("tk-000000000001", event_id) is None  # another platform's secret


def test_ids_say_nothing_of_the_sequences_between_them() -> None:
    """Consecutive sequences give ids in no order and with no common part; the same event, the same id."""
    ids = EventIds(KEY)
    run = [ids.encode("tk-000000000001", s) for s in range(1000, 1100)]
    assert len(set(run)) == len(run) and run != sorted(run)
    assert len({i[:8] for i in run}) == len(run) and len({i[-8:] for i in run}) == len(run)
    assert run == [ids.encode("tk-000000000001", s) for s in range(1000, 1100)]
    assert ids.encode("tk-000000000002", 1000) != run[0]


def test_made_up_and_altered_ids_read_as_none() -> None:
    ids = EventIds(KEY)
    event_id = ids.encode("tk-000000000001", 42)
    altered = [event_id[:n] + format(int(event_id[n], 16) ^ 1, "x") + event_id[n + 1 :] for n in range(ID_LENGTH)]
    hostile = ["", "42", "0" * ID_LENGTH, event_id.upper(), event_id + "0", event_id[:-1], " " + event_id[1:]]
    hostile += ["g" * ID_LENGTH, "-" + event_id[1:], "\u0661" * ID_LENGTH]  # Arabic-Indic digits: int() takes them
    for text in altered + hostile + [secrets.token_hex(16) for _ in range(200)]:
        assert ids.decode("tk-000000000001", text) is None, text


def test_a_key_and_a_sequence_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError):
        EventIds(b"short")
    ids = EventIds(KEY)
    for sequence in (0, -1, 2**64):
        with pytest.raises(ValueError):
            ids.encode("tk-000000000001", sequence)
