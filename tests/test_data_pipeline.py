"""train_iterator / eval_iterator on synthetic data and on the Fashion-MNIST demo (a real tfds dataset)."""
import ast
import collections
import gzip
import pathlib
import re
import subprocess
import sys
import traceback

import jax
import numpy as np
import pytest
from helpers.data import demo_data_dir, small_config  # noqa: F401  (demo_data_dir is a fixture)

from shunted_jax import data
from shunted_jax.data import config, device_ops, pipeline, registry
from shunted_jax.data.fashion_mnist_demo import DEBIAN_DIR, read_idx
from shunted_jax.data.sources import DatasetNotPreparedError
from shunted_jax.data.tf_import import tensorflow, tensorflow_datasets

PLAIN_PP = "decode|resize(32)|value_range(0,1)|normalize"


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same_batches(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_package_and_synthetic_data_need_no_tensorflow():
    code = (
        "import sys; from shunted_jax import data; cfg = data.default_config(); cfg.name = 'synthetic';"
        "next(data.train_iterator(cfg, 4)); list(data.eval_iterator(cfg, 4)); data.dataset_info(cfg);"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_synthetic_train_makes_its_batch_once_and_resumes(dtype):
    cfg = small_config(name="synthetic", num_classes=7, synthetic_dtype=dtype)
    batches = take(data.train_iterator(cfg, 16, process_index=1, process_count=2), 3)
    assert batches[0]["image"].shape == (8, 32, 32, 3) and batches[0]["image"].dtype == np.dtype(dtype)
    assert batches[0]["label"].dtype == np.int32 and batches[0]["label"].max() < 7
    assert all(b["image"] is batches[0]["image"] and b["label"] is batches[0]["label"] for b in batches)
    assert not batches[0]["image"].flags.writeable
    assert_same_batches(take(data.train_iterator(cfg, 16, 1, 2, start_step=5), 1), batches[:1])
    other_process = next(data.train_iterator(cfg, 16, 0, 2))
    assert not np.array_equal(other_process["image"], batches[0]["image"])


def collect_eval(cfg, global_batch, process_count):
    per_process = [list(data.eval_iterator(cfg, global_batch, index, process_count)) for index in range(process_count)]
    assert len({len(batches) for batches in per_process}) == 1, "every process must yield the same number of batches"
    labels = [b["label"][b["mask"]] for batches in per_process for b in batches]
    return per_process, np.concatenate(labels)


def test_synthetic_eval_counts_every_example_once():
    cfg = small_config(name="synthetic", num_eval_examples=50)
    per_process, labels = collect_eval(cfg, 12, 3)
    assert len(labels) == 50
    _, single = collect_eval(cfg, 12, 1)
    assert collections.Counter(labels.tolist()) == collections.Counter(single.tolist())
    last = per_process[2][-1]
    assert last["mask"].dtype == np.bool_ and not last["mask"].all()
    partial = per_process[0][-1]
    assert 0 < partial["mask"].sum() < len(partial["mask"])
    assert (partial["image"][~partial["mask"]] == 0).all() and partial["image"][partial["mask"]].any(axis=(1, 2, 3)).all()


@pytest.mark.parametrize("global_batch, processes, suggested", [(10, 3, 12), (0, 1, 1)])
def test_batch_size_must_divide_among_processes(global_batch, processes, suggested):
    for iterator in (data.train_iterator, data.eval_iterator):
        with pytest.raises(ValueError, match=f"global_batch_size={global_batch} must be a positive multiple of "
                                             f"{processes}: .* choose e.g. {suggested}"):
            iterator(small_config(name="synthetic"), global_batch, 0, processes)


@pytest.mark.parametrize("batch, processes, devices, accumulation, multiple", [
    (24, 1, 8, 1, 8), (16, 1, 8, 2, 16), (24, 3, 2, 1, 6), (36, 2, 4, 3, 12)])
def test_one_check_splits_a_batch_over_micro_batches_devices_and_processes(batch, processes, devices, accumulation,
                                                                          multiple):
    data.check_batch_size(batch, processes, devices, accumulation)
    with pytest.raises(ValueError, match=f"eval_batch_size={batch + processes} must be a positive multiple of "
                                         f"{multiple}: {accumulation} micro-batch.* {devices} devices.* "
                                         f"{processes} process"):
        data.check_batch_size(batch + processes, processes, devices, accumulation, name="eval_batch_size")


def test_steps_per_epoch_counts_whole_global_batches():
    assert data.steps_per_epoch(100, 32) == 3
    with pytest.raises(ValueError, match="8 examples: too few for one global batch of 16"):
        data.steps_per_epoch(8, 16)


@pytest.mark.parametrize("overrides", [{"name": "synthetic"}, {"name": "synthetic", "synthetic_dtype": "float32"},
                                       {}, {"pp_train": PLAIN_PP}], ids=["synthetic uint8", "synthetic float32",
                                                                         "demo uint8", "demo float32"])
def test_the_train_batch_spec_is_what_the_iterators_yield_over_all_processes(demo_data_dir, overrides):
    cfg = small_config(data_dir=demo_data_dir, **overrides)
    local = next(data.train_iterator(cfg, 8, 1, 2))
    assert local["image"].shape[0] == 4
    assert data.train_batch_spec(cfg, 8) == {name: ((8, *array.shape[1:]), array.dtype) for name, array in local.items()}


def test_a_training_string_of_no_fixed_size_says_how_to_fix_it(demo_data_dir):
    with pytest.raises(ValueError, match=r"unknown shape \(None, None, 3\); end it with a fixed-size op"):
        data.train_batch_spec(small_config(data_dir=demo_data_dir, pp_train="decode_uint8"), 8)


def test_bad_config_values_fail_early():
    with pytest.raises(ValueError, match="on_corrupt"):
        data.dataset_info(small_config(name="synthetic", on_corrupt="ignore"))
    with pytest.raises(ValueError, match="repeated_aug"):
        data.train_iterator(small_config(name="synthetic", repeated_aug=0), 8)
    with pytest.raises(ValueError, match="process_index"):
        data.eval_iterator(small_config(name="synthetic"), 8, 2, 2)
    with pytest.raises(ValueError, match="synthetic_dtype"):
        data.train_iterator(small_config(name="synthetic", synthetic_dtype="float16"), 8)


def test_demo_dataset_is_a_real_tfds_dataset(demo_data_dir):
    info = data.dataset_info(small_config(data_dir=demo_data_dir))
    assert info == data.DatasetInfo(num_classes=10, num_train_examples=60_000, num_eval_examples=10_000, image_size=32)
    builder = tensorflow_datasets().builder("fashion_mnist_demo", data_dir=demo_data_dir)
    assert builder.is_prepared() and builder.info.features["image"].shape == (28, 28, 1)


def test_demo_train_batches_are_uint8_rgb_that_the_device_ops_normalise(demo_data_dir):
    batch = next(data.train_iterator(small_config(data_dir=demo_data_dir), 32))
    assert batch["image"].shape == (32, 32, 32, 3) and batch["image"].dtype == np.uint8
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])  # grey, repeated
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert set(batch["label"].tolist()) <= set(range(10)) and len(set(batch["label"].tolist())) > 3
    keys = device_ops.example_keys(jax.random.key(0), 0, np.arange(32))
    normalised = np.asarray(device_ops.build(device_ops.EVAL_PP)(batch["image"], keys))
    assert -3 < normalised.mean() < 3 and 0.3 < normalised.std() < 3


