"""Compiled steps kept between runs, so that a restarted run starts training in seconds.

Two layers. JAX's persistent compilation cache saves XLA's compile (a minute for a large model on
a GPU), but its key is the lowered program, so every run still traces and lowers its step: seconds
of Python, more than the cache load itself. The store of whole steps beside it (`compiled_step`)
keeps the compiled step under a key made of everything that decides the program, and a run whose
key matches loads it without tracing. This is what maxtext's ahead-of-time compilation does with
`jax.experimental.serialize_executable`; here the key is computed, so no user has to manage files.
"""
import contextlib
import hashlib
import importlib.metadata
import json
import logging as python_logging
import os
import pathlib
import pickle
import sys
import tempfile
import time

import jax
from absl import logging
from jax.experimental import serialize_executable

from shunted_jax.train import console

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "shunted_jax", "jax")
# Programs that compile faster than this are not worth a file each.
MIN_COMPILE_SECONDS = 1.0
STEPS_SUBDIR = "steps"
PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1]
# JAX settings that change where programs are kept or what is logged, not the programs.
_NEUTRAL_SETTINGS = ("cache", "log_compiles", "explain", "debug_log")
# Environment variables that change what XLA compiles.
_COMPILER_ENV = ("XLA_", "LIBTPU_", "TPU_", "NVIDIA_TF32_OVERRIDE")
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
# Where an executable that JAX's cache loaded serializes whole. XLA:CPU serializes one without its
# functions (the copy fails when run); a CUDA one runs (BENCHMARKS.md, session 15). ROCm and TPUs
# are unchecked, so their served steps are not kept.
PLATFORMS_KEEPING_SERVED_STEPS = ("cuda",)
# JAX logs this (at DEBUG) just before it compiles a program that its persistent cache does not hold.
_COMPILER_LOGGER = "jax._src.compiler"
_CACHE_MISS_MESSAGE = "PERSISTENT COMPILATION CACHE MISS"
_SLOW = "the first compile takes a while (minutes for a large model)"


def enable(directory: str) -> None:
    """Caches compiled programs in `directory` (a leading ~ is expanded). An empty `directory`
    leaves JAX's own setting as it is: off, unless $JAX_COMPILATION_CACHE_DIR or an earlier
    `jax.config.update` chose one. Call before the first compile."""
    if directory:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)


def steps_dir():
    """Where whole compiled steps are kept: beside JAX's persistent cache, whenever one is on."""
    directory = jax.config.jax_compilation_cache_dir
    return pathlib.Path(directory) / STEPS_SUBDIR if directory else None


def platform_name(device) -> str:
    """Where `device` runs: "cpu", "tpu", or a GPU's runtime ("cuda", "rocm"), as JAX names both
    GPU platforms "gpu"; a GPU of another runtime stays "gpu"."""
    client = device.client
    version = client.platform_version.lower()
    runtime = next((name for name in ("cuda", "rocm") if name in version), "gpu")
    return runtime if client.platform == "gpu" else client.platform


