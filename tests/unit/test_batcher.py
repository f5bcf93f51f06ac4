"""ModelBatcher: batches formed when the model is free (the whole queue), a short wait only on an idle model."""
import asyncio
import threading
import time

import pytest

from latentpref.tasks.evaluate.batcher import ModelBatcher


def _recording(delay_s: float = 0.0, fail_on=None):
    calls = []

    def run(items):
        calls.append(list(items))
        if fail_on is not None and fail_on in items:
            raise ValueError(f"bad item {fail_on}")
        time.sleep(delay_s)
        return [i * 10 for i in items]
    return run, calls


def test_busy_model_gets_everything_queued_meanwhile_in_order():
    run, calls = _recording(delay_s=0.05)
    batcher = ModelBatcher(run, max_batch_size=8, wait_s=0.0)

    async def main():
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)                       # the model is busy with [0]
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 12)]
        return [await first] + [await t for t in rest]
    assert asyncio.run(main()) == [i * 10 for i in range(12)]
    assert calls == [[0], list(range(1, 9)), list(range(9, 12))]    # max_batch_size bounds a batch
    assert (batcher.batches, batcher.items) == (3, 12)


def test_idle_model_waits_at_most_wait_s_to_fill_a_batch():
    run, calls = _recording()
    batcher = ModelBatcher(run, max_batch_size=4, wait_s=0.05)

    async def main():
        t0 = time.perf_counter()
        lone = await batcher.submit(1)
        lone_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        full = await asyncio.gather(*(batcher.submit(i) for i in range(4)))
        return lone, lone_s, full, time.perf_counter() - t0
    lone, lone_s, full, full_s = asyncio.run(main())
    assert lone == 10 and 0.04 <= lone_s < 1.0
    assert full == [0, 10, 20, 30] and full_s < 0.04    # a full batch does not wait
    assert calls == [[1], [0, 1, 2, 3]]


def test_a_failing_batch_fails_its_items_only_and_the_batcher_keeps_serving():
    run, calls = _recording(fail_on=3)
    batcher = ModelBatcher(run, max_batch_size=2, wait_s=0.01)

    async def main():
        out = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
        return out, await batcher.submit(5)
    out, after = asyncio.run(main())
    assert out[:2] == [0, 10] and all(isinstance(e, ValueError) for e in out[2:]) and after == 50


def test_runs_in_a_worker_thread_and_checks_arguments():
    seen = []
    batcher = ModelBatcher(lambda items: seen.append(threading.current_thread()) or items, max_batch_size=2, wait_s=0)
    assert asyncio.run(batcher.submit("x")) == "x" and seen[0] is not threading.main_thread()
    with pytest.raises(ValueError, match="max_batch_size"):
        ModelBatcher(lambda items: items, max_batch_size=0, wait_s=0)
    with pytest.raises(ValueError, match="wait_s"):
        ModelBatcher(lambda items: items, max_batch_size=1, wait_s=-1)


def _queued(turns, n: int, timeout_s: float = 5.0) -> None:
    """Wait until n tickets were handed out (the threads are queued in their order)."""
    deadline = time.monotonic() + timeout_s
    while turns._next_ticket < n:
        assert time.monotonic() < deadline, "threads never asked for a turn"
        time.sleep(0.005)


def test_compute_turns_run_one_at_a_time_in_arrival_order():
    from latentpref.tasks.evaluate.batcher import ComputeTurns
    turns = ComputeTurns()
    order, inside, overlap = [], [0], []

    def work(name):
        with turns.turn():
            inside[0] += 1
            overlap.append(inside[0])
            order.append(name)
            time.sleep(0.01)
            inside[0] -= 1

    with turns.turn():                      # held: everyone below queues behind it, in the order they ask
        threads = []
        for i, name in enumerate(["decode-1", "refit-piece", "decode-2", "refit-fit"]):
            threads.append(threading.Thread(target=work, args=(name,)))
            threads[-1].start()
            _queued(turns, i + 2)
        time.sleep(0.05)
        assert order == []
    for t in threads:
        t.join(5)
    assert order == ["decode-1", "refit-piece", "decode-2", "refit-fit"]
    assert overlap == [1, 1, 1, 1] and turns.turns == 5


def test_a_caller_interrupted_while_waiting_does_not_block_the_turns(monkeypatch):
    from latentpref.tasks.evaluate.batcher import ComputeTurns
    turns = ComputeTurns()
    holder = turns.turn()
    holder.__enter__()

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(turns._cv, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with turns.turn():
            pass
    monkeypatch.undo()
    holder.__exit__(None, None, None)
    entered = threading.Event()

    def later():
        with turns.turn():
            entered.set()
    t = threading.Thread(target=later)
    t.start()
    assert entered.wait(5), "the turn skipped by the interrupted caller was waited for forever"
    t.join(5)
