"""``LeaseTable``: tokens, readers, expiry. Pure logic on a fake clock."""

from __future__ import annotations

import pytest

from vllm_hetero_pd.connector.leases import LeaseError, LeaseTable


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def table(clock):
    return LeaseTable(lease_s=10, clock=clock)


def test_tokens_are_unguessable_and_checked_on_pin_and_release(table):
    token = table.add("r", [1, 2])
    assert len(token) >= 32 and table.add("s", [3]) != token
    with pytest.raises(LeaseError, match="wrong lease token"):
        table.pin("r", "x" * len(token), "reader", [1])
    with pytest.raises(LeaseError, match="wrong lease token"):
        table.pin("r", "", "reader", [1])
    with pytest.raises(LeaseError, match="wrong lease token"):
        table.release("r", token[:-1], "reader", 1)
    with pytest.raises(LeaseError, match="wrong lease token"):
        table.pin("r", table.add("other", [1]), "reader", [1])  # another lease's token
    assert table.take_freed() == [] and len(table) == 3
    assert table.pin("r", token, "reader", [1, 2]) == pytest.approx(10)


def test_pin_extends_the_lease_and_expiry_frees_once(table, clock):
    token = table.add("r", [1, 2])
    clock.now = 8
    assert table.pin("r", token, "reader", [2]) == pytest.approx(10)  # heartbeat: deadline moves to 18
    clock.now = 15
    assert table.take_freed() == []
    clock.now = 19
    assert table.take_freed() == ["r"] and table.take_freed() == []
    with pytest.raises(LeaseError, match="lease expired"):
        table.pin("r", token, "reader", [1])
    with pytest.raises(LeaseError, match="lease expired"):
        table.release("r", token, "reader", 1)
    assert table.take_freed() == []


def test_an_expired_lease_cannot_be_revived_before_it_is_collected(table, clock):
    token = table.add("r", [1])
    clock.now = 11  # expired, take_freed not called yet
    with pytest.raises(LeaseError, match="lease expired"):
        table.pin("r", token, "reader", [1])
    assert table.take_freed() == ["r"]


def test_blocks_outside_the_lease_are_refused(table):
    token = table.add("r", [1, 2])
    with pytest.raises(LeaseError, match=r"blocks \[3\] are not leased"):
        table.pin("r", token, "reader", [2, 3])


def test_two_readers_on_one_lease_free_it_only_after_the_last(table):
    """Two decode requests read one lease: the first release must not free it while the second reads."""
    token = table.add("r", [1])
    table.pin("r", token, "decode-a", [1])
    table.pin("r", token, "decode-b", [1])
    table.release("r", token, "decode-a", 1)
    assert table.take_freed() == []
    assert table.pin("r", token, "decode-b", [1]) > 0  # b's heartbeat still works
    table.release("r", token, "decode-b", 1)
    assert table.take_freed() == ["r"]


def test_num_readers_counts_every_decode_tp_rank(table):
    token = table.add("r", [0])
    table.release("r", token, "decode-tp0", 2)
    table.release("r", token, "decode-tp0", 2)  # a repeated release from the same rank does not count twice
    assert table.take_freed() == []
    assert table.pin("r", token, "decode-tp1", [0]) > 0  # the other rank may still read
    table.release("r", token, "decode-tp1", 2)
    assert table.take_freed() == ["r"] and table.take_freed() == []


def test_num_readers_never_shrinks(table):
    token = table.add("r", [0])
    table.release("r", token, "tp0", 4)
    table.release("r", token, "tp1", 1)  # a smaller count from another reader does not lower the bar
    assert table.take_freed() == []
    table.release("r", token, "tp2", 4)
    table.release("r", token, "tp3", 4)
    assert table.take_freed() == ["r"]


def test_a_reader_that_released_cannot_pin_again(table):
    token = table.add("r", [0])
    table.release("r", token, "tp0", 2)
    with pytest.raises(LeaseError, match="already released"):
        table.pin("r", token, "tp0", [0])


def test_release_of_an_unknown_or_freed_id_is_refused(table):
    with pytest.raises(LeaseError, match="holds no KV blocks"):
        table.release("nope", "token", "reader", 1)
    token = table.add("r", [0])
    table.release("r", token, "reader", 1)
    assert table.take_freed() == ["r"]
    with pytest.raises(LeaseError, match="holds no KV blocks"):
        table.release("r", token, "reader", 1)
    assert table.take_freed() == []
