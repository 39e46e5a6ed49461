"""The command line: python -m shunted_jax.tools.ablate --setting small|demo|full --out DIR ..."""
import argparse

from shunted_jax import models
from shunted_jax.tools import ablate
from shunted_jax.tools.ablate.run import run_ablation
from shunted_jax.tools.ablate.variants import ABLATIONS_FILE


def main(argv=None):
    parser = argparse.ArgumentParser(description=ablate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="small", help="a setting of the ablations file: small, demo, full")
    parser.add_argument("--out", required=True, help="folder for the runs, the table and the plots")
    parser.add_argument("--variants", default="", help="comma-separated labels (default: all)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="config overrides for every variant, e.g. num_train_steps=500")
    parser.add_argument("--ablations", default=ABLATIONS_FILE, help="the file of settings and variants")
    parser.add_argument("--image-index", type=int, default=0, help="which test image the attention maps show")
    args = parser.parse_args(argv)
    labels = [label.strip() for label in args.variants.split(",") if label.strip()]
    outcome = run_ablation(args.setting, args.out, labels, models.parse_overrides(args.set), args.ablations,
                           args.image_index)
    print(outcome["markdown"])
    print("wrote " + ", ".join(str(path) for path in outcome["paths"].values()))


if __name__ == "__main__":
    main()
