"""Choosing the kernels' instruction set: from the CPU, or forced by TRIFORCE_ISA; which path ran
is named in the statistics; a bad choice is one clear line."""

from __future__ import annotations

import json

import pytest
import torch

from triforce import native
from triforce.errors import TriforceError

from .test_cli import assert_clean_error, run_cli

ZEN4 = "flags : fpu sse2 avx avx2 fma f16c avx512f avx512dq avx512bw avx512vl avx512_bf16 amx_bf16"
HASWELL = "flags : fpu sse2 avx avx2 fma f16c bmi2"

pytestmark = pytest.mark.core


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given /proc/cpuinfo flags line."""

    def use(flags: str) -> None:
        monkeypatch.setattr(native, "_cpu_signature", lambda: flags)
        monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")

    return use


def test_the_best_isa_the_cpu_runs_is_chosen(cpu, monkeypatch):
    monkeypatch.delenv("TRIFORCE_ISA", raising=False)
    monkeypatch.delenv("TRIFORCE_NATIVE", raising=False)
    cpu(ZEN4)
    assert native.cpu_isas() == ["avx512", "avx2"] and native.requested_isa() == "avx512"
    cpu(HASWELL)  # no AVX512: the AVX2 kernels, not PyTorch
    assert native.cpu_isas() == ["avx2"] and native.requested_isa() == "avx2"
    cpu("flags : fpu sse2 avx")  # neither
    assert native.cpu_isas() == [] and native.requested_isa() == "none"
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    assert native.cpu_isas() == [] and native.requested_isa() == "none"  # no asimd in those flags
    monkeypatch.setattr(native, "_cpu_signature", lambda: "Features : fp asimd evtstrm aes crc32")
    assert native.cpu_isas() == ["neon"] and native.requested_isa() == "neon"
    cpu(ZEN4)  # and an x86 CPU never takes the NEON build
    assert "neon" not in native.cpu_isas()


def test_triforce_isa_forces_a_level_or_says_why_not(cpu, monkeypatch):
    cpu(ZEN4)
    for isa in ("avx2", "none", "avx512"):
        monkeypatch.setenv("TRIFORCE_ISA", isa)
        assert native.requested_isa() == isa
    monkeypatch.setenv("TRIFORCE_ISA", "AVX2 ")
    assert native.requested_isa() == "avx2"
    cpu(HASWELL)
    monkeypatch.setenv("TRIFORCE_ISA", "avx512")
    with pytest.raises(TriforceError, match=r"the avx512 kernels need avx512f, .*avx512_bf16, which this CPU lacks "
                                            r"\(it runs: avx2, none\)"):
        native.requested_isa()
    monkeypatch.setenv("TRIFORCE_ISA", "neon")
    with pytest.raises(TriforceError, match=r"the neon kernels need an aarch64 CPU, which this CPU lacks "
                                            r"\(it runs: avx2, none\)"):
        native.requested_isa()
    monkeypatch.setenv("TRIFORCE_ISA", "sse")
    with pytest.raises(TriforceError, match="TRIFORCE_ISA must be one of auto, avx512, avx2, neon, none, got 'sse'"):
        native.requested_isa()
    monkeypatch.setenv("TRIFORCE_ISA", "avx2")
    monkeypatch.setenv("TRIFORCE_NATIVE", "0")  # the older switch still turns the kernels off
    assert native.requested_isa() == "none"


def test_set_isa_switches_the_path_for_models_loaded_afterwards():
    try:
        for isa in [*native.cpu_isas(), "none"]:
            ran = native.set_isa(isa)
            assert ran == native.kernels() == ("pytorch" if isa == "none" else isa)
            assert (native.library() is None) == (isa == "none")
            # long prefill passes go through the attention kernel only where it was measured faster
            if isa != "avx512":
                assert not native.prefill_on_kernel(torch.zeros(1, 8, 64, dtype=torch.bfloat16))
    finally:
        native.set_isa(None)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "neon", "none"])
def test_generate_names_the_kernels_that_ran(isa, monkeypatch):
    if isa != "none" and isa not in native.cpu_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    monkeypatch.setenv("TRIFORCE_ISA", isa)
    expected = "pytorch" if isa == "none" else isa
    args = ("generate", "--prompt", "The capital of France is", "--max-new-tokens", "4", "--draft", "ngram")
    result = run_cli(*args, "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["stats"]["kernels"] == expected
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"| kernels {expected}" in result.stderr


def test_a_bad_isa_is_one_line(monkeypatch):
    with pytest.raises(TriforceError, match="isa must be one of auto, avx512, avx2, neon, none, got 'sse'"):
        native.set_isa("sse")
    assert native.kernels() != "sse"  # nothing changed
    assert_clean_error(run_cli("bench", "decode", "--isa", "sse", "--quick"),
                       "isa must be one of auto, avx512, avx2, neon, none, got 'sse'")
    monkeypatch.setenv("TRIFORCE_ISA", "sve")
    assert_clean_error(run_cli("generate", "--prompt", "Hi", "--max-new-tokens", "2"),
                       "TRIFORCE_ISA must be one of auto, avx512, avx2, neon, none, got 'sve'")
