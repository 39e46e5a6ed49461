"""The store of compiled steps: a matching key loads without tracing, any change compiles anew,
a bad file is compiled around, and nothing it did not write is run. (A real restart through it:
test_train_loop's SIGKILL test.)"""
import logging
import os
import pathlib
import pickle

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache
from jax.sharding import NamedSharding, PartitionSpec

from shunted_jax.train import compilation_cache, console, workarounds


def scaled(x, y):
    return x * y + 1


def fresh_step():
    """A new function each time: JAX's in-memory caches cannot hand back an earlier executable."""
    return jax.jit(lambda x, y: scaled(x, y))


def inputs(n: int = 8):
    return jnp.arange(n, dtype=jnp.float32), jnp.full((n,), 2.0, jnp.float32)


def config(scale: float = 1.0):
    return ml_collections.ConfigDict({"model": {"scale": scale}, "seed": 0})


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty store, and JAX's persistent cache writing nothing meanwhile: whatever compiles here
    compiles afresh in any later test run."""
    monkeypatch.setattr(compilation_cache, "steps_dir", lambda: tmp_path)
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    yield tmp_path
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


def on_a_permuted_mesh(x):
    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.array(devices[1:] + devices[:1]), ("data",))
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))


@pytest.mark.parametrize("place", [lambda x: x, on_a_permuted_mesh], ids=["one device", "a permuted mesh"])
def test_a_saved_step_is_loaded_without_tracing_and_computes_the_same(store, place):
    x, y = map(place, inputs())
    first = compilation_cache.compiled_step(fresh_step(), (x, y), name="step", config=config())
    assert len(list(store.glob("step-*.step"))) == 1

    class Untraceable:
        def lower(self, *args):
            raise AssertionError("traced although the store holds the step")

    loaded = compilation_cache.compiled_step(Untraceable(), (x, y), name="step", config=config())
    np.testing.assert_array_equal(loaded(x, y), first(x, y))
    np.testing.assert_array_equal(loaded(x, y), scaled(x, y))


def test_the_key_changes_with_config_context_arguments_name_settings_and_flags(store, monkeypatch):
    x, y = inputs()
    base = compilation_cache.program_key("step", config(), (x, y))
    assert compilation_cache.program_key("step", config(), (x, y)) == base
    assert compilation_cache.program_key("step", config(scale=2.0), (x, y)) != base
    assert compilation_cache.program_key("step", config(), (x, y), {"steps_per_epoch": 10}) != base
    with jax.default_matmul_precision("highest"):
        assert compilation_cache.program_key("step", config(), (x, y)) != base
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
    assert compilation_cache.program_key("step", config(), (x, y)) != base
    monkeypatch.delenv("XLA_FLAGS")
    assert compilation_cache.program_key("eval", config(), (x, y)) != base
    assert compilation_cache.program_key("step", config(), inputs(16)) != base
    assert compilation_cache.program_key("step", config(), (x.astype(jnp.bfloat16), y)) != base
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    split = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    assert compilation_cache.program_key("step", config(), (split, y)) != base


def test_the_key_changes_with_the_source_and_not_with_editors_files(tmp_path, monkeypatch):
    package = tmp_path / "package"
    (package / "models").mkdir(parents=True)
    (package / "models" / "layers.py").write_text("SCALE = 1\n")
    monkeypatch.setattr(compilation_cache, "PACKAGE_DIR", package)
    before = compilation_cache.program_key("step", config(), inputs())
    (package / "models" / ".#layers.py").symlink_to(tmp_path / "an editor's lock, pointing nowhere")
    assert compilation_cache.program_key("step", config(), inputs()) == before
    (package / "models" / "layers.py").write_text("SCALE = 2\n")
    assert compilation_cache.program_key("step", config(), inputs()) != before


def test_a_file_that_does_not_load_is_reported_and_replaced(store, caplog):
    x, y = inputs()
    key = compilation_cache.program_key("step", config(), (x, y))
    (store / f"step-{key}.step").write_bytes(b"half a file")
    with caplog.at_level(logging.WARNING):
        compiled = compilation_cache.compiled_step(fresh_step(), (x, y), name="step", config=config())
    assert "could not load the compiled step" in caplog.text
    np.testing.assert_array_equal(compiled(x, y), scaled(x, y))
    reloaded = compilation_cache.compiled_step(fresh_step(), (x, y), name="step", config=config())
    np.testing.assert_array_equal(reloaded(x, y), scaled(x, y))
    assert [p.name for p in store.iterdir()] == [f"step-{key}.step"]


def test_the_store_follows_jaxs_cache_and_is_off_without_it_or_without_jit(tmp_path, caplog):
    before = jax.config.jax_compilation_cache_dir
    jitted = jax.jit(scaled)
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        assert compilation_cache.steps_dir() == tmp_path / "steps"
        with jax.disable_jit():
            assert compilation_cache.compiled_step(jitted, inputs(), name="step", config=config()) is jitted
        jax.config.update("jax_compilation_cache_dir", None)
        assert compilation_cache.steps_dir() is None
        uncached = compilation_cache.compiled_step(jitted, inputs(), name="step", config=config())
        assert "compiling" not in caplog.text
        with caplog.at_level(logging.INFO):
            np.testing.assert_array_equal(uncached(*inputs()), scaled(*inputs()))
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    assert not (tmp_path / "steps").exists()
    assert "compiling the step; JAX's compilation cache is off, so the first compile takes a while" in caplog.text
    assert "compiled the step in" in caplog.text


def compiled_twice(store, step, args):
    """`step()` compiled for `args`, the store emptied, and compiled again: the second time JAX's
    persistent cache serves it."""
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.compiled_step(step(), args, name="step", config=config())
    for path in store.iterdir():
        path.unlink()
    return compilation_cache.compiled_step(step(), args, name="step", config=config())


def subtract_three():
    return jax.jit(lambda x, y: x * y - 3)


@pytest.fixture
def empty_jax_cache(tmp_path_factory):
    """JAX's persistent cache in a directory of its own, empty."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax")))
    jax_compilation_cache.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", before)
    jax_compilation_cache.reset_cache()


