"""Train/validation/test split that reproduces the blog post's, without scikit-learn.

The original script split its sorted file list with scikit-learn, twice::

    split_size = int(0.2 * n)
    train_x, valid_x = train_test_split(items, test_size=split_size, random_state=42)
    train_x, test_x = train_test_split(train_x, test_size=split_size, random_state=42)

``train_test_split`` with a fixed ``random_state`` draws ``RandomState(seed).permutation(n)``
and takes the first ``test_size`` entries as its test part and the rest as its train part.
``split_indices`` does the same with numpy alone, so with its defaults it returns the blog's
exact split (same files in the same order) for any ``n``.
"""

from __future__ import annotations

import numpy as np


def split_indices(
    n: int, val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 42
) -> tuple[list[int], list[int], list[int]]:
    """Split ``range(n)`` into train, validation and test indices, as the blog post did.

    The validation part is split off first, then the test part from what remains, each with a
    fresh ``np.random.RandomState(seed)``. Both sizes are computed from ``n`` as the blog post did:
    ``int(val_fraction * n)`` and ``int(test_fraction * n)``. With the defaults this is exactly
    the blog's 60/20/20 split.

    Args:
        n: number of items (e.g. sorted image/mask pairs).
        val_fraction: fraction of ``n`` for validation, in ``[0, 1)``.
        test_fraction: fraction of ``n`` for testing, in ``[0, 1)``.
        seed: random seed (the blog post used 42).

    Returns:
        ``(train, val, test)`` lists of indices into ``range(n)``, disjoint and together
        covering it, each in the order ``train_test_split`` returns them.

    Raises:
        ValueError: if an argument is out of range, or a non-zero fraction of ``n`` rounds down
            to no item, or no item is left for training.

    Example:
        >>> train, val, test = split_indices(10)
        >>> len(train), len(val), len(test)
        (6, 2, 2)
    """
    _validate(n, val_fraction, test_fraction, seed)
    n_val, n_test = int(val_fraction * n), int(test_fraction * n)
    rest, val = _shuffle_split(np.arange(n), n_val, seed)
    train, test = _shuffle_split(rest, n_test, seed)
    return train.tolist(), val.tolist(), test.tolist()


def _shuffle_split(items: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``ShuffleSplit._iter_indices`` for one split: test part first."""
    permutation = np.random.RandomState(seed).permutation(len(items))
    return items[permutation[n_test:]], items[permutation[:n_test]]


def _validate(n: int, val_fraction: float, test_fraction: float, seed: int) -> None:
    if not isinstance(n, int | np.integer) or isinstance(n, bool) or n < 1:
        raise ValueError(f"Expected `n` to be a positive integer, but got {n!r}.")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ValueError(f"Expected `{name}` in [0, 1), but got {value}.")
        if value > 0 and int(value * n) == 0:
            raise ValueError(
                f"Expected `{name}` of n={n} items to give at least one item, but "
                f"int({value} * {n}) = 0. Use more data, a larger fraction, or 0 for no split."
            )
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"Expected `val_fraction + test_fraction` < 1, but got {val_fraction} + "
            f"{test_fraction} = {val_fraction + test_fraction}."
        )
    if n - int(val_fraction * n) - int(test_fraction * n) < 1:
        raise ValueError(f"Expected at least one training item, but n={n} leaves none.")
    if not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise ValueError(f"Expected `seed` to be an integer in [0, 2**32), but got {seed!r}.")
