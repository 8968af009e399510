"""Which integer kernels this CPU gives ONNX Runtime, and whether its 8-bit ones saturate.

ONNX Runtime's CPU provider runs a fused 8-bit conv / matmul (``QLinearConv``, ``QGemm``,
``MatMulInteger``) with uint8 activations and int8 weights ("u8s8"). How it sums the products
depends on the instruction set it detects at start-up:

* **VNNI** (``AVX512_VNNI``: Cascade Lake and later Xeons, AMD Zen 4+; ``AVX_VNNI``: Alder Lake and
  later client cores; AMX-INT8 machines have AVX512-VNNI too): ``vpdpbusd`` sums four uint8 x int8
  products straight into 32 bits. Exact.
* **AVX2 or AVX-512 BW without VNNI** (Haswell ... Skylake, AMD Zen 1-3): ``vpmaddubsw`` sums *pairs*
  of products into a saturating 16-bit lane first. Two products of 255 x 127 are 64,770, beyond
  32,767, so with full-range 8-bit weights an accumulation can clip: the result differs from the
  model's. 7-bit weight codes (``|q| <= 64``, recipe ``quant.weight_range: reduced``) keep
  ``2 * 255 * 64 = 32,640`` inside 16 bits.

:func:`cpu_features` reads the features with the ``cpuid`` instruction, as ONNX Runtime does. It
does not use ``/proc/cpuinfo`` first, because under an emulator (``qemu-x86_64 -cpu Haswell``) that
file describes the host, not the CPU the program sees; for the same reason it does not use
``py-cpuinfo``, which merges the two, and which (9.0.0) knows neither AVX-VNNI nor AMX. Off x86-64,
or where executing ``cpuid`` is impossible, it falls back to the flags of ``/proc/cpuinfo``.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

#: features that decide the 8-bit integer kernels (names as in Linux's /proc/cpuinfo)
FLAGS = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")

# x86-64 System V: void cpuid(uint32 leaf, uint32 subleaf, uint32 out[4])
_CPUID = bytes([
    0x53,                    # push rbx
    0x89, 0xF8,              # mov eax, edi
    0x89, 0xF1,              # mov ecx, esi
    0x49, 0x89, 0xD0,        # mov r8, rdx
    0x0F, 0xA2,              # cpuid
    0x41, 0x89, 0x00,        # mov [r8], eax
    0x41, 0x89, 0x58, 0x04,  # mov [r8+4], ebx
    0x41, 0x89, 0x48, 0x08,  # mov [r8+8], ecx
    0x41, 0x89, 0x50, 0x0C,  # mov [r8+12], edx
    0x5B,                    # pop rbx
    0xC3,                    # ret
])
# uint64 xgetbv0(void): the OS-enabled register state (XCR0)
_XGETBV = bytes([0x31, 0xC9, 0x0F, 0x01, 0xD0, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xC3])


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's integer-kernel features.

    Attributes:
        name: a human name of the CPU class, e.g. ``"x86-64 AVX2 without VNNI"``.
        brand: the processor's brand string (``""`` when unknown).
        arch: ``platform.machine()``.
        flags: the detected members of :data:`FLAGS`, sorted.
        source: ``"cpuid"`` or ``"/proc/cpuinfo"`` (or ``"none"``).
        saturating_u8s8: ONNX Runtime's 8-bit u8s8 kernels sum pairs of products in saturating 16
            bits here (AVX2 / AVX-512 BW without any VNNI), so full-range 8-bit weights can clip.
    """

    name: str
    brand: str
    arch: str
    flags: tuple[str, ...]
    source: str
    saturating_u8s8: bool

    @property
    def vnni(self) -> bool:
        """Any VNNI (AVX512-VNNI, AVX-VNNI) or AMX-INT8: exact 32-bit u8s8 dot products."""
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(self.flags))

    def as_dict(self) -> dict[str, object]:
        """JSON-ready dict (for reports)."""
        d = asdict(self)
        d["flags"] = list(self.flags)
        return d


def _machine_code(code: bytes, restype: type | None, argtypes: list[type]) -> tuple[Callable, mmap.mmap]:
    """A callable for x86-64 machine code in an executable anonymous mapping (kept alive by the caller)."""
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    fn = ctypes.CFUNCTYPE(restype, *argtypes)(addr)
    return fn, buf  # keep the mapping alive as long as fn is used


def _bit(v: int, i: int) -> bool:
    return bool((v >> i) & 1)