def test_a_compile_is_announced_and_timed_and_called_slow_only_when_jaxs_cache_lacks_it(store, empty_jax_cache,
                                                                                        caplog):
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    x, y = inputs()
    with caplog.at_level(logging.INFO):
        compilation_cache.compiled_step(fresh_step(), (x, y), name="step", config=config(), what="the step of a test")
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == "compiling the step of a test"
    assert lines[1] == "JAX's compilation cache does not hold it: the first compile takes a while (minutes for a large model)"
    assert lines[2].startswith("compiled the step of a test in ")
    caplog.clear()
    for path in store.iterdir():
        path.unlink()
    with caplog.at_level(logging.INFO):
        compilation_cache.compiled_step(fresh_step(), (x, y), name="step", config=config(), what="the step of a test")
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == "compiling the step of a test"
    assert lines[1].startswith("loaded the step of a test from JAX's compilation cache in ")
    assert not any("takes a while" in line or "CACHE MISS" in line for line in lines)


def test_a_step_served_by_jaxs_cache_is_not_kept_on_the_cpu(store):
    """XLA:CPU serializes an executable that JAX's cache loaded without its functions (running
    it fails with "Function ... not found"), so on the CPU only freshly compiled steps are kept."""
    x, y = inputs()
    served = compiled_twice(store, subtract_three, (x, y))
    assert list(store.iterdir()) == []
    np.testing.assert_array_equal(served(x, y), x * y - 3)


def test_a_kept_step_that_does_not_run_is_deleted_and_compiled_instead(store, monkeypatch, caplog):
    """With the CPU listed as keeping served steps, the store keeps XLA:CPU's broken copy: loaded,
    it fails on its first call, and the step is compiled instead, once."""
    monkeypatch.setattr(workarounds, "PLATFORMS_KEEPING_SERVED_STEPS", ("cpu",))
    x, y = inputs()
    compiled_twice(store, subtract_three, (x, y))
    [path] = store.iterdir()
    loaded = compilation_cache.compiled_step(subtract_three(), (x, y), name="step", config=config())
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(loaded(x, y), x * y - 3)
    assert "does not run" in caplog.text and not path.exists()
    np.testing.assert_array_equal(loaded(x, y), x * y - 3)


def test_a_kept_step_that_fails_after_taking_donated_arguments_stops_the_run(store, monkeypatch):
    """The train state is donated: a failed first call has consumed it, so it cannot be retried."""
    monkeypatch.setattr(workarounds, "PLATFORMS_KEEPING_SERVED_STEPS", ("cpu",))
    x, y = inputs()

    def donating():
        return jax.jit(lambda x, y: x * y - 3, donate_argnums=0)

    compiled_twice(store, donating, (jnp.arange(8, dtype=jnp.float32), y))
    [path] = store.iterdir()
    loaded = compilation_cache.compiled_step(donating(), (x, y), name="step", config=config())
    with pytest.raises(console.RunError, match="donated arguments"):
        loaded(jnp.arange(8, dtype=jnp.float32), y)
    assert not path.exists()


def fake_device(platform: str, version: str):
    client = type("Client", (), {"platform": platform, "platform_version": version})()
    return type("Device", (), {"client": client})()


@pytest.mark.parametrize("platform, version, name", [("gpu", "cuda 12080", "cuda"), ("gpu", "rocm 60342", "rocm"),
                                                     ("gpu", "<unknown>", "gpu"), ("tpu", "PJRT C API", "tpu")])
