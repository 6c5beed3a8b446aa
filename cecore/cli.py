"""The ``cecore`` command: ``cecore demo``, ``cecore score``, ``cecore info``.

Each subcommand lives in its own module, which provides ``configure_parser(parser)`` and
``run(args) -> int`` (the exit code); modules are imported only when their command runs.
"""

import argparse
import importlib
import sys

_COMMANDS = {
    "demo": ("cecore.demo", "train SoftmaxClassifier on built-in data and compare with scikit-learn"),
    "score": ("cecore.batch", "score logits stored on disk (.npy/.npz) in bounded memory"),
    "info": ("cecore.cli", "show the available backends, threads and build flags"),
}


def configure_parser(parser):
    """``cecore info`` takes no options."""


def run(args):
    from . import show_config

    show_config()
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="cecore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the chosen command's module is imported (the others would only slow start-up).
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, (module_name, help_text) in _COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.configure_parser(command)
            command.set_defaults(_module=module)
    args = parser.parse_args(argv)
    return args._module.run(args)


if __name__ == "__main__":
    sys.exit(main())
