"""Config files read the way `train.py --config path[:arg]` reads them, for tools without absl flags."""
import pathlib
import runpy
import sys


def load_config_file(spec: str):
    """get_config(arg) (or get_config()) of the config file `path[:arg]`, e.g. "configs/vit.py:demo".

    Config files import their siblings as `configs.*`, so the folder above theirs goes on sys.path.
    """
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Config file {path} not found from {pathlib.Path.cwd()}: give a path that exists "
                                "(relative paths start at the current directory, e.g. the repository root).")
    root = str(file.resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    get_config = runpy.run_path(str(file))["get_config"]
    return get_config(arg) if arg else get_config()
