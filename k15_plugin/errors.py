"""The one base class of the plugin's user-facing errors.

Every console entry point (``k15-train``, ``k15-curate``, ``k15-long2short``) catches :class:`K15Error` and prints its
message as one line on standard error with exit code 2, before any model loads. Each command keeps its own subclass
so a caller can tell them apart; a message names the key, option, file or row that is wrong and what is allowed.
"""

from __future__ import annotations


class K15Error(ValueError):
    """A user-facing error: its message is one line naming the key, option, file (and line) at fault.

    Example:
    ```python
    >>> from k15_plugin.errors import K15Error
    >>> str(K15Error("trainer.max_steps=0 is not allowed: expected an integer >= 1"))
    'trainer.max_steps=0 is not allowed: expected an integer >= 1'

    ```
    """


class ConfigError(K15Error):
    """A configuration error of ``k15-train``: a Hydra key, or a file or row it names. The message is one line."""