def test_a_script_that_ends_holding_its_iterators_exits(demo_data_dir):
    """Splits of a few batches through the PIL resize (a tf.numpy_function), each iterator read
    partly (the training one past an epoch's end) and still held when the script ends."""
    cfg = small_config(data_dir=demo_data_dir, train_split="train[:64]", eval_split="test[:48]",
                       pp_train="decode_uint8|resize(32)|flip_lr", pp_eval="decode_uint8|resize(32)")
    code = ("from shunted_jax import data; cfg = data.default_config(); "
            f"cfg.update({cfg.to_dict()!r}); train = data.train_iterator(cfg, 8); "
            "batches = [next(train) for _ in range(10)]; evaluation = data.eval_iterator(cfg, 16); next(evaluation); "
            "print('read', len(batches) + 1)")
    # A hang is for ever; the script takes seconds, minutes on a loaded machine.
    result = subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(__file__).parents[1], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "read 11", result.stderr[-2000:]


def test_resume_matches_an_uninterrupted_run_across_epochs(demo_data_dir):
    cfg = small_config(data_dir=demo_data_dir, train_split="train[:96]")
    uninterrupted = take(data.train_iterator(cfg, 32), 8)
    assert_same_batches(take(data.train_iterator(cfg, 32, start_step=4), 4), uninterrupted[4:])
    epoch_labels = [np.concatenate([b["label"] for b in uninterrupted[e * 3 : e * 3 + 3]]) for e in range(2)]
    assert sorted(epoch_labels[0]) == sorted(epoch_labels[1]), "each epoch sees the same 96 examples"
    assert not np.array_equal(epoch_labels[0], epoch_labels[1]), "in a new order"


