"""The dataset column a TRL reward function reads, as TRL passes it (the reward classes' shared preamble)."""

from __future__ import annotations

from typing import Any


def column_values(
    reward: str, column: str, default_column: str, given: Any, kwargs: dict, completions: list, what: str
) -> list:
    """The dataset column a TRL reward function reads: ``given`` (passed as ``default_column=``) when the reward reads
    ``default_column``, else ``kwargs[column]``. Raises ``TypeError`` when TRL did not pass it (``what`` says what a
    cell holds) and ``ValueError`` when its length differs from the completions'."""
    values = given if column == default_column else kwargs.get(column)
    if values is None:
        raise TypeError(
            f"{reward} needs the dataset's {column!r} column ({what}); TRL passes every dataset column to reward "
            "functions, so add it to the training dataset"
        )
    if len(values) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(values)} {column} values")
    return list(values)
