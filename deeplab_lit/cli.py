"""What every command line shares: one-line errors with exit code 2, and `--help` with every config key."""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import warnings
from typing import Callable

from deeplab_lit.errors import UserError, original_message


# Lightning's informational lines (accelerators found, "💡 Tip" advertisements for litlogger/litmodels,
# "max_steps reached", "Restoring states from ...") go to stderr through these loggers; the commands print
# what matters themselves, so stderr carries warnings and errors only. (Our own save_checkpoint calls pass
# weights_only explicitly; Lightning's SLURM requeue save does not and would log "`weights_only` was not set".)
QUIET_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.accelerators.cuda", "lightning.pytorch.trainer.connectors.checkpoint_connector")


# Deprecation warnings raised inside libraries by their own calls (not by ours), with the pinned versions:
# Lightning 2.6's pytree helper calls torch 2.14's deprecated LeafSpec check on every batch.
LIBRARY_NOISE = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # The module normalises 8-bit batches in `on_after_batch_transfer` (it also serves evaluations given
    # plain dataloaders); the DataModule defines no such hook, so there is nothing to choose between.
    r"You have overridden `on_after_batch_transfer` in `LightningModule`",
)


def quiet_libraries() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=message)
    # OpenCV prints its decoder's own WARN/ERROR lines for a corrupt image; readers.read_image reports it in
    # one line naming the file, so the library's lines are left out (DataLoader workers inherit this).
    from cv2.utils import logging as cv2_logging

    cv2_logging.setLogLevel(cv2_logging.LOG_LEVEL_SILENT)


def end_workers_at_exit() -> None:
    """SIGKILL the daemonic children (DataLoader workers) still alive when the interpreter exits.

    Workers ignore SIGTERM (datamodules.loaders.worker_init: the main process saves on a scheduler's
    group SIGTERM), so multiprocessing's own exit handler, which terminates daemonic children with SIGTERM
    and then joins them, would wait forever when an exception ends the command while persistent workers
    are still running. Registered after multiprocessing's handler, so it runs before it."""
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Run `main`, turning a UserError (wherever it was raised, DataLoader workers included) into one line
    on stderr and exit code 2."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import multiprocessing.util  # noqa: F401  (its exit handler first, so that ours runs before it)

    atexit.register(end_workers_at_exit)
    quiet_libraries()
    try:
        code = main(sys.argv[1:] if argv is None else argv)
    except UserError as error:
        print(f"error: {original_message(str(error))}".replace("\n", " "), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def parser(prog: str, doc: str, config_keys: bool = True) -> argparse.ArgumentParser:
    """An argparse parser whose --help also lists every config key (generated from the schema)."""
    description = doc.split("\n\n")[1] if "\n\n" in doc else doc
    epilog = None
    if config_keys:
        from deeplab_lit.config.help import render_help

        epilog = render_help()
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
