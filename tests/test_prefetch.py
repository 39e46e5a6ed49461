"""Device prefetch: order, errors, look-ahead bound and shutdown."""
import threading
import time

import jax
import numpy as np
import pytest

from shunted_jax.train.prefetch import prefetch_to_device


def test_yields_every_batch_in_order_on_the_devices():
    source = ({"x": np.full((8, 2), i, np.float32)} for i in range(5))
    sharding = jax.sharding.NamedSharding(jax.make_mesh((8,), ("data",)), jax.sharding.PartitionSpec("data"))
    out = list(prefetch_to_device(source, lambda b: jax.device_put(b, sharding), size=2))
    assert [int(np.asarray(b["x"])[0, 0]) for b in out] == list(range(5))
    assert all(isinstance(b["x"], jax.Array) and b["x"].sharding == sharding for b in out)


def test_reads_at_most_size_batches_ahead():
    taken = []

    def source():
        for i in range(100):
            taken.append(i)
            yield i

    batches = prefetch_to_device(source(), lambda b: b, size=3)
    assert next(batches) == 0
    time.sleep(0.5)  # room for the thread to run ahead as far as it may (an upper bound: no timing assertion)
    # one handed out, `size` queued, and one more in the thread's hands, waiting for room
    assert len(taken) <= 1 + 3 + 1
    batches.close()


def test_an_error_reaches_the_consumer_at_its_batch():
    def source():
        yield 1
        yield 2
        raise OSError("disk gone")

    batches = prefetch_to_device(source(), lambda b: b, size=2)
    assert next(batches) == 1 and next(batches) == 2
    with pytest.raises(OSError, match="disk gone"):
        next(batches)


def test_closing_stops_the_thread():
    def endless():
        while True:
            yield 0

    others = set(threading.enumerate())  # another test's prefetch thread may still be winding down
    batches = prefetch_to_device(endless(), lambda b: b, size=2)
    next(batches)
    running = [thread for thread in set(threading.enumerate()) - others if thread.name == "prefetch_to_device"]
    assert running and all(thread.is_alive() for thread in running)
    batches.close()
    for thread in running:
        thread.join(timeout=60)
        assert not thread.is_alive()


def test_rejects_a_size_below_one():
    with pytest.raises(ValueError, match="prefetch size"):
        next(prefetch_to_device(iter([1]), lambda b: b, size=0))


def test_closing_waits_for_the_batch_in_transfer():
    """The loop closes the generator before it returns, so no transfer is still running when the
    interpreter exits (that aborts the process)."""
    in_transfer = threading.Event()

    def slow_transfer(batch):
        in_transfer.set()
        time.sleep(0.5)
        return batch

    others = set(threading.enumerate())  # another test's prefetch thread may still be winding down
    batches = prefetch_to_device(iter(range(10)), slow_transfer, size=1)
    next(batches)
    in_transfer.wait()
    batches.close()
    assert not any(t.is_alive() for t in set(threading.enumerate()) - others if t.name == "prefetch_to_device")


def test_reads_before_the_first_batch_is_asked_for_and_closes_untouched():
    """The loop compiles the step meanwhile; a run that stops before its first step still closes it."""
    reading = threading.Event()

    def source():
        reading.set()
        yield from range(10)

    others = set(threading.enumerate())
    batches = prefetch_to_device(source(), lambda b: b, size=2)
    assert reading.wait(timeout=60)
    batches.close()
    assert not any(t.is_alive() for t in set(threading.enumerate()) - others if t.name == "prefetch_to_device")
    assert list(batches) == []