def test_batches_do_not_depend_on_the_number_of_threads(demo_data_dir):
    serial = take(data.train_iterator(small_config(data_dir=demo_data_dir, num_parallel_calls=1), 16), 2)
    parallel = take(data.train_iterator(small_config(data_dir=demo_data_dir, num_parallel_calls=-1, prefetch=-1), 16), 2)
    assert_same_batches(serial, parallel)


def test_seed_changes_order_and_augmentation(demo_data_dir):
    first = next(data.train_iterator(small_config(data_dir=demo_data_dir, seed=1), 16))
    second = next(data.train_iterator(small_config(data_dir=demo_data_dir, seed=2), 16))
    assert not np.array_equal(first["image"], second["image"])


def test_processes_read_disjoint_training_examples(demo_data_dir):
    cfg = small_config(data_dir=demo_data_dir, train_split="train[:64]", pp_train=PLAIN_PP)
    epochs = [take(data.train_iterator(cfg, 32, index, 2), 2) for index in range(2)]
    seen = [{image.tobytes() for batch in epoch for image in batch["image"]} for epoch in epochs]
    assert epochs[0][0]["image"].shape == (16, 32, 32, 3)
    assert len(seen[0]) == len(seen[1]) == 32 and not seen[0] & seen[1]


def test_repeated_augmentation_repeats_each_example_with_new_augmentations(demo_data_dir):
    plain = small_config(data_dir=demo_data_dir, pp_train=PLAIN_PP, repeated_aug=3)
    images = next(data.train_iterator(plain, 30))["image"]
    np.testing.assert_array_equal(images[0::3], images[1::3])
    np.testing.assert_array_equal(images[0::3], images[2::3])
    augmented = next(data.train_iterator(small_config(data_dir=demo_data_dir, repeated_aug=3), 30))
    assert np.array_equal(augmented["label"][0::3], augmented["label"][1::3])
    assert not np.array_equal(augmented["image"][0::3], augmented["image"][1::3])


def test_demo_through_the_uint8_host_strings(demo_data_dir):
    cfg = small_config(data_dir=demo_data_dir, pp_train=config.HOST_PP_DEMO_TRAIN, pp_eval=config.HOST_PP_DEMO_EVAL,
                       eval_split="test[:20]")
    train = next(data.train_iterator(cfg, 16))
    evaluated = next(data.eval_iterator(cfg, 16))
    for batch in (train, evaluated):
        assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.uint8
        assert batch["image"].max() > 200


