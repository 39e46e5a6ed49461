"""Compiled steps kept between runs, so that a restarted run starts training in seconds.

Two layers. JAX's persistent compilation cache saves XLA's compile (a minute for a large model on
a GPU), but its key is the lowered program, so every run still traces and lowers its step: seconds
of Python, more than the cache load itself. The store of whole steps beside it (`compiled_step`)
keeps the compiled step under a key made of everything that decides the program, and a run whose
key matches loads it without tracing. This is what maxtext's ahead-of-time compilation does with
`jax.experimental.serialize_executable`; here the key is computed, so no user has to manage files.

A kept step is a program that runs with the user's rights, and JAX's serialization of it is a
pickle: the store is trusted as JAX's cache is, and no more. Its directory is created private
(0700); a directory or file that another user owns or that others can write is not read. A file
holds JAX's payload after one line of JSON (the devices, and the outputs' tree spelled out from the
arguments' trees), so nothing else in it is unpickled; a file that does not load is deleted.
"""
import contextlib
import hashlib
import importlib.metadata
import json
import logging as python_logging
import os
import pathlib
import stat
import sys
import tempfile
import time

import jax
from absl import logging
from jax.experimental import serialize_executable

from shunted_jax.train import console, workarounds

# Programs that compile faster than this are not worth a file each.
MIN_COMPILE_SECONDS = 1.0
STEPS_SUBDIR = "steps"
PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1]
# JAX settings that change where programs are kept or what is logged, not the programs.
_NEUTRAL_SETTINGS = ("cache", "log_compiles", "explain", "debug_log")
# Environment variables that change what XLA compiles.
_COMPILER_ENV = ("XLA_", "LIBTPU_", "TPU_", "NVIDIA_TF32_OVERRIDE")
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
# JAX logs this (at DEBUG) just before it compiles a program that its persistent cache does not hold.
_COMPILER_LOGGER = "jax._src.compiler"
_CACHE_MISS_MESSAGE = "PERSISTENT COMPILATION CACHE MISS"
_SLOW = "the first compile takes a while (minutes for a large model)"

# The first line of a kept step's file; the format changes with it.
FILE_MAGIC = b"shunted_jax compiled step 2\n"


class UnkeepableStep(ValueError):
    """A step whose outputs' tree cannot be spelled out in JSON: it is not kept."""


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
    """A hash of what decides the program a step lowers to: its name, `config` (the fields the
    program depends on: the train step's are `step.program_config`), `context` (what else the step
    was built from, e.g. the dataset's class count), the types and shardings of its arguments, the
    devices, this package's files, every installed distribution's version, the Python version, JAX's
    settings and XLA's environment. A change to any of them gives another key; values the step takes
    as arguments (e.g. the learning-rate schedule) and code defined or patched at run time are not
    among them."""
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


def untrusted(path: pathlib.Path) -> str | None:
    """Why the store must not read `path` (a directory or a file), or None: a program read from it
    runs with this user's rights, so it must be this user's and writable by nobody else."""
    status = path.stat()
    if status.st_uid != os.geteuid():
        return f"{path} belongs to another user (uid {status.st_uid}): use a compilation_cache_dir of your own"
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"others can write to {path} (mode {stat.S_IMODE(status.st_mode):o}): chmod go-w it, or delete it"
    return None


