"""The ``cecore`` command: ``cecore demo``, ``cecore score``, ``cecore info``.

All command-line code lives here; each command calls one library entry point
(:mod:`cecore.demo`, :func:`cecore.batch.score` or :func:`cecore._dask.score_files`,
:func:`cecore.show_config`), imported only when that command runs, so the command starts
fast and ``cecore score`` never imports scikit-learn.
"""

import argparse
import errno
import json
import os
import re
import signal
import sys
import threading
import warnings
import zipfile

from . import _config
from ._backends import BACKENDS


def _demo_parser(parser):
    from . import demo

    demo.configure_parser(parser)


def _demo(args):
    from . import demo

    return demo.run(args)


def _info_parser(parser):
    """``cecore info`` takes no options."""


def _info(args):
    from . import show_config

    show_config()
    return 0


def _parse_weight(text):
    import numpy as np

    from ._io import _split_member, load_small

    if os.path.exists(text) or _split_member(text)[1] is not None:  # a file, or FILE.npz:NAME
        return load_small(text, "--weight")
    try:
        return np.array([float(v) for v in text.split(",")], dtype=np.float64)
    except ValueError:
        raise ValueError(f"--weight {text!r} is neither a file nor a comma-separated list of numbers") from None


def _score_parser(parser):
    """Options of ``cecore score``."""
    parser.description = (
        "Score logits stored on disk against targets: mean cross-entropy (equal to "
        "cecore.cross_entropy on the whole array), perplexity, top-1 and top-k accuracy, "
        "mean entropy, expected calibration error and Brier score, all from one pass over "
        "chunks read so that memory stays within --memory-budget."
    )
    parser.add_argument("logits", nargs="?", help="(rows, classes) array: .npy, or .npz[:NAME] "
                        "(omitted with --hidden)")
    parser.add_argument("target", nargs="?", help="class indices (rows,) or probabilities (rows, classes): .npy, or .npz[:NAME]")
    parser.add_argument("--hidden", metavar="H.npy", help="score hidden states (rows, d) "
                        "through --unembedding instead of logits")
    parser.add_argument("--unembedding", metavar="W.npy",
                        help="(V, d) output layer for --hidden (memory-mapped once)")
    parser.add_argument("--bias", metavar="b.npy", help="(V,) output bias for --hidden")
    parser.add_argument("--input-kind", choices=("logits", "log_probs", "probs"), default="logits",
                        help="what LOGITS holds (default: logits)")
    parser.add_argument("--weight", metavar="FILE|W1,W2,...",
                        help="class weights: a .npy file, an .npz member (FILE.npz:NAME) "
                             "or a comma-separated list")
    parser.add_argument("--ignore-index", type=int, default=-100, help="target value to skip (default: -100)")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="in [0, 1] (default: 0)")
    parser.add_argument("--memory-budget", default=_config.DEFAULT_MEMORY_BUDGET,
                        help=f"memory for one chunk of rows, e.g. 256MB, 2GiB (default: {_config.DEFAULT_MEMORY_BUDGET})")
    parser.add_argument("--per-row-out", metavar="FILE.npy", help="write the per-row losses to this .npy file")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--top-k", type=int, default=5, metavar="K",
                        help="k of the top-k accuracy (default: 5)")
    parser.add_argument("--ece-bins", type=int, default=15, metavar="N",
                        help="confidence bins of the expected calibration error, 1 to "
                        "10000 (default: 15)")
    # Every metric now comes from the loss pass itself; kept for one release as a no-op.
    parser.add_argument("--no-accuracy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None,
                        help="kernel threads, at most the CPUs available (default: the "
                             "thread policy of cecore's functions: CECORE_NUM_THREADS, the "
                             "OpenMP limit, NUMBA_NUM_THREADS, else all CPUs available)")
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default="auto")
    dask = parser.add_mutually_exclusive_group()
    dask.add_argument("--dask", choices=("local",), help="score on a local Dask cluster started for this run")
    dask.add_argument("--scheduler", metavar="ADDRESS", help="score on the Dask cluster at ADDRESS (files must be visible to its workers)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes for --dask local (default: 2, or the CPUs "
                             "available if fewer)")