def decode_ops_in(function) -> int:
    """How many decoding ops the traced graph of `function` holds, in cond branches too."""
    graph = function.graph.as_graph_def()
    nodes = list(graph.node) + [node for f in graph.library.function for node in f.node_def]
    return sum(node.op.startswith("Decode") for node in nodes)


def test_repeated_augmentation_decodes_each_record_once():
    tf = tensorflow()
    preprocess = registry.build(config.HOST_PP_TRAIN.format(image_size=32))
    signature = (tf.TensorSpec([], tf.int64), {"image": tf.TensorSpec([], tf.string), "label": tf.TensorSpec([], tf.int32)})
    counts = {
        (repeats, decode_once): decode_ops_in(tf.function(
            pipeline.record_copies(preprocess, repeats, decode_once, tf.constant(0, tf.int64))
        ).get_concrete_function(*signature))
        for repeats, decode_once in ((3, True), (3, False), (1, True))
    }
    assert counts[3, True] == 1, "one decode for the three copies"
    assert counts[3, False] == 3 * counts[1, True] > 0, "the reference decodes each copy"


def test_repeated_copies_come_from_one_image_with_their_own_crop_and_flip(demo_data_dir):
    """Decoding once gives exactly the batches of decoding every copy (PNG: no fused JPEG crop)."""
    cfg = small_config(data_dir=demo_data_dir, pp_train="decode_and_inception_crop(32)|flip_lr", repeated_aug=3)
    once = take(pipeline.train_batches(cfg, 12, 0, 1, 0), 2)
    every_copy = take(pipeline.train_batches(cfg, 12, 0, 1, 0, decode_once=False), 2)
    assert_same_batches(once, every_copy)
    images, labels = once[0]["image"], once[0]["label"]
    assert images.dtype == np.uint8 and np.array_equal(labels[0::3], labels[2::3])
    for record in range(4):
        copies = images[3 * record : 3 * record + 3]
        assert len({copy.tobytes() for copy in copies}) == 3


@pytest.mark.parametrize("start_step", [1, 2, 3])
def test_resume_inside_a_repeated_record_matches_an_uninterrupted_run(demo_data_dir, start_step):
    """Batches of 4 with 3 copies per record: most resume points fall inside a record."""
    cfg = small_config(data_dir=demo_data_dir, train_split="train[:30]", repeated_aug=3, pp_train=config.HOST_PP_DEMO_TRAIN)
    uninterrupted = take(data.train_iterator(cfg, 4), 9)
    assert_same_batches(take(data.train_iterator(cfg, 4, start_step=start_step), 9 - start_step), uninterrupted[start_step:])


def test_demo_eval_counts_every_example_once_over_processes(demo_data_dir):
    cfg = small_config(data_dir=demo_data_dir, eval_split="test[:100]")
    per_process, labels = collect_eval(cfg, 24, 3)
    assert len(labels) == 100 and per_process[0][0]["image"].shape == (8, 32, 32, 3)
    expected = tensorflow_datasets().load("fashion_mnist_demo", split="test[:100]", data_dir=demo_data_dir)
    assert collections.Counter(labels.tolist()) == collections.Counter(int(ex["label"]) for ex in expected)
    padding = per_process[2][-1]
    assert not padding["mask"].all() and (padding["image"][~padding["mask"]] == 0).all()


def test_eval_defaults_to_the_test_split_when_there_is_no_validation(demo_data_dir):
    assert data.dataset_info(small_config(data_dir=demo_data_dir, eval_split="")).num_eval_examples == 10_000
    with pytest.raises(ValueError, match="no evaluation split 'validation'"):
        data.dataset_info(small_config(data_dir=demo_data_dir, eval_split="validation"))


def test_a_bad_preprocessing_string_fails_before_iterating(demo_data_dir):
    with pytest.raises(ValueError, match="unknown preprocessing op 'blur'"):
        data.train_iterator(small_config(data_dir=demo_data_dir, pp_train="decode|blur(3)"), 8)


