"""Global batches put on the devices by a background thread, `size` steps ahead of the step.

The step is asynchronous, so the Python loop is free while the accelerator computes; what is left
on the loop's critical path is the host batch and its copy to the devices. A thread that keeps
the next batches on the devices takes both off it. big_vision's `input_pipeline.start_global`
also keeps global arrays for `jax.jit` ahead of the step, but makes them on the loop's thread (its
copies are asynchronous, its host batches are not). The thread starts at once, as big_vision's
`warmup` starts its pipeline, so that the first batches are read while the step compiles.
"""
import queue
import threading
from typing import Callable, Iterator

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class DevicePrefetch:
    """Yields `to_device(batch)` for each batch, computed up to `size` batches ahead by a daemon
    thread that starts when this is made.

    An error in the source or the transfer is raised in the consumer, at the batch where it
    happened. `close` stops the thread after at most one more batch and waits for it: call it
    before the process exits (the loop does), whether or not a batch was taken.
    """

    def __init__(self, batches: Iterator[dict], to_device: Callable[[dict], dict], size: int):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._ready: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(batches, to_device), name="prefetch_to_device",
                                        daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, batches, to_device) -> None:
        try:
            for batch in batches:
                if not self._put(to_device(batch)):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            self._put(_Failure(error))
            return
        self._put(_DONE)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        item = self._ready.get() if not self._stop.is_set() else _DONE
        if item is _DONE or isinstance(item, _Failure):
            self.close()
            if item is _DONE:
                raise StopIteration
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()  # a transfer cut off by the interpreter's exit aborts the process


prefetch_to_device = DevicePrefetch
