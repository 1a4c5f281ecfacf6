"""What a long-running process (the server, an engine) does once it has started."""

from __future__ import annotations

import atexit
import gc
from collections.abc import Iterator
from contextlib import contextmanager

from parrot_lc.engine.errors import allocator_reason, is_out_of_memory
from parrot_lc.settings import EngineSettings, setting_error


def freeze_startup_objects() -> None:
    """Leaves what startup made (modules, the model, the app: millions of objects) out of every later garbage
    collection. A full collection otherwise walks them all, about 0.2 s with the GIL held, in the middle of
    streaming or of an engine's steps: every stream and step stall meanwhile. At exit they are unfrozen again: the
    interpreter's last collections skip frozen objects, and extension modules whose objects were never freed
    report them as leaks (Triton's, imported through torch, printed 30 lines of nanobind warnings)."""
    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)


@contextmanager
def kv_cache_fits(settings: EngineSettings) -> Iterator[None]:
    """Building engines (the model, then its KV cache) inside: running out of memory there with --kv-cache-bytes
    set is a settings error naming it, not a traceback from torch's allocator. Caught around the engine rather
    than checked beforehand: only the allocator knows what fits next to the weights (and an engine process
    sends its failure back, so the parent catches that one too). Weights that do not fit are no fault of the KV
    cache's: the engine says so itself (a ModelLoadError, before it allocates the cache), which passes through.
    Unset, the cache is sized from free memory, and a failure is no setting's fault: it goes on as it was."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if settings.kv_cache_bytes is None or not is_out_of_memory(exc):
            raise
        size = settings.kv_cache_bytes
        raise setting_error(
            EngineSettings, "kv_cache_bytes", f"a KV cache of {size} bytes ({size / 2**30:.1f} GiB) does not fit in "
            f"memory next to the model's weights, which did ({allocator_reason(exc)}); give fewer, or leave it unset "
            "to size the KV cache from free memory"
        ) from None
