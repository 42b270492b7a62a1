"""Kept so that existing imports keep working: this module moved to :mod:`lorafuse.peft.files` (and
``use_adapter`` to :mod:`lorafuse.peft.routing`)."""

from .peft.files import *  # noqa: F401,F403
from .peft.files import __all__ as _files_all
from .peft.routing import use_adapter  # noqa: F401

__all__ = [*_files_all, "use_adapter"]
