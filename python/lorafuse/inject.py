"""Kept so that existing imports keep working: this module moved to :mod:`lorafuse.peft.inject`."""

from .peft.inject import *  # noqa: F401,F403
from .peft.inject import __all__  # noqa: F401
