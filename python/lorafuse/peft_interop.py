"""Kept so that existing imports keep working: this module moved to :mod:`lorafuse.peft.from_peft`."""

from .peft.from_peft import *  # noqa: F401,F403
from .peft.from_peft import __all__  # noqa: F401