def _from_cpuid() -> tuple[set[str], str]:
    """Flags and brand string from ``cpuid`` (x86-64 only; raises where it cannot run)."""
    cpuid, keep = _machine_code(_CPUID, None, [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p])
    out = (ctypes.c_uint32 * 4)()

    def call(leaf: int, sub: int = 0) -> tuple[int, int, int, int]:
        cpuid(leaf, sub, ctypes.addressof(out))
        return out[0], out[1], out[2], out[3]

    max_leaf = call(0)[0]
    _, _, ecx1, _ = call(1)
    xcr0 = 0
    if _bit(ecx1, 27):  # OSXSAVE: the OS saves the extended state; xgetbv says which
        xgetbv, keep2 = _machine_code(_XGETBV, ctypes.c_uint64, [])
        xcr0 = int(xgetbv())
        del keep2
    avx_os = (xcr0 & 0x6) == 0x6  # SSE + AVX state
    avx512_os = avx_os and (xcr0 & 0xE0) == 0xE0  # opmask + ZMM state
    amx_os = (xcr0 & 0x60000) == 0x60000  # tile config + tile data
    flags: set[str] = set()
    if max_leaf >= 7:
        _, ebx7, ecx7, edx7 = call(7, 0)
        eax71 = call(7, 1)[0]
        if avx_os and _bit(ebx7, 5):
            flags.add("avx2")
        if avx512_os and _bit(ebx7, 30):
            flags.add("avx512bw")
        if avx512_os and _bit(ecx7, 11):
            flags.add("avx512_vnni")
        if avx_os and _bit(eax71, 4):
            flags.add("avx_vnni")
        if amx_os and _bit(edx7, 25):
            flags.add("amx_int8")
    brand = ""
    if call(0x80000000)[0] >= 0x80000004:
        raw = b"".join(int(r).to_bytes(4, "little") for leaf in (0x80000002, 0x80000003, 0x80000004)
                       for r in call(leaf))
        brand = raw.split(b"\0", 1)[0].decode("ascii", "replace").strip()
    del keep
    return flags, brand


def _from_proc() -> tuple[set[str], str]:
    """Flags and model name from Linux's ``/proc/cpuinfo`` (raises OSError without it)."""
    text = Path("/proc/cpuinfo").read_text()
    flags: set[str] = set()
    brand = ""
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(val.split()) & set(FLAGS)
        elif key == "model name" and not brand:
            brand = val.strip()
    return flags, brand


def _class_name(arch: str, flags: set[str]) -> str:
    if arch.lower() not in ("x86_64", "amd64"):
        return arch or "unknown CPU"
    if "amx_int8" in flags:
        return "x86-64 AMX-INT8 (AVX-512 VNNI)"
    if "avx512_vnni" in flags:
        return "x86-64 AVX-512 with VNNI"
    if "avx_vnni" in flags:
        return "x86-64 AVX2 with AVX-VNNI"
    if "avx512bw" in flags:
        return "x86-64 AVX-512 without VNNI"
    if "avx2" in flags:
        return "x86-64 AVX2 without VNNI"
    return "x86-64 without AVX2"


def _saturating(arch: str, flags: set[str]) -> bool:
    """x86-64 whose widest 8-bit kernel is AVX2 / AVX-512 BW ``vpmaddubsw`` (no VNNI, no AMX)."""
    x86 = arch.lower() in ("x86_64", "amd64")
    return x86 and bool({"avx2", "avx512bw"} & flags) and not {"avx512_vnni", "avx_vnni", "amx_int8"} & flags


@functools.cache
def cpu_features() -> CpuFeatures:
    """The integer-kernel features of the CPU this process runs on (cached)."""
    arch = platform.machine()
    flags: set[str] = set()
    brand, source = "", "none"
    if arch.lower() in ("x86_64", "amd64"):
        try:
            flags, brand = _from_cpuid()
            source = "cpuid"
        except (OSError, ValueError, AttributeError, TypeError):  # no executable mapping (hardened OS)
            pass
    if source == "none":
        try:
            flags, brand = _from_proc()
            source = "/proc/cpuinfo"
        except OSError:
            pass
    return CpuFeatures(name=_class_name(arch, flags), brand=brand or platform.processor(), arch=arch,
                       flags=tuple(sorted(flags)), source=source, saturating_u8s8=_saturating(arch, flags))


__all__ = ["FLAGS", "CpuFeatures", "cpu_features", "machine_info"]


def machine_info() -> dict[str, object]:
    """What a measurement ran on (``report.json``'s ``machine``): the CPU class, brand and flags, torch, the
    GPU if any. Float results differ across CPU classes, so every measured number carries this."""
    import torch

    cpu = cpu_features()
    return {"cpu_class": cpu.name, "cpu": cpu.brand, "cpu_flags": list(cpu.flags), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
