"""Where a trained variant's heads look: its weights from the run's checkpoint, one evaluation image,
and the attention probabilities each stage's last block sows, cut to their key grids."""
import math
import pathlib

import jax
import numpy as np

from shunted_jax import data, train
from shunted_jax.tools.ablate.results import EVALUATOR
from shunted_jax.train import checkpoint, evaluators

MAPS_PER_STAGE = 6


def trained_variables(config, workdir) -> dict:
    """The weights the run's final evaluation used (its latest checkpoint), on one device whatever
    mesh saved them."""
    with checkpoint.make_checkpoint_manager(pathlib.Path(workdir) / "checkpoints", config.checkpoint) as manager:
        saved = checkpoint.load_state(manager)
    return train.TrainState(**saved).variables(use_ema=config.ema_decay > 0)


def evaluation_image(config, index: int = 0):
    """(image HxWx3 as the evaluator's model sees it, after its host and device preprocessing,
    label) of one evaluation example."""
    seen = 0
    for batch in data.eval_iterator(evaluators.eval_data_config(config, EVALUATOR), global_batch_size=100):
        count = int(batch["mask"].sum())
        if index < seen + count:
            row = index - seen
            image = evaluators.eval_images(config.evals[EVALUATOR].device_pp, batch["image"][row:row + 1])[0]
            return np.asarray(image), int(batch["label"][row])
        seen += count
    raise IndexError(f"The evaluation split has {seen} examples, not {index + 1}.")


def attention_probabilities(model, variables, image) -> dict:
    """{'block1': (probs, ...), ...}: per stage, one (heads, queries, keys) array per SSA group or
    branch, from the last block of the stage, for one image."""
    def forward(variables, images):
        return model.apply(variables, images, mutable=["intermediates"])[1]["intermediates"]

    sown = jax.jit(forward)(variables, image[None])
    return {name: tuple(np.asarray(probs[-1, 0]) for probs in sown[name]["attn"]["attention_probs"])
            for name in sorted(sown)}


def key_grid(num_keys: int, query_grid) -> tuple:
    """The (rows, cols) of a reduced key map: the factorisation of `num_keys` closest to the query
    grid's aspect (keys are the reduced map row-major)."""
    rows, cols = query_grid
    shapes = [(h, num_keys // h) for h in range(1, num_keys + 1) if num_keys % h == 0]
    return min(shapes, key=lambda shape: abs(math.log(shape[0] / shape[1]) - math.log(rows / cols)))


def attention_rows(probabilities: dict, stage_grids) -> list:
    """One row per stage: (title, query grid, [(title, key map)] for each group and head, as the
    centre query sees them); at most MAPS_PER_STAGE maps a row."""
    rows = []
    for (block, groups), grid in zip(probabilities.items(), stage_grids):
        centre = (grid[0] // 2) * grid[1] + grid[1] // 2
        maps = []
        for g, probs in enumerate(groups, start=1):
            keys = key_grid(probs.shape[-1], grid)
            group = f"group {g}, " if len(groups) > 1 else ""
            maps += [(f"{group}{keys[0]}x{keys[1]} keys, head {head + 1}", probs[head, centre].reshape(keys))
                     for head in range(len(probs))]
        rows.append((f"stage {block[len('block'):]}: {grid[0]}x{grid[1]} queries", grid, maps[:MAPS_PER_STAGE]))
    return rows
