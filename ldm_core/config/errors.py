"""The config's one error type, and the "did you mean" hint its messages carry."""

from __future__ import annotations

import difflib
import typing
from typing import Any

from ldm_core.errors import LdmError


class ConfigError(LdmError, ValueError):
    """A configuration value is wrong; the message names the dotted field and why."""


def suggest(word: Any, options: typing.Iterable[Any]) -> str:
    """`` (did you mean 'x'?)`` for the option closest to ``word``, or ``""``."""
    match = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""
