"""Config files check their argument: unknown keys, variants and demos fail at once, naming the valid
choices; every variant and demo of every family loads."""
import os
import pathlib
import subprocess
import sys

import pytest

from shunted_jax.train import load_config_file

REPO = pathlib.Path(__file__).resolve().parent.parent
FAMILY_ARGUMENTS = {
    "shunted_t": ["", "demo"],
    "shunted_s": [""],
    "shunted_b": [""],
    "pvt_v2": ["", *(f"variant={v}" for v in ("b0", "b1", "b2", "b2_li", "b3", "b4", "b5"))],
    "vit": ["", "demo", "variant=ti16", "variant=s16", "variant=s16,demo"],
}


def load(family: str, arg: str = ""):
    return load_config_file(f"{REPO / 'configs' / family}.py" + (f":{arg}" if arg else ""))


@pytest.mark.parametrize("family,arg", [(f, a) for f, args in FAMILY_ARGUMENTS.items() for a in args])
def test_every_variant_and_demo_loads(family, arg):
    config = load(family, arg)
    assert config.model.name.startswith(family)
    if "variant=" in arg:
        assert config.model.name.endswith(arg.split("variant=")[1].split(",")[0])
    assert config.data.name == ("fashion_mnist_demo" if "demo" in arg else "imagenet2012")
    assert list(config.evals) == ["val"] and "eval_split" not in config.data


def test_shunted_s_demo_fails_naming_the_valid_choices():
    with pytest.raises(ValueError, match="shunted_s.py: unknown argument 'demo'; valid arguments: none"):
        load("shunted_s", "demo")


def test_an_unknown_variant_fails_naming_the_valid_ones():
    with pytest.raises(ValueError, match="unknown variant 'b9'; choose one of b0, b1, b2, b2_li, b3, b4, b5"):
        load("pvt_v2", "variant=b9")


@pytest.mark.parametrize("family,arg", [("shunted_t", "dmeo"), ("vit", "varient=s16"), ("pvt_v2", "variant=b2,demo")])
def test_a_misspelled_or_unknown_key_fails_naming_the_valid_ones(family, arg):
    with pytest.raises(ValueError, match=f"unknown argument '{arg.split(',')[-1].split('=')[0]}'; valid arguments: "):
        load(family, arg)


def test_a_flag_takes_no_other_value():
    assert not load("shunted_t", "demo=false").data.name.startswith("fashion")
    with pytest.raises(ValueError, match="demo is a flag"):
        load("shunted_t", "demo=yes")


@pytest.mark.parametrize("arg,message", [("demo", "unknown argument 'demo'"), ("variant=b9", "unknown variant 'b9'")])
def test_train_py_stops_with_the_valid_choices(arg, message, tmp_path):
    family = "shunted_s" if arg == "demo" else "pvt_v2"
    result = subprocess.run([sys.executable, str(REPO / "train.py"), f"--config={REPO / 'configs' / family}.py:{arg}",
                             f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode != 0 and message in result.stderr
    assert not (tmp_path / "checkpoints").exists()