def test_the_platform_names_a_gpus_runtime(platform, version, name):
    """JAX calls CUDA and ROCm devices both "gpu"; only CUDA was checked to keep served steps."""
    assert workarounds.platform_name(fake_device(platform, version)) == name
    assert workarounds.platform_name(jax.devices()[0]) == jax.default_backend() == "cpu"


class Planted:
    """A pickle that, when loaded, creates the directory `marker`: proof that its code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant_over_the_kept_step(store, tmp_path) -> pathlib.Path:
    """Compiles a step once, then replaces the file the store kept by a pickle that runs code;
    returns where that code would leave its mark."""
    x, y = inputs()
    compilation_cache.compiled_step(fresh_step(), (x, y), name="step", config=config())
    [kept] = [p for p in store.iterdir() if p.is_file()]
    marker = tmp_path / "planted_code_ran"
    kept.write_bytes(pickle.dumps(Planted(marker)))
    return marker


def test_the_store_is_created_private(tmp_path, monkeypatch):
    monkeypatch.setattr(compilation_cache, "steps_dir", lambda: tmp_path / "cache" / "steps")
    compilation_cache.compiled_step(fresh_step(), inputs(), name="step", config=config())
    assert (tmp_path / "cache" / "steps").stat().st_mode & 0o777 == 0o700
    assert len(list((tmp_path / "cache" / "steps").iterdir())) == 1


def test_a_pickle_in_place_of_a_kept_step_is_never_unpickled(store, tmp_path, caplog):
    """Only JAX's payload, after our JSON header, is unpickled: a bare pickle does not load."""
    marker = plant_over_the_kept_step(store, tmp_path)
    x, y = inputs()
    with caplog.at_level(logging.WARNING):
        compiled = compilation_cache.compiled_step(fresh_step(), (x, y), name="step", config=config())
    assert not marker.exists()
    assert "could not load the compiled step" in caplog.text
    np.testing.assert_array_equal(compiled(x, y), scaled(x, y))


@pytest.mark.parametrize("make_untrusted", ["others can write", "another user owns"])
def test_a_directory_others_can_write_or_own_is_not_read(store, tmp_path, caplog, make_untrusted):
    marker = plant_over_the_kept_step(store, tmp_path)
    if make_untrusted == "others can write":
        store.chmod(0o777)
    else:
        if os.geteuid() != 0:
            # chown to another user needs root; CI and the development machine run as root, so
            # there it runs. The "others can write" case checks the same refusal without root.
            pytest.skip("giving a directory to another user needs root")
        os.chown(store, 12345, -1)
    files_before = sorted(p.name for p in store.iterdir())
    x, y = inputs()
    with caplog.at_level(logging.WARNING):
        compiled = compilation_cache.compiled_step(fresh_step(), (x, y), name="step", config=config())
    assert not marker.exists()
    np.testing.assert_array_equal(compiled(x, y), scaled(x, y))
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.startswith("not using the store of compiled steps") and str(store) in warning
    assert ("others can write" if make_untrusted == "others can write" else "another user") in warning
    assert sorted(p.name for p in store.iterdir()) == files_before  # nothing written there either


def test_a_file_that_does_not_load_is_deleted_even_when_the_step_is_not_kept_again(store):
    """On the CPU a step that JAX's cache served is not kept: the bad file must go all the same,
    or every start would warn about it."""
    x, y = inputs()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    subtract_three().lower(x, y).compile()  # now in JAX's persistent cache
    key = compilation_cache.program_key("step", config(), (x, y))
    (store / f"step-{key}.step").write_bytes(compilation_cache.FILE_MAGIC + b"{truncated")
    compiled = compilation_cache.compiled_step(subtract_three(), (x, y), name="step", config=config())
    np.testing.assert_array_equal(compiled(x, y), x * y - 3)
    assert list(store.iterdir()) == []


def test_the_output_tree_is_spelled_out_from_the_arguments_trees():
    """A train step's outputs: (the state, shaped like argument 0, and a dict of metrics)."""
    state = {"params": {"w": 1.0, "b": (2.0, None)}, "step": 3}
    batch = {"image": 1, "label": 2}
    argument_trees = [jax.tree.structure(state), jax.tree.structure(batch)]
    outputs = jax.tree.structure((state, {"loss": 0.0, "lr": 0.0}, [None, 1]))
    description = compilation_cache.describe_tree(outputs, argument_trees)
    assert description == {"tuple": [{"argument": 0}, {"dict": {"loss": "leaf", "lr": "leaf"}},
                                     {"list": [None, "leaf"]}]}
    assert compilation_cache.tree_from_description(description, argument_trees) == outputs
    with pytest.raises(compilation_cache.UnkeepableStep):
        compilation_cache.describe_tree(jax.tree.structure(jax.tree_util.Partial(scaled, 1.0)), argument_trees)
