"""prunequant.export.cpu: the CPU's integer-kernel features, read with cpuid, and their classes."""

from __future__ import annotations

import json
import platform

import pytest
import torch

from prunequant.export.cpu import FLAGS, _class_name, _saturating, cpu_features


@pytest.mark.parametrize(("flags", "saturating", "name"), [
    ({"avx2"}, True, "x86-64 AVX2 without VNNI"),
    ({"avx2", "avx512bw"}, True, "x86-64 AVX-512 without VNNI"),
    ({"avx2", "avx_vnni"}, False, "x86-64 AVX2 with AVX-VNNI"),
    ({"avx2", "avx512bw", "avx512_vnni"}, False, "x86-64 AVX-512 with VNNI"),
    ({"avx2", "avx512bw", "avx512_vnni", "amx_int8"}, False, "x86-64 AMX-INT8 (AVX-512 VNNI)"),
    (set(), False, "x86-64 without AVX2"),
])
def test_classes_and_saturation(flags, saturating, name):
    assert _saturating("x86_64", flags) is saturating
    assert _class_name("x86_64", flags) == name
    assert _saturating("aarch64", {"avx2"}) is False and _class_name("aarch64", set()) == "aarch64"


def test_this_cpu_is_read_and_named():
    f = cpu_features()
    assert set(f.flags) <= set(FLAGS) and list(f.flags) == sorted(f.flags)
    assert f.name == _class_name(f.arch, set(f.flags))
    assert f.saturating_u8s8 == _saturating(f.arch, set(f.flags))
    assert json.loads(json.dumps(f.as_dict()))["name"] == f.name
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert f.source == "cpuid"
        # PyTorch reads cpuid too (pytorch/cpuinfo): its kernel level must agree with ours
        cap = torch.backends.cpu.get_cpu_capability()
        if cap == "AVX512":
            assert "avx512bw" in f.flags, (cap, f)
        elif cap == "AVX2":
            assert "avx2" in f.flags, (cap, f)
        else:
            assert "avx2" not in f.flags, (cap, f)
        assert f.vnni == (not f.saturating_u8s8 and "avx2" in f.flags) or "avx2" not in f.flags
