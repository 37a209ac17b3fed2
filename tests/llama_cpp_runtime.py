"""llama.cpp's own runtime for the tests: the ``llama_cpp_py_sync`` wheel (CFFI bindings and a prebuilt CPU
``libllama``), made loadable on the glibc these machines and CI have.

The wheel's libraries were built against glibc 2.38, whose headers (C23) redirect ``strtol``, ``strtoul``,
``strtoull`` and ``sscanf`` to new ``__isoc23_*`` functions, and so they require the symbol version ``GLIBC_2.38``.
On an older glibc (Debian 12: 2.36) ``dlopen`` refuses them for that version alone; everything else they use is
older. :func:`load_llama_cpp` therefore, only when the running glibc is older than 2.38:

1. copies the wheel's shared libraries to a cache directory (the installed files stay untouched; the libraries find
   each other there through their ``RUNPATH`` of ``$ORIGIN``);
2. marks their ``GLIBC_2.38`` version requirement weak (``VER_FLG_WEAK`` in ``.gnu.version_r``), so the dynamic
   linker accepts its absence instead of refusing the library (:func:`weaken_version_need`);
3. compiles (once, with the system's C compiler) a small library defining the four ``__isoc23_*`` functions as the
   C17 ones (their behaviour differs only for C23's ``0b`` binary prefixes, which llama.cpp does not parse), and
   loads it with ``RTLD_GLOBAL`` so that the patched libraries' references resolve to it;
4. points the bindings at the patched ``libllama`` (their ``_find_library``, a private function of the pinned
   0.11739; the wheel looks next to itself first, where the unpatched file is).

On glibc 2.38 or newer it only imports the package.
"""
from __future__ import annotations

import ctypes
import os
import platform
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

ISOC23_SHIM = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
long __isoc23_strtol(const char *s, char **end, int base) { return strtol(s, end, base); }
unsigned long __isoc23_strtoul(const char *s, char **end, int base) { return strtoul(s, end, base); }
unsigned long long __isoc23_strtoull(const char *s, char **end, int base) { return strtoull(s, end, base); }
int __isoc23_sscanf(const char *s, const char *format, ...) {
    va_list args;
    va_start(args, format);
    int n = vsscanf(s, format, args);
    va_end(args);
    return n;
}
"""
NEEDED_GLIBC = "GLIBC_2.38"
SHT_GNU_VERNEED = 0x6FFFFFFE  # the section type of .gnu.version_r
VER_FLG_WEAK = 0x2


def _glibc_version() -> tuple[int, ...]:
    name, version = platform.libc_ver()
    return tuple(int(part) for part in version.split(".")) if name == "glibc" else ()


def weaken_version_need(path: Path, version: str = NEEDED_GLIBC) -> int:
    """Set ``VER_FLG_WEAK`` on every ``version`` requirement (Vernaux entry) of the 64-bit little-endian ELF file
    ``path``, in place; returns how many were marked. Layouts: ELF64 header (section table offset at 0x28, entry size
    and count at 0x3A), ``Elf64_Shdr``, ``Elf64_Verneed`` (``vn_cnt``, ``vn_aux``, ``vn_next``) and
    ``Elf64_Vernaux`` (``vna_flags``, ``vna_name``, ``vna_next``) of the ELF specification."""
    data = bytearray(path.read_bytes())
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
    (section_table,) = struct.unpack_from("<Q", data, 0x28)
    entry_size, count = struct.unpack_from("<HH", data, 0x3A)
    # (sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info, sh_addralign, sh_entsize)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_table + i * entry_size) for i in range(count)]
    marked = 0
    for _, kind, _, _, offset, _, link, n_entries, _, _ in sections:
        if kind != SHT_GNU_VERNEED:
            continue
        strings = sections[link][4]  # the file offset of the string table its names point into
        need = offset
        for _ in range(n_entries):  # one Verneed per required library, each with its Vernaux versions
            _, n_aux, _, aux_offset, next_need = struct.unpack_from("<HHIII", data, need)
            aux = need + aux_offset
            for _ in range(n_aux):
                _, flags, _, name, next_aux = struct.unpack_from("<IHHII", data, aux)
                if data[strings + name:data.index(0, strings + name)].decode() == version:
                    struct.pack_into("<H", data, aux + 4, flags | VER_FLG_WEAK)
                    marked += 1
                aux += next_aux
            need += next_need
    path.write_bytes(data)
    return marked


def _patched_libraries(package_dir: Path, cache: Path) -> Path:
    """The package's libraries with the GLIBC_2.38 requirement weakened, and the shim, in ``cache/<version>``
    (built in a fresh directory and renamed into place, so concurrent test workers never see a half-built one)."""
    from llama_cpp_py_sync import __version__

    target = cache / f"llama_cpp_py_sync-{__version__}-glibc{'.'.join(map(str, _glibc_version()))}"
    if (target / "libisoc23.so").exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError(f"llama_cpp_py_sync's libraries need glibc 2.38 and this system has "
                           f"{platform.libc_ver()[1]}; loading them here needs a C compiler (gcc) for a small "
                           "compatibility library, and none was found (install gcc or set CC)")
    cache.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=cache, prefix=".building-"))
    try:
        for library in package_dir.glob("lib*.so*"):
            weaken_version_need(Path(shutil.copy2(library, build)))
        (build / "isoc23.c").write_text(ISOC23_SHIM)
        subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(build / "libisoc23.so"),
                        str(build / "isoc23.c")], check=True)
        build.rename(target)
    except OSError:
        if not (target / "libisoc23.so").exists():  # else another process finished first: its copy serves
            raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return target


def load_llama_cpp():
    """The ``llama_cpp_py_sync`` package, with its libraries loadable on this machine (see the module docstring)."""
    import llama_cpp_py_sync
    from llama_cpp_py_sync import _cffi_bindings

    if _glibc_version() and _glibc_version() < (2, 38):
        cache = Path(tempfile.gettempdir()) / f"fastft-llama-cpp-{os.getuid()}"
        patched = _patched_libraries(Path(llama_cpp_py_sync.__file__).parent, cache)
        ctypes.CDLL(str(patched / "libisoc23.so"), mode=ctypes.RTLD_GLOBAL)
        _cffi_bindings._find_library = lambda: str(patched / "libllama.so")
    return llama_cpp_py_sync


def ggml_gelu_table():
    """ggml's CPU GELU table (``ggml_table_gelu_f16``: GELU's tanh form of every f16 value, computed in f32 and
    rounded to f16), read from the loaded library after a model has been loaded (which fills it): llama.cpp's f32
    GELU and GeGLU look their results up there (ggml's vec.h defines ``GGML_GELU_FP16``)."""
    import numpy as np
    from llama_cpp_py_sync import _cffi_bindings

    library = ctypes.CDLL(str(Path(_cffi_bindings._find_library()).parent / "libggml-cpu.so.0"))
    table = (ctypes.c_uint16 * 65536).in_dll(library, "ggml_table_gelu_f16")
    return np.frombuffer(table, dtype=np.uint16).view(np.float16).copy()