def test_a_host_string_naming_a_device_op_fails_in_one_line_before_the_run_starts(demo_data_dir):
    """dataset_info, which a training run calls before its slow initialisation, parses the strings;
    in a fresh interpreter, where nothing else has imported the host ops yet."""
    code = (
        "from shunted_jax import data\n"
        "for field in ('pp_train', 'pp_eval'):\n"
        f"    cfg = data.default_config(); cfg.data_dir = {demo_data_dir!r}\n"
        "    cfg[field] = 'decode_uint8|resize(32)|randaug(2,9,0.5)'\n"
        "    try:\n"
        "        data.dataset_info(cfg)\n"
        "    except ValueError as err:\n"
        "        print(repr(str(err)))\n"
    )
    lines = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.splitlines()
    assert len(lines) == 2, lines
    for line in lines:
        message = ast.literal_eval(line)
        assert "\n" not in message
        assert re.match(r"'randaug\(2,9,0\.5\)' in .* is not a preprocessing op: put it in the device ops, "
                        r"data\.device_pp_train", message), message


def test_unprepared_and_unknown_datasets_say_what_to_do(tmp_path):
    with pytest.raises(DatasetNotPreparedError, match="ILSVRC2012_img_train.tar") as err:
        data.train_iterator(small_config(name="imagenet2012", data_dir=str(tmp_path)), 8)
    assert "python -m shunted_jax.data.prepare --name imagenet2012" in str(err.value)


def test_an_unknown_dataset_name_is_one_short_error(tmp_path):
    with pytest.raises(ValueError, match="data.name='no_such_dataset_xyz'") as err:
        data.dataset_info(small_config(name="no_such_dataset_xyz", data_dir=str(tmp_path)))
    message = str(err.value)
    assert len(message.splitlines()) < 10
    assert all(name in message for name in (config.DEMO_NAME, config.SYNTHETIC_NAME, "folder:", "tfds.list_builders()"))
    shown = "".join(traceback.format_exception(err.value))
    assert "cifar10" not in shown, "tfds' list of every dataset reaches the user"


def write_idx(path, array: np.ndarray) -> None:
    """A gzipped uint8 IDX file, the format of the Fashion-MNIST files."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_building_a_dataset_draws_no_progress_bars_into_a_log(tmp_path):
    """tfds' bars redraw many times a second: in a log file (no terminal) each redraw stays."""
    from shunted_jax.data.fashion_mnist_demo import SPLIT_FILES

    rng = np.random.default_rng(0)
    for images, labels in SPLIT_FILES.values():
        write_idx(tmp_path / images, rng.integers(0, 256, (20, 28, 28)))
        write_idx(tmp_path / labels, rng.integers(0, 10, (20,)))
    result = subprocess.run([sys.executable, "-m", "shunted_jax.data.prepare", "--name", config.DEMO_NAME,
                             "--data_dir", str(tmp_path / "tfds"), "--manual_dir", str(tmp_path)],
                            capture_output=True, text=True, check=True)
    assert "prepared fashion_mnist_demo" in result.stdout
    assert "examples/s" not in result.stderr and "Generating" not in result.stderr


@pytest.mark.parametrize("damage", ["empty", "not gzip", "truncated data", "cut gzip"])
def test_a_damaged_demo_file_is_named_with_what_is_wrong(tmp_path, damage):
    source = pathlib.Path(DEBIAN_DIR) / "t10k-labels-idx1-ubyte.gz"
    broken = tmp_path / source.name
    if damage == "empty":
        broken.write_bytes(b"")
    elif damage == "not gzip":
        broken.write_bytes(b"plain text")
    elif damage == "truncated data":
        broken.write_bytes(gzip.compress(gzip.decompress(source.read_bytes())[:500]))
    else:
        broken.write_bytes(source.read_bytes()[:-20])
    with pytest.raises(ValueError, match=f"^{broken} .*(truncated|not a readable gzip|no IDX header)"):
        read_idx(str(broken))
