"""Host memory of ``FastModel.from_pretrained``, measured by the kernel in a process of its own (run as a script by
``test_moe.py``): ``python host_memory_probe.py CHECKPOINT WARMUP_CHECKPOINT DTYPE`` prints one JSON line.

For each way transformers can read the shards (``mmap``, its Linux default, and ``pread``, its Windows / MPS one,
here forced), after a warm-up load of a small checkpoint (imports, one-time caches), the peak resident set size
(``VmHWM``, reset to the current RSS through ``/proc/self/clear_refs``) of one load, less the RSS before it. Run with
``MALLOC_MMAP_THRESHOLD_`` small: every tensor's memory is then its own mapping, returned to the kernel when the
tensor dies (the munmap records the peak), not kept by malloc for later."""
import ctypes
import gc
import json
import re
import sys

import torch
import transformers.modeling_utils
from memory_tracking import held_bytes

from fastft import FastModel

_safe_open = transformers.modeling_utils.safe_open


def status() -> dict:
    text = open("/proc/self/status").read()
    return {key: int(kb) * 1024 for key, kb in re.findall(r"(VmHWM|VmRSS|RssAnon|RssFile):\s+(\d+) kB", text)}


def load(path, dtype, backend):
    def safe_open(*args, **kwargs):
        return _safe_open(*args, **{**kwargs, "backend": backend})

    transformers.modeling_utils.safe_open = safe_open  # the name transformers reads the shards with
    try:
        return FastModel.from_pretrained(path, max_seq_length=64, dtype=dtype)[0]
    finally:
        transformers.modeling_utils.safe_open = _safe_open


def measure(path, dtype, backend) -> dict:
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS
    before = status()
    model = load(path, dtype, backend)
    after = status()
    return dict(peak_growth=after["VmHWM"] - before["VmRSS"], model=held_bytes(model),
                anon_after=after["RssAnon"] - before["RssAnon"], file_after=after["RssFile"] - before["RssFile"])


def main(path, warmup_path, dtype):
    dtype = getattr(torch, dtype)
    model = load(warmup_path, dtype, "mmap")
    del model
    print(json.dumps({backend: measure(path, dtype, backend) for backend in ("mmap", "pread")}))


if __name__ == "__main__":
    main(*sys.argv[1:])
