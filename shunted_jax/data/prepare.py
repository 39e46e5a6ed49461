"""Prepares a tfds dataset once, before training:

    python -m shunted_jax.data.prepare --name imagenet2012 --data_dir ~/tensorflow_datasets --manual_dir ~/imagenet_tars

For imagenet2012, manual_dir holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar.
"""
import argparse

from shunted_jax.data import config as config_lib


def prepare(name: str, data_dir: str, manual_dir: str = "") -> str:
    """Builds dataset `name` into data_dir (a no-op if already there); returns where it is."""
    from shunted_jax.data.sources import prepare_builder
    from shunted_jax.data.tf_import import tensorflow_datasets

    if name == config_lib.DEMO_NAME:
        from shunted_jax.data import fashion_mnist_demo  # noqa: F401  (registers the builder)
    builder = tensorflow_datasets().builder(name, data_dir=data_dir)
    prepare_builder(builder, manual_dir)
    return str(builder.data_dir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="tfds name, e.g. imagenet2012 or fashion_mnist_demo")
    parser.add_argument("--data_dir", default=config_lib.default_data_dir(), help="where the prepared dataset goes")
    parser.add_argument("--manual_dir", default="", help="folder with manually downloaded files (ImageNet's tars)")
    args = parser.parse_args(argv)
    print(f"prepared {args.name} in {prepare(args.name, args.data_dir, args.manual_dir)}")


if __name__ == "__main__":
    main()
