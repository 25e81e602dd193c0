"""featstore.core: the small shared layer below featstore, analysis, mil and its tasks.

Errors (:mod:`featstore.core.errors`, the root ``CoreError``), statistics
(:mod:`featstore.core.stats`), the runtime (device, threads, determinism, allocator tuning and
offline mode as explicit, restorable contexts: :mod:`featstore.core.runtime`), config declaration
with choices and bounds (:mod:`featstore.core.config`), the training loop
(:mod:`featstore.core.fit`), the labels reader (:mod:`featstore.core.labels`), plotting on Agg
figures (:mod:`featstore.core.plotting`) and the terminal UI used by commands
(:mod:`featstore.core.ui`). It imports nothing else of the toolkit.
"""

from featstore.core.errors import CoreError

__all__ = ["CoreError"]