def _format_text(result):
    r = result

    def line(name, value, fmt):
        return f"{name:<14}{'-' if value is None or value != value else format(value, fmt)}"

    lines = [
        line("mean loss", r.mean_loss, ".6f"),
        line("perplexity", r.perplexity, ".4f"),
        line("accuracy", r.accuracy, ".4%"),
        line(f"top-{r.top_k} acc.", r.top_k_accuracy, ".4%"),
        line("mean entropy", r.mean_entropy, ".6f"),
        line("ECE", r.ece, ".6f"),
        line("Brier", r.brier, ".6f"),
        f"rows          {r.rows} ({r.rows_scored} scored, {r.rows_ignored} ignored)",
        f"time          {r.seconds:.2f} s ({r.rows_per_second:,.0f} rows/s, {r.gb_per_second:.2f} GB/s)",
    ]
    if r.per_row_out:
        lines.append(f"per-row loss  {r.per_row_out}")
    return "\n".join(lines)


def _inputs(args):
    """``(logits or hidden states, target, head options)`` from the command line."""
    given = [a for a in (args.logits, args.target) if a is not None]
    if args.hidden is None:
        if args.unembedding or args.bias:
            raise ValueError("--unembedding and --bias need --hidden")
        if len(given) != 2:
            raise ValueError("expected LOGITS and TARGET (see cecore score --help)")
        return given[0], given[1], {}
    if args.unembedding is None:
        raise ValueError("--hidden needs --unembedding W.npy")
    if len(given) != 1:
        raise ValueError("with --hidden give only TARGET")
    return args.hidden, given[0], {"unembedding": args.unembedding, "bias": args.bias}


# Python parameters whose checks' messages begin with their name, and their options.
_FLAGS = {"top_k": "--top-k", "n_bins": "--ece-bins", "label_smoothing": "--label-smoothing",
          "ignore_index": "--ignore-index", "n_threads": "--threads", "n_workers": "--workers"}
# Their checks' messages: "top_k must be ...", "ignore_index 2**70 does not fit ...",
# "n_threads=64 is more than ..." (a file named "top_k" must keep its name).
_PARAMETER_MESSAGE = re.compile(r"(%s)(?= must be | -?\d+ does not fit |=\d+ is more than )"
                                % "|".join(_FLAGS))


def _options_named(message):
    """``message`` with the Python parameter it begins with named as the option typed."""
    match = _PARAMETER_MESSAGE.match(message)
    if not match:
        return message
    rest = message[match.end():].replace("must be None, -1 or", "must be -1 or")
    return _FLAGS[match.group(1)] + (" " + rest[1:] if rest.startswith("=") else rest)


def _score_run(args):
    source, target, head = _inputs(args)
    weight = None if args.weight is None else _parse_weight(args.weight)
    options = dict(input_kind=args.input_kind, weight=weight, ignore_index=args.ignore_index,
                   label_smoothing=args.label_smoothing, backend=args.backend,
                   top_k=args.top_k, n_bins=args.ece_bins, **head)
    if args.workers is not None and not args.dask:
        raise ValueError("--workers is for --dask local (a --scheduler's cluster has its own)")
    if args.dask or args.scheduler is not None:
        if args.per_row_out:
            raise ValueError("--per-row-out is not supported with --dask/--scheduler")
        from . import _dask

        return _dask.score_files(source, target, scheduler=args.scheduler,
                                 n_workers=args.workers,
                                 memory_budget=args.memory_budget,
                                 n_threads=args.threads, **options)
    progress = not args.quiet and sys.stderr.isatty()
    weight_file = args.weight if args.weight and os.path.exists(args.weight) else None
    from .batch import score

    return score(source, target, memory_budget=args.memory_budget,
                 per_row_out=args.per_row_out, n_threads=args.threads, progress=progress,
                 protect=[weight_file], **options)


