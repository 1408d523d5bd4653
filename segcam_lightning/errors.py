"""Exceptions that mean "the settings or the inputs are wrong", not "the code is wrong".

``train.py`` prints a :class:`ConfigurationError` as one line and exits with 2, as ``explain.py``
does with its usage errors; any other exception keeps its traceback, since it points at a bug.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


class ConfigurationError(ValueError):
    """A setting, or an input it names (a data folder, a checkpoint), that cannot work.

    The message says what was expected, what arrived and what to change. A ``ValueError``, so
    code that caught the ``ValueError`` raised before it existed still catches it.
    """


class ConfigurationTypeError(ConfigurationError, TypeError):
    """A :class:`ConfigurationError` about a value of the wrong type; also a ``TypeError``."""


def check_unique_names(names: Sequence[str], argument: str = "class_names") -> None:
    """Refuse a list of class names in which a name appears more than once.

    Metrics (``val/IoU/<name>``), TensorBoard tags and image files are keyed by class name, so
    two classes with one name would overwrite each other's values.

    Args:
        names: the class names, one per class.
        argument: the argument's name, for the message.

    Raises:
        ConfigurationError: naming every duplicated name.
    """
    counts = Counter(names)
    repeated = [name for name, count in counts.items() if count > 1]
    if repeated:
        which = ", ".join(f"{name!r} ({counts[name]} times)" for name in repeated)
        raise ConfigurationError(
            f"Expected distinct `{argument}`, but {list(names)} repeats {which}: metrics, "
            "TensorBoard tags and image files are keyed by class name, so those classes would "
            "overwrite each other. Give every class its own name."
        )


class MissingInputError(FileNotFoundError):
    """A file or folder the settings name that is not there; also a ``FileNotFoundError``."""


class UsageError(Exception):
    """A mistake in the command line or its inputs (``explain.py``'s options, the code they name,
    the files they point at): ``explain.py`` prints it as one line and exits with 2."""
