"""Worker recycling (maxtasksperchild, max_memory_per_child) without losing or duplicating a
task, and pools inside pool tasks."""

from __future__ import annotations

import os

from tasks import square

import procpool


def hog(n):
    global _hog
    _hog = b"x" * n  # touched pages: the worker's RSS really grows
    return os.getpid()


def nested_sum(n):
    with procpool.Pool(2) as inner:
        return sum(inner.map(square, range(n)))


def test_max_memory_per_child_replaces_a_worker_after_its_task():
    with procpool.Pool(1, max_memory_per_child=100 * 2**20) as pool:
        pids = [pool.apply(hog, (200 * 2**20,)) for _ in range(3)]
        assert len(set(pids)) == 3  # each run left the worker over the limit: replaced
        assert pool.apply(square, (5,)) == 25


def test_recycling_with_a_backlog_loses_and_duplicates_nothing():
    with procpool.Pool(2, maxtasksperchild=3) as pool:
        results = [pool.apply_async(square, (i,)) for i in range(200)]
        assert [r.get(30) for r in results] == [i * i for i in range(200)]
        assert pool.map(square, range(500), chunksize=5) == [i * i for i in range(500)]


def test_a_task_can_create_and_use_its_own_pool():
    with procpool.Pool(2) as pool:
        assert pool.map(nested_sum, [10, 20]) == [
            sum(i * i for i in range(10)),
            sum(i * i for i in range(20)),
        ]
