"""core: the small shared layer below featstore, mil, analysis and study.

Statistics (:mod:`featstore.core.stats`), the runtime (device, threads, determinism, allocator tuning and
offline mode as explicit, restorable contexts: :mod:`featstore.core.runtime`), config declaration
(:mod:`featstore.core.config`), the training loop (:mod:`featstore.core.fit`) and the terminal UI used by commands
(:mod:`featstore.core.ui`). It imports no other package of the toolkit.
"""

from featstore.core.errors import CoreError

__all__ = ["CoreError"]
