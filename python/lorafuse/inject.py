"""Kept so that existing imports keep working: this module moved to :mod:`lorafuse.peft` (inject.py, merging.py,
model_tree.py)."""

from .peft.inject import *  # noqa: F401,F403
from .peft.inject import __all__ as _inject_all
from .peft.merging import *  # noqa: F401,F403
from .peft.merging import __all__ as _merging_all
from .peft.model_tree import *  # noqa: F401,F403
from .peft.model_tree import __all__ as _tree_all

__all__ = [*_inject_all, *_merging_all, *_tree_all]
