"""One bounded cache for every table, bitmap and grain a driver keeps.

Entries are forgotten least recently used first, so memory stays bounded
whatever the image asks for.  The owner's lock serialises get, put and
pop; peek (which does not reorder) is safe without it, for read fast
paths that look a table up lock-free.
"""

import collections

_MISSING = object()


class Cache:
    def __init__(self, limit, evicted=None):
        """At most `limit` entries; `evicted(key, value)` is called for
        each entry forgotten to make room."""
        self.limit = max(1, limit)
        self._items = collections.OrderedDict()
        self._evicted = evicted

    def get(self, key, default=None):
        """The entry for `key`, now the most recently used."""
        value = self._items.get(key, _MISSING)
        if value is _MISSING:
            return default
        self._items.move_to_end(key)
        return value

    def peek(self, key, default=None):
        """The entry for `key`, its place unchanged."""
        return self._items.get(key, default)

    def put(self, key, value):
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.limit:
            old, old_value = self._items.popitem(last=False)
            if self._evicted is not None:
                self._evicted(old, old_value)

    def pop(self, key, default=None):
        return self._items.pop(key, default)

    def clear(self):
        self._items.clear()

    def __contains__(self, key):
        return key in self._items

    def __len__(self):
        return len(self._items)
