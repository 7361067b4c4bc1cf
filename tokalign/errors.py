"""The one base class of tokalign's user-facing errors.

Every error caused by input, configuration or the machine (a bad corpus file, a wrong config key,
too little GPU memory, a diverged run) derives from ``TokalignError``: ``python -m tokalign`` reports
it in one line and exits 2, and the traceback goes to ``<run dir>/error.txt``. Each stage keeps its own
subclass (which also derives from ``ValueError`` or ``RuntimeError``) so callers can tell them apart.
"""


class TokalignError(Exception):
    """Bad input, configuration or machine state: reported to the user in one line."""