def private_directory(directory: pathlib.Path) -> str | None:
    """Creates `directory` private (0700) if it is missing; says why it cannot be trusted, or None."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return untrusted(directory)


def describe_tree(treedef, argument_trees) -> object:
    """`treedef` as JSON: a subtree shaped like argument i is {"argument": i}, tuples, lists, dicts
    with string keys and None are spelled out, a leaf is "leaf". Raises UnkeepableStep otherwise."""
    for index, argument in enumerate(argument_trees):
        if treedef == argument:
            return {"argument": index}
    node = treedef.node_data()
    if node is None:
        return "leaf"
    kind, keys = node
    children = [describe_tree(child, argument_trees) for child in treedef.children()]
    if kind is type(None):
        return None
    if kind in (tuple, list):
        return {kind.__name__: children}
    if kind is dict and all(isinstance(key, str) for key in keys):
        return {"dict": dict(zip(keys, children))}
    raise UnkeepableStep(f"an output of type {kind.__name__} is neither an argument's tree nor a plain container")


def _example(description, argument_trees):
    """A pytree whose structure `description` (of `describe_tree`) describes, with 0 as leaves."""
    if description is None:
        return None
    if description == "leaf":
        return 0
    [(kind, value)] = description.items()
    if kind == "argument":
        tree = argument_trees[value]
        return tree.unflatten([0] * tree.num_leaves)
    if kind == "dict":
        return {key: _example(child, argument_trees) for key, child in value.items()}
    return {"tuple": tuple, "list": list}[kind](_example(child, argument_trees) for child in value)


def tree_from_description(description, argument_trees):
    return jax.tree.structure(_example(description, argument_trees))


def _argument_trees(args) -> list:
    return [jax.tree.structure(arg) for arg in args]


def _in_tree(args):
    """The tree `serialize_executable` gives for positional `args`: (args, no keyword arguments)."""
    return jax.tree.structure((tuple(args), {}))


def _load(path: pathlib.Path, args):
    """The compiled step in `path`, for `args`: our JSON header is read first, and only JAX's own
    payload is unpickled (by `serialize_executable`)."""
    with path.open("rb") as file:
        if file.readline() != FILE_MAGIC:
            raise ValueError("not a compiled step written by this version")
        header = json.loads(file.readline())
        payload = file.read()
    devices = {device.id: device for device in jax.devices()}
    out_tree = tree_from_description(header["outputs"], _argument_trees(args))
    return serialize_executable.deserialize_and_load(payload, _in_tree(args), out_tree,
                                                     execution_devices=[devices[i] for i in header["devices"]])


def _save(compiled, args, path: pathlib.Path) -> None:
    """Written to a temporary file and renamed, so that concurrent runs never read half a file.
    Raises UnkeepableStep when the trees could not be rebuilt from the header and the arguments."""
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    outputs = describe_tree(out_tree, _argument_trees(args))
    if in_tree != _in_tree(args) or tree_from_description(outputs, _argument_trees(args)) != out_tree:
        raise UnkeepableStep("its trees cannot be rebuilt from its arguments")
    device_ids = [device.id for device in compiled.runtime_executable().local_devices()]
    header = json.dumps({"devices": device_ids, "outputs": outputs}).encode() + b"\n"
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(FILE_MAGIC + header + payload)
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
    there, unless JAX's cache served it where such a step is not kept (`workarounds.keeps_served_steps`).
    Without a cache directory or with several processes (each would load its own part; JAX's
    persistent cache serves them) this is `jitted` with its first call announced
    (`announce_first_call`); with jit disabled, `jitted` as it is.

    A store directory (or file) that `untrusted` refuses is neither read nor written: one warning,
    and the step compiles as usual. A file that cannot be loaded, run or written is reported,
    deleted where it is bad, and compiled around (`_falling_back` says when a run must stop instead).
    """
    what = what or f"the {name}"
    directory = steps_dir()
    if jax.config.jax_disable_jit:
        return jitted
    if directory is None or jax.process_count() > 1:
        return announce_first_call(jitted, what)
    try:
        path = directory / f"{name}-{program_key(name, config, args, context)}.step"
    except Exception as error:  # e.g. a package file that vanished while it was read
        logging.warning("could not compute the key of the %s (%s); it is not kept", name, error)
        return announce_first_call(jitted, what)
    try:
        refused = private_directory(directory) or (untrusted(path) if path.exists() else None)
    except OSError as error:  # e.g. a read-only cache
        refused = console.short_cause(error)
    if refused:
        logging.warning("not using the store of compiled steps: %s; compiling the %s", refused, name)
        return announce_first_call(jitted, what)
    if path.exists():
        try:
            loaded = _load(path, args)
        except Exception as error:  # a file from an interrupted or incompatible writer
            path.unlink(missing_ok=True)
            logging.warning("could not load the compiled %s from %s (%s); deleted it, compiling the step",
                            name, path, console.short_cause(error))
        else:
            logging.info("loaded the compiled %s from %s", name, path)
            return _falling_back(loaded, jitted, path, name)
    with announced_compile(what) as hits:
        compiled = jitted.lower(*args).compile()
    device = compiled.runtime_executable().local_devices()[0]
    if hits and not workarounds.keeps_served_steps(device):
        logging.debug("the %s came from JAX's persistent cache, and %s is not known to serialize such a step "
                      "whole; it is not kept", name, workarounds.platform_name(device))
        return compiled
    try:
        _save(compiled, args, path)
    except UnkeepableStep as error:
        logging.debug("the %s is not kept: %s", name, error)
    except Exception as error:
        logging.warning("could not save the compiled %s to %s (%s); a restart will trace it again",
                        name, path, error)
    return compiled
