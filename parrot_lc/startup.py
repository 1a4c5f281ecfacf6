"""What a long-running process (the server, an engine) does once it has started."""

from __future__ import annotations

import atexit
import gc


def freeze_startup_objects() -> None:
    """Leaves what startup made (modules, the model, the app: millions of objects) out of every later garbage
    collection. A full collection otherwise walks them all, about 0.2 s with the GIL held, in the middle of
    streaming or of an engine's steps: every stream and step stall meanwhile. At exit they are unfrozen again: the
    interpreter's last collections skip frozen objects, and extension modules whose objects were never freed
    report them as leaks (Triton's, imported through torch, printed 30 lines of nanobind warnings)."""
    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)