def _score(args):
    """Run ``cecore score``; print the result; return the exit code (1 on bad input)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # what Python hides by default stays hidden: a library's unclosed socket (Dask
            # with its dashboard's port taken) is no warning about the scoring
            for category in (ResourceWarning, DeprecationWarning, PendingDeprecationWarning,
                             ImportWarning):
                warnings.simplefilter("ignore", category)
            result = _score_run(args)
        # one line each, like the errors; a warning raised for every chunk shows once
        for message in dict.fromkeys(str(w.message).splitlines()[0] for w in caught):
            print(f"cecore score: warning: {_options_named(message)}", file=sys.stderr)
    except KeyboardInterrupt:
        from ._io import remove_pending

        remove_pending()  # one that landed before atomic_npy's own cleanup could run
        print("cecore score: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the command reports every failure in one line
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, (OSError, zipfile.BadZipFile)) and not isinstance(exc, FileNotFoundError):
            message = f"{type(exc).__name__}: {message}" if not message.startswith("[") else message
        print(f"cecore score: error: {_options_named(message)}", file=sys.stderr)
        return 1
    return _emit(json.dumps(result.to_dict(), indent=2, allow_nan=False) if args.json
                 else _format_text(result))


def _emit(text):
    """Print the result; a reader that went away (``| head``) ends the command quietly,
    as SIGPIPE would (exit 141), and a full disk or an encoding that cannot show a path is
    an error line, not a traceback."""
    if sys.stdout is None:  # started with stdout closed (>&-): the result would be lost
        print("cecore score: error: cannot write the result: stdout is closed", file=sys.stderr)
        return 1
    try:
        try:
            print(text, flush=True)
        except UnicodeEncodeError:
            encoding = sys.stdout.encoding or "utf-8"
            sys.stdout.buffer.write((text + "\n").encode(encoding, "backslashreplace"))
            sys.stdout.flush()
    except BrokenPipeError:
        _stdout_to_devnull()
        return 141
    except OSError as exc:
        print(f"cecore score: error: cannot write the result: {exc}", file=sys.stderr)
        return 1
    return 0


_COMMANDS = {
    "demo": (_demo_parser, _demo,
             "train SoftmaxClassifier on built-in data and compare with scikit-learn"),
    "score": (_score_parser, _score, "score logits stored on disk (.npy/.npz) in bounded memory"),
    "info": (_info_parser, _info, "show the available backends, threads, tunables and build flags"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(  # the docstring's line without its ``markup``
        prog="cecore", description=__doc__.splitlines()[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the chosen command's options are built (they import its module).
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, (configure, run, help_text) in _COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            configure(command)
            command.set_defaults(_run=run)
    if sys.stderr is None:  # started with stderr closed (2>&-): messages go nowhere, as asked
        sys.stderr = open(os.devnull, "w")
    args = parser.parse_args(argv)
    if sys.stdout is None and args.command != "score":
        # started with stdout closed (>&-): print() would drop everything and exit 0
        # (score says so once it has its result, which --per-row-out may still keep)
        print(f"cecore {args.command}: error: cannot write the output: stdout is closed",
              file=sys.stderr)
        return 1
    if threading.current_thread() is threading.main_thread():
        # `kill`, a closed terminal or ssh session (SIGHUP), Ctrl-\ (SIGQUIT), a CPU-time
        # limit (SIGXCPU) or any other signal whose default action ends the process removes
        # a per-row file being written (the default action left its temporary file behind).
        for name in _TERMINATING_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
                signal.signal(signum, _terminated)
    try:
        with warnings.catch_warnings():  # one line each, as the errors (score has its own)
            warnings.showwarning = lambda message, *_, **__: print(
                f"cecore {args.command}: warning: {message}", file=sys.stderr)
            return args._run(args)
    except ValueError as exc:  # a bad CECORE_* setting, found when a backend loads
        if not str(exc).startswith("CECORE_"):
            raise
        print(f"cecore {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `cecore info | head`: end quietly, as SIGPIPE would
        _stdout_to_devnull()
        return 141
    except OSError as exc:  # demo and info print as they go: a full disk is an error line
        if exc.errno not in (errno.ENOSPC, errno.EIO, errno.EFBIG):
            raise
        _stdout_to_devnull()
        print(f"cecore {args.command}: error: cannot write the output: {exc}", file=sys.stderr)
        return 1


def _stdout_to_devnull():
    """Point stdout at /dev/null: Python would otherwise fail again when it flushes stdout
    at exit, with a traceback-like message."""
    if sys.stdout is not None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# Signals whose default action ends the process and that Python leaves at that default
# (it ignores SIGPIPE and SIGXFSZ and handles SIGINT itself).
_TERMINATING_SIGNALS = ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM",
                        "SIGVTALRM", "SIGPROF", "SIGXCPU", "SIGIO", "SIGPWR")


def _terminated(signum, frame):
    """A terminating signal (see _TERMINATING_SIGNALS): remove the temporary per-row file
    and exit with 128 + signum at once. Not by raising SystemExit: landing in library code
    (Numba compiling a kernel, say) it could be caught and turned into another error."""
    from ._io import remove_pending

    remove_pending()
    print("cecore: terminated", file=sys.stderr, flush=True)
    os._exit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
