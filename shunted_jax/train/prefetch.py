"""Global batches put on the devices by a background thread, `size` steps ahead of the step.

The step is asynchronous, so the Python loop is free while the accelerator computes; what is left
on the loop's critical path is the host batch and its copy to the devices. A thread that keeps
the next batches on the devices takes both off it (as big_vision's and Flax's prefetch do; theirs
serve `pmap`'s per-device shards, this one the global arrays of a `jax.jit` over a mesh).
"""
import queue
import threading
from typing import Callable, Iterator

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch_to_device(batches: Iterator[dict], to_device: Callable[[dict], dict], size: int) -> Iterator[dict]:
    """Yields `to_device(batch)` for each batch, computed `size` batches ahead in a daemon thread.

    An error in the source or the transfer is raised in the consumer, at the batch where it
    happened. Closing the generator stops the thread after at most one more batch and waits for
    it: close it before the process exits (the loop does).
    """
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}")
    ready: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for batch in batches:
                if not put(to_device(batch)):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            put(_Failure(error))
            return
        put(_DONE)

    thread = threading.Thread(target=produce, name="prefetch_to_device", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()  # a transfer cut off by the interpreter's exit aborts the process
