"""Where a training stream stands, counted in examples, so that a run resumed with another batch
size (or dataset size) goes on with the next unseen example instead of the step's.

An epoch keeps `steps_per_epoch * global_batch_size` examples of its shuffled order (the few left
over are dropped); a position is an epoch and the number of its kept examples already trained on.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class StreamPosition:
    epoch: int = 0
    example: int = 0

    @classmethod
    def at_step(cls, step: int, steps_per_epoch: int, global_batch_size: int) -> "StreamPosition":
        """Where an uninterrupted run with these sizes stands after `step` steps."""
        return cls(step // steps_per_epoch, step % steps_per_epoch * global_batch_size)

    def fitted(self, steps_per_epoch: int, global_batch_size: int) -> "StreamPosition":
        """This position in epochs of these sizes: one with no whole batch left in its epoch moves
        to the start of the next."""
        if steps_per_epoch * global_batch_size - self.example < global_batch_size:
            return StreamPosition(self.epoch + 1, 0)
        return self

    def advanced(self, steps: int, steps_per_epoch: int, global_batch_size: int) -> "StreamPosition":
        """Where the stream stands `steps` batches after this (fitted) position: the batches left in
        this epoch, then whole epochs."""
        left = (steps_per_epoch * global_batch_size - self.example) // global_batch_size
        if steps < left:
            return StreamPosition(self.epoch, self.example + steps * global_batch_size)
        steps -= left
        return StreamPosition(self.epoch + 1 + steps // steps_per_epoch,
                              steps % steps_per_epoch * global_batch_size)
