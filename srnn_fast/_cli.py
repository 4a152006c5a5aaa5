"""How every command (train, report, segment, data.download, bench/epoch_time.py) ends on an
error its user can fix — a missing file, unusable data, a checkpoint that is not one, a run that
diverged: one ``PROG: error: MESSAGE`` line on stderr and exit status 1, the form argparse gives
a wrong flag (which exits 2, after the usage), never a traceback."""
import argparse
import contextlib


@contextlib.contextmanager
def user_errors(parser: argparse.ArgumentParser, *errors: type):
    """Inside, an exception of one of the types ``errors`` ends the command with its message on one line."""
    try:
        yield
    except errors as e:
        parser.exit(1, f"{parser.prog}: error: {' '.join(str(e).split())}\n")
