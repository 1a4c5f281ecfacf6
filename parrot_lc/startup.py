"""What a long-running process (the server, an engine) does once it has started."""

from __future__ import annotations

import atexit
import gc
import re
from collections.abc import Iterator
from contextlib import contextmanager

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
    sends its failure back, so the parent catches that one too). Unset, the cache is sized from free memory,
    and a failure is no setting's fault: it goes on as it was."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if settings.kv_cache_bytes is None or not _out_of_memory(exc):
            raise
        size = settings.kv_cache_bytes
        raise setting_error(
            EngineSettings, "kv_cache_bytes", f"{size} bytes ({size / 2**30:.1f} GiB) do not fit in memory next to "
            f"the model ({_allocator_reason(exc)}); give fewer, or leave it unset to size the KV cache from free "
            "memory"
        ) from None


def _out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation that failed: torch's CPU allocator raises a plain RuntimeError that says so,
    CUDA's a torch.OutOfMemoryError."""
    text = str(exc)
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def _allocator_reason(exc: BaseException) -> str:
    """The allocator's message, short: its first two sentences, without the C++ check that failed
    (`[enforce fail at alloc_cpu.cpp:127] err == 0.`). CUDA's goes on with advice on fragmentation."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    text = re.sub(r"^\[enforce fail at [^\]]*\] *[^.]*\. *", "", lines[0])
    return ". ".join(text.split(". ")[:2]).rstrip(".")
