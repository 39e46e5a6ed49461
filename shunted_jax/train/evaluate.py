"""Top-1/top-5 evaluation over a finite, padded eval iterator: every example counted exactly once."""
import jax
import numpy as np

from shunted_jax.train import sharding


def evaluate(eval_step, state, batches, batch_sharding, process_count: int) -> dict:
    """Runs `eval_step` over all batches and returns top1, top5 (fractions), loss (mean) and count.

    Padding examples have mask False and are excluded; every process must yield as many batches.
    """
    totals = {"top1": 0.0, "top5": 0.0, "loss": 0.0, "count": 0.0}
    for local_batch in batches:
        sums = jax.device_get(eval_step(state, sharding.global_batch(local_batch, batch_sharding,
                                                                      process_count)))
        for key in totals:
            totals[key] += float(np.asarray(sums[key], np.float64))
    count = totals["count"]
    if count == 0:
        raise ValueError("the eval iterator yielded no examples")
    return {"top1": totals["top1"] / count, "top5": totals["top5"] / count,
            "loss": totals["loss"] / count, "count": int(count)}
