"""core: the small shared layer below featstore, mil, analysis and study.

Statistics (:mod:`core.stats`), the runtime (device, threads, determinism, allocator tuning and
offline mode as explicit, restorable contexts: :mod:`core.runtime`), config declaration
(:mod:`core.config`), the training loop (:mod:`core.fit`) and the terminal UI used by commands
(:mod:`core.ui`). It imports no other package of the toolkit.
"""

from core.errors import CoreError

__all__ = ["CoreError"]