def _describe_argument(leaf) -> tuple:
    sharding = getattr(leaf, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    device_ids = tuple(int(d.id) for d in mesh.devices.flat) if mesh is not None else None
    return str(jax.typeof(leaf)), repr(sharding), device_ids


def _source_digest() -> str:
    """The package's Python files; editors' lock and backup files (dot names) and anything that is
    not a regular file are skipped."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        relative = path.relative_to(PACKAGE_DIR)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            digest.update(str(relative).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def program_key(name: str, config, args, context=None) -> str:
    """A hash of what decides the program a step lowers to: its name and config, `context` (what
    else the step was built from, e.g. the dataset's size in the learning-rate schedule), the types
    and shardings of its arguments, the devices, this package's files, every installed
    distribution's version, the Python version, JAX's settings and XLA's environment. A change to
    any of them gives another key; code defined or patched at run time is not among them."""
    leaves, treedef = jax.tree.flatten(args)
    settings = {k: v for k, v in jax.config.values.items() if not any(n in k for n in _NEUTRAL_SETTINGS)}
    client = jax.devices()[0].client
    parts = {
        "name": name,
        "config": config.to_json_best_effort(sort_keys=True),
        "context": context,
        "arguments": [str(treedef), [_describe_argument(leaf) for leaf in leaves]],
        "devices": [client.platform, client.platform_version,
                    [(d.id, d.process_index, d.device_kind) for d in jax.devices()]],
        "source": _source_digest(),
        "distributions": sorted((d.metadata["Name"], d.version) for d in importlib.metadata.distributions()),
        "python": sys.version,
        "settings": sorted((k, repr(v)) for k, v in settings.items()),
        "environment": sorted((k, v) for k, v in os.environ.items() if k.startswith(_COMPILER_ENV)),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()


def _load(path: pathlib.Path):
    payload, in_tree, out_tree, device_ids = pickle.loads(path.read_bytes())
    devices = {device.id: device for device in jax.devices()}
    return serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                     execution_devices=[devices[i] for i in device_ids])


def _save(compiled, path: pathlib.Path) -> None:
    """Written to a temporary file and renamed, so that concurrent runs never read half a file."""
    device_ids = [device.id for device in compiled.runtime_executable().local_devices()]
    blob = pickle.dumps((*serialize_executable.serialize(compiled), device_ids))
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(blob)
        os.replace(temporary, path)
    finally:
        pathlib.Path(temporary).unlink(missing_ok=True)


@contextlib.contextmanager
def _counting_cache_hits():
    """Yields a list that gains an entry for each program JAX's persistent cache serves meanwhile,
    in any thread (a hit elsewhere only means a step is not kept that could have been)."""
    hits = []

    def listener(event, **kwargs):
        if event == CACHE_HIT_EVENT:
            hits.append(event)

    jax.monitoring.register_event_listener(listener)
    try:
        yield hits
    finally:
        jax.monitoring.unregister_event_listener(listener)


class _CacheMissWatch(python_logging.Filter):
    """Calls `on_miss` at the first cache miss JAX logs; lets through only the records that the
    logger let through before it was opened to DEBUG for this."""

    def __init__(self, on_miss, threshold: int):
        super().__init__()
        self._on_miss = on_miss
        self._threshold = threshold

    def filter(self, record: python_logging.LogRecord) -> bool:
        if self._on_miss is not None and record.getMessage().startswith(_CACHE_MISS_MESSAGE):
            self._on_miss()
            self._on_miss = None
        return record.levelno >= self._threshold


@contextlib.contextmanager
def _on_cache_miss(callback):
    """Calls `callback` when, meanwhile, JAX's persistent cache misses a program it is about to compile."""
    logger = python_logging.getLogger(_COMPILER_LOGGER)
    level = logger.level
    watch = _CacheMissWatch(callback, logger.getEffectiveLevel())
    logger.addFilter(watch)
    logger.setLevel(python_logging.DEBUG)
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.removeFilter(watch)


@contextlib.contextmanager
def announced_compile(what: str):
    """Says what is compiled before it is; that the compile takes a while once JAX's persistent cache
    turns out not to hold it (at once when the cache is off); after it, how long it took. Yields the
    list of the cache's hits meanwhile (`_counting_cache_hits`)."""
    if jax.config.jax_compilation_cache_dir:
        logging.info("compiling %s", what)
    else:
        logging.info("compiling %s; JAX's compilation cache is off, so %s", what, _SLOW)
    start = time.perf_counter()
    with _counting_cache_hits() as hits, _on_cache_miss(lambda: logging.info("JAX's compilation cache does not "
                                                                             "hold it: %s", _SLOW)):
        yield hits
    seconds = time.perf_counter() - start
    if hits:
        logging.info("loaded %s from JAX's compilation cache in %.1f s", what, seconds)
    else:
        logging.info("compiled %s in %.1f s", what, seconds)


def announce_first_call(step, what: str):
    """`step` (jitted, so compiled by its first call) with that first call announced by `announced_compile`."""
    first_call = True

    def announced(*args):
        nonlocal first_call
        if not first_call:
            return step(*args)
        first_call = False
        with announced_compile(what):
            return step(*args)

    return announced


def _falling_back(loaded, jitted, path: pathlib.Path, name: str):
    """`loaded`, unless XLA cannot run it on the first call: then the file is deleted and `jitted`
    takes over (compiling on its call), so a bad file costs one compile rather than every restart.
    A failed call that had already taken donated arguments (the train state) cannot be repeated:
    then the run stops with a `RunError`, and the next run compiles."""
    first_call = True

    def step(*args):
        nonlocal first_call
        if not first_call:
            return loaded(*args)
        try:
            result = loaded(*args)
        except jax.errors.JaxRuntimeError as error:
            path.unlink(missing_ok=True)
            if any(leaf.is_deleted() for leaf in jax.tree.leaves(args) if isinstance(leaf, jax.Array)):
                raise console.RunError(f"the compiled {name} loaded from {path} does not run ({error}) and had "
                                       "already taken its donated arguments; the file is deleted, so running "
                                       "again compiles the step") from error
            logging.warning("the compiled %s loaded from %s does not run (%s); deleted it, compiling the step",
                            name, path, error)
            return jitted(*args)
        first_call = False
        return result

    return step


def compiled_step(jitted, args, *, name: str, config, context=None, what: str = ""):
    """`jitted` compiled for `args` (arrays or `jax.ShapeDtypeStruct`s, positional): loaded from
    the store when a run with the same `program_key` saved it, otherwise compiled (through JAX's
    persistent cache, `announced_compile` saying so as `what`, by default the name) and saved
    there, unless JAX's cache served it on a platform outside `PLATFORMS_KEEPING_SERVED_STEPS`.
    Without a cache directory or with several processes (each would load its own part; JAX's
    persistent cache serves them) this is `jitted` with its first call announced
    (`announce_first_call`); with jit disabled, `jitted` as it is.

    The store's files are pickles, trusted like JAX's cache: keep the directory private. A file
    that cannot be loaded, run or written is reported, deleted where it is bad, and compiled around
    (`_falling_back` says when a run must stop instead).
    """
    what = what or f"the {name}"
    directory = steps_dir()
    if jax.config.jax_disable_jit:
        return jitted
    if directory is None or jax.process_count() > 1:
        return announce_first_call(jitted, what)
    try:
        path = directory / f"{name}-{program_key(name, config, args, context)}.pkl"
    except Exception as error:  # e.g. a package file that vanished while it was read
        logging.warning("could not compute the key of the %s (%s); it is not kept", name, error)
        return announce_first_call(jitted, what)
    if path.exists():
        try:
            loaded = _load(path)
        except Exception as error:  # a file from an interrupted or incompatible writer
            logging.warning("could not load the compiled %s from %s (%s); compiling it", name, path, error)
        else:
            logging.info("loaded the compiled %s from %s", name, path)
            return _falling_back(loaded, jitted, path, name)
    with announced_compile(what) as hits:
        compiled = jitted.lower(*args).compile()
    platform = platform_name(compiled.runtime_executable().local_devices()[0])
    if hits and platform not in PLATFORMS_KEEPING_SERVED_STEPS:
        logging.debug("the %s came from JAX's persistent cache, and %s is not known to serialize such a step "
                      "whole; it is not kept", name, platform)
        return compiled
    try:
        _save(compiled, path)
    except Exception as error:
        logging.warning("could not save the compiled %s to %s (%s); a restart will trace it again",
                        name, path, error)
    return compiled
