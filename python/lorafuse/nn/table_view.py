"""What a lorafuse layer's adapter table says (``self._table``, the C++ ``AdapterTable``), read the same way by every
layer kind."""

from __future__ import annotations

from typing import Any, Dict, Optional


class AdapterTableView:
    """``adapters``, ``active_adapter`` and ``adapters_enabled`` of a layer that keeps its adapters in ``self._table``."""

    _table: Any

    @property
    def adapters(self) -> Dict[str, Any]:
        """Each adapter's options (:class:`lorafuse.nn.AdapterOptions`), in the order they were added."""
        return {n: self._table.options(n) for n in self._table.names}

    @property
    def active_adapter(self) -> Optional[str]:
        """The active adapter, or None."""
        return self._table.active or None

    @property
    def adapters_enabled(self) -> bool:
        return self._table.enabled


__all__ = ["AdapterTableView"]
