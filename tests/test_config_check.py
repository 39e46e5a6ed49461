"""The training config is checked before anything is built: every field with a valid range, the
model, the op strings; each bad field one line. Error messages name fields the configs have."""
import ast
import pathlib
import re

import pytest

from shunted_jax import config_ranges
from shunted_jax.data import config as data_config
from shunted_jax.train import config_check, load_config_file, loop

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG_FILES = ["shunted_t.py", "shunted_t.py:demo", "shunted_s.py", "shunted_b.py", "pvt_v2.py:variant=b0",
                "vit.py:variant=s16", "vit.py:demo"]


def demo_config():
    config = load_config_file(str(REPO / "configs" / "shunted_t.py") + ":demo")
    config.unlock()
    config.data.update({"name": "synthetic", "num_classes": 10, "num_train_examples": 64, "num_eval_examples": 16})
    config.compilation_cache_dir = ""
    return config


# Every range a training config is checked against: its own and its (synthetic) data section's.
ALL_RANGES = {**config_check.RANGES,
              **{f"data.{name}": valid for name, valid in {**data_config.RANGES, **data_config.SYNTHETIC_RANGES}.items()}}


def out_of_range(valid: config_ranges.Range, current):
    """A value of `current`'s type just outside `valid`."""
    if valid.low is not None:
        value = valid.low - (0 if valid.open_low else 1) - (1 if valid.special and valid.low - 1 in valid.special else 0)
    else:
        value = valid.high + 1
    return type(current)(value)


@pytest.mark.parametrize("field", sorted(ALL_RANGES))
def test_each_field_out_of_range_is_named_with_its_value_and_range(field):
    config = demo_config()
    value = out_of_range(ALL_RANGES[field], config_ranges.field_value(config, field))
    config.update_from_flattened_dict({field: value})
    with pytest.raises(config_check.ConfigError) as error:
        config_check.check(config)
    assert str(error.value) == f"config.{field}={value!r} is out of range; valid: {ALL_RANGES[field]}"


def test_every_bad_field_is_one_line_and_a_negative_learning_rate_stops_before_anything_is_built(tmp_path):
    config = demo_config()
    config.optimizer.base_lr = -1.0
    config.mixup.prob = 1.5
    config.model.drop_path_rate = float("nan")
    config.evals.val.every_epochs = 0.0
    with pytest.raises(config_check.ConfigError) as error:
        loop.train_and_evaluate(config, tmp_path / "w")
    assert str(error.value).splitlines() == [
        "config.optimizer.base_lr=-1.0 is out of range; valid: > 0",
        "config.mixup.prob=1.5 is out of range; valid: [0, 1]",
        "config.model.drop_path_rate=nan is out of range; valid: [0, 1)",
        "config.evals.val.every_epochs=0.0 is out of range; valid: > 0 (or set config.evals.val.every_steps > 0)"]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("field, value, message", [
    ("model.name", "shunted_xl", "config.model.name='shunted_xl' is not a model: choose one of pvt_v2_b0, "),
    ("model.kernels", "attention=fast", "config.model: "),
    ("data.image_size", 16, "config.data.image_size=16 is smaller than the 31 pixels shunted_t"),
    ("data.device_pp_train", "value_range(0,1)|normalise", "config.data.device_pp_train='value_range(0,1)|normalise': "
                                                          "unknown device op 'normalise'"),
    ("evals.val.device_pp", "bogus", "config.evals.val.device_pp='bogus': unknown device op 'bogus'"),
    ("compiler_options", "xla_flag", "config.compiler_options='xla_flag': compiler option 'xla_flag'"),
    ("data.synthetic_dtype", "float16", "data.synthetic_dtype must be one of"),
])
def test_names_and_strings_that_cannot_run_are_named(field, value, message):
    config = demo_config()
    config.update_from_flattened_dict({field: value})
    with pytest.raises(config_check.ConfigError, match=re.escape(message)):
        config_check.check(config)


def test_a_misspelled_host_preprocessing_op_is_named_when_files_are_read():
    config = demo_config()
    config.data.name = "fashion_mnist_demo"
    config.data.pp_train = "decode_uint8|resize(32)|flipp"
    with pytest.raises(config_check.ConfigError, match=r"config.data.pp_train='.*': unknown preprocessing op 'flipp'"):
        config_check.check(config)


def test_every_config_file_passes():
    for spec in CONFIG_FILES:
        config_check.check(load_config_file(str(REPO / "configs" / spec)))


# A field path in a message: a section and its fields ("data.eval_split", "evals.NAME.split"), or
# config.<top-level field>. Placeholders ({} from f-strings, NAME, <name>) stand for any evaluator.
SECTIONS = ("data", "optimizer", "mixup", "checkpoint", "mesh", "evals", "model", "distributed")
FIELD_PATH = re.compile(rf"(?<![\w.])(?:config\.)?((?:{'|'.join(SECTIONS)})(?:\.(?:\w+|{{}}|<\w+>))+)"
                        r"|(?<![\w.])config\.(\w+)")
# A file name in the checkpoint converter's messages, and a module's constants.
NOT_FIELDS = {"model.json", "data.config.HOST_PP_"}


def message_texts(tree) -> list[str]:
    """The strings of raise statements, of exceptions made and of warning/error/exit calls; an
    f-string's replacement fields become {}."""
    def text(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):
            return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        return None

    def called(node) -> str:
        return getattr(node.func, "attr", getattr(node.func, "id", "")) if isinstance(node, ast.Call) else ""

    roots = [node for node in ast.walk(tree) if isinstance(node, ast.Raise)
             or called(node) in ("warning", "error", "exception", "exit") or called(node).endswith("Error")]
    return [t for root in roots for node in ast.walk(root) if (t := text(node)) is not None]


def known_fields() -> set:
    """Every dotted field of the training configs; an evaluator's fields under each of NAME, <name>,
    {}; and model.{}, a message's name for whichever model field it is about (`models.create`
    takes every field of the model)."""
    fields = {"model.{}"}
    for spec in CONFIG_FILES:
        flat = load_config_file(str(REPO / "configs" / spec)).to_dict()
        stack = [("", flat)]
        while stack:
            prefix, node = stack.pop()
            for key, value in node.items():
                path = f"{prefix}{key}"
                fields.add(path)
                if isinstance(value, dict):
                    stack.append((f"{path}.", value))
                    if key == "evals":
                        for evaluator in value.values():
                            for placeholder in ("NAME", "<name>", "{}"):
                                fields.add(f"evals.{placeholder}")
                                fields.update(f"evals.{placeholder}.{k}" for k in evaluator)
    return fields


def test_error_messages_name_only_fields_the_training_configs_have():
    fields = known_fields()
    named = []
    for path in sorted([*(REPO / "shunted_jax").rglob("*.py"), *(REPO / "configs").glob("*.py"), REPO / "train.py"]):
        for message in message_texts(ast.parse(path.read_text())):
            for match in FIELD_PATH.finditer(message):
                field = match.group(1) or match.group(2)
                if field not in NOT_FIELDS:
                    named.append((path.relative_to(REPO), field))
    unknown = [f"{path}: {field}" for path, field in named if field not in fields]
    assert named and not unknown, unknown
    assert {field for _, field in named} >= {"data.name", "evals.NAME.split", "data.holdout_fraction"}
