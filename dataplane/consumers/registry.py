"""From a [[consumer]] table to a running consumer: resolve its entry to a factory, make it.

An entry is, in this order: a built-in name (BUILTIN), an entry point of the
"dataplane.consumers" group (an installed package's `[project.entry-points."dataplane.consumers"]`),
or "package.module:callable", imported (after putting the table's `path` first on sys.path).
Resolving happens before anything starts, so a typo is a clear error, not a half-started run.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from dataplane.config.consumers import ConsumerCfg
from dataplane.consumers.api import Consumer
from dataplane.consumers.loop import Running

GROUP = "dataplane.consumers"
# built-in consumers a [[consumer]] may name by a short entry
BUILTIN: dict[str, str] = {"flows": "dataplane.consumers.flowcache:factory"}

Factory = Callable[[str, dict[str, Any]], Consumer]


class ConsumerLoadError(ValueError):
    """A [[consumer]] whose entry cannot be resolved, or whose factory refused its options."""


def resolve(c: ConsumerCfg) -> Factory:
    """The factory c.entry names; ConsumerLoadError saying why not."""
    entry = BUILTIN.get(c.entry, c.entry)
    if ":" not in entry:
        found = [ep for ep in entry_points(group=GROUP) if ep.name == entry]
        if not found:
            raise ConsumerLoadError(
                f'consumer "{c.name}": entry "{c.entry}" is not a built-in ({", ".join(BUILTIN)}'
                f') nor an entry point of the "{GROUP}" group; write "package.module:callable"')
        try:
            return found[0].load()
        except Exception as e:     # noqa: BLE001 - whatever importing their code raised
            raise ConsumerLoadError(f'consumer "{c.name}": loading entry point "{entry}": '
                                    f"{type(e).__name__}: {e}") from e
    module, _, attr = entry.partition(":")
    if c.path and c.path not in sys.path:
        sys.path.insert(0, c.path)
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:     # noqa: BLE001 - ImportError, AttributeError, their own errors
        where = f" (searched {c.path} first)" if c.path else ""
        raise ConsumerLoadError(f'consumer "{c.name}": entry "{c.entry}": '
                                f"{type(e).__name__}: {e}{where}") from e
    if not callable(obj):
        raise ConsumerLoadError(f'consumer "{c.name}": entry "{c.entry}" is not callable')
    return obj


def make(c: ConsumerCfg) -> Running:
    """Resolve and make the consumer, in a Running that makes it again the same way."""
    factory = resolve(c)

    def build() -> Consumer:
        consumer = factory(c.name, dict(c.options))
        if not callable(getattr(consumer, "on_batch", None)):
            raise ConsumerLoadError(f'consumer "{c.name}": {c.entry} returned '
                                    f"{type(consumer).__name__}, which has no on_batch()")
        if not getattr(consumer, "name", ""):
            consumer.name = c.name       # type: ignore[misc]
        return consumer

    try:
        first = build()
    except ConsumerLoadError:
        raise
    except Exception as e:     # noqa: BLE001 - a factory refusing its options, say
        raise ConsumerLoadError(f'consumer "{c.name}": {c.entry}({c.name!r}, options) raised '
                                f"{type(e).__name__}: {e}") from e
    r = Running(first, c.rings, c.on_error, remake=build)
    r.name = c.name
    return r
