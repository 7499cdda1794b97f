"""The mirror path's buffer pool: capped, reused, all-or-nothing reservations, chunks give back."""

from __future__ import annotations

import gc

import pytest
import trio
import trio.testing

from registry.mirror.buffers import BufferPool, Chunk

SIZE = 64 * 1024


async def test_acquire_waits_at_the_cap_until_a_buffer_is_released() -> None:
    pool = BufferPool(SIZE, 2 * SIZE, keep_idle=1)
    first, second = await pool.acquire(), await pool.acquire()
    assert pool.in_use == 2 and pool.free == 0
    got: list[object] = []

    async def third() -> None:
        got.append(await pool.acquire())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(third)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # capped: waits
        pool.release(first)
    assert got == [first]  # the released buffer is reused, not a new one
    assert pool.allocated == 2
    pool.release(second)
    pool.release(first)
    # beyond keep_idle the buffer is unmapped at once
    assert (pool.in_use, pool.allocated) == (0, 1)
    assert first.closed and not second.closed


def test_reserve_is_all_or_nothing() -> None:
    pool = BufferPool(SIZE, 3 * SIZE)
    assert pool.reserve(4) is None
    assert pool.in_use == 0
    taken = pool.reserve(3)
    assert taken is not None and len(taken) == 3
    assert pool.reserve(1) is None
    for buffer in taken:
        pool.release(buffer)
    assert pool.free == 3


async def test_a_dropped_chunk_gives_its_buffer_back() -> None:
    pool = BufferPool(SIZE, SIZE)
    buffer = await pool.acquire()
    buffer[:3] = b"abc"
    chunk = Chunk(pool, buffer, 1, 3)
    with chunk.view() as view:
        assert bytes(view) == b"bc"
    assert len(chunk) == 2 and pool.free == 0
    del chunk
    gc.collect()
    assert pool.free == 1
    again = await pool.acquire()
    chunk = Chunk(pool, again, 0, 1)
    chunk.release()
    chunk.release()  # twice is harmless
    assert pool.free == 1 and pool.allocated == 1


def test_buffers_must_be_big_enough() -> None:
    with pytest.raises(ValueError):
        BufferPool(100, SIZE)


async def test_multi_unit_buffers_count_against_the_cap_and_are_reused_by_size() -> None:
    pool = BufferPool(SIZE, 4 * SIZE, keep_idle=1)
    double = await pool.acquire(2)
    assert len(double) == 2 * SIZE and (pool.in_use, pool.free) == (2, 2)
    single = await pool.acquire()
    got: list[object] = []

    async def another_double() -> None:
        got.append(await pool.acquire(2))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(another_double)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # one unit free: a 2-unit buffer waits
        pool.release(single)  # idle now: two units free
    assert len(got) == 1 and got[0] is not single  # a fresh double, not the idle single
    assert pool.in_use == 4 and pool.free == 0
    pool.release(double)
    again = await pool.acquire(2)
    assert again is double  # the idle double is reused
    with pytest.raises(ValueError):
        await pool.acquire(5)  # bigger than the whole cap: would wait forever
