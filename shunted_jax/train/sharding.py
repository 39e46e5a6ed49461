"""Device mesh, parameter sharding (replicated or FSDP) and assembly of global batches."""
import math
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
# The batch is split over every device: both mesh axes.
BATCH_SPEC = PartitionSpec(MESH_AXES)


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (all of them by default); data=-1 takes what fsdp leaves."""
    devices = list(jax.devices() if devices is None else devices)
    fsdp = mesh_config.fsdp
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must be a positive divisor of the {len(devices)} devices")
    data = len(devices) // fsdp if mesh_config.data == -1 else mesh_config.data
    if data * fsdp != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not cover the {len(devices)} devices")
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def _is_stacked(path) -> bool:
    """Whether a leaf belongs to blocks stacked by nn.scan ("block1".."block4", or "blocks"), whose
    leading axis is the depth."""
    return any(re.fullmatch(r"blocks?\d*", str(getattr(entry, "key", ""))) for entry in path)


def fsdp_spec(path, shape, fsdp_size: int, min_shard_size: int) -> PartitionSpec:
    """Shards the largest dimension divisible by `fsdp_size` over "fsdp", or replicates.

    Leaves smaller than `min_shard_size` elements stay replicated. The leading depth axis of stacked
    block parameters is used only when no other dimension divides.
    """
    if fsdp_size == 1 or math.prod(shape) < min_shard_size:
        return PartitionSpec()
    first = 1 if _is_stacked(path) and len(shape) > 1 else 0
    candidates = [d for d in range(first, len(shape)) if shape[d] % fsdp_size == 0]
    if not candidates and first == 1 and shape[0] % fsdp_size == 0:
        candidates = [0]
    if not candidates:
        return PartitionSpec()
    dim = max(candidates, key=lambda d: shape[d])
    return PartitionSpec(*([None] * dim), "fsdp")


def state_sharding(abstract_state, mesh: Mesh, min_shard_size: int = 2 ** 12):
    """NamedShardings for every leaf of a (possibly abstract) pytree: FSDP when mesh has fsdp > 1.

    Optimizer moments carry the parameter names in their paths, so they shard like their parameters.
    """
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, fsdp_spec(path, np.shape(leaf), fsdp_size, min_shard_size)),
        abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict, sharding: NamedSharding, process_count: int) -> dict:
    """Assembles each process's local numpy batch into global arrays sharded over the batch axis."""
    def to_global(array):
        array = np.asarray(array)
        shape = (array.shape[0] * process_count, *array.shape[1:])
        return jax.make_array_from_process_local_data(sharding, array, shape)
    return {name: to_global(value) for name, value in local_batch.items()}
