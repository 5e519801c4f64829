"""Every Triton kernel variant the launchers can start compiles for real GPU targets on this CPU
machine, with no register spill and within each target's shared memory (the whole matrix for
sm_80 and sm_90, a representative subset for sm_86, sm_89 and sm_120).

`quantizers.kernels.aot` builds the launches from meta tensors, binds
them with Triton's own binder for each target, compiles them with the wheel's ptxas and reads
the cubins with its cuobjdump.

The quick loop compiles a representative subset fresh. The full matrix (`slow`) reads results
recorded for the same kernel source and triton version from benchmarks/results/kernel_aot.json
(`python -m quantizers.kernels.aot --update` writes it) and compiles whatever is missing there,
a cold matrix taking tens of minutes on 2 cores, then recompiles a sample of the recorded
results to check that they still hold.
"""

from __future__ import annotations

import itertools

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from quantizers import kernels

QMM = kernels.triton_module()
if QMM is None or QMM.INTERPRETED:
    pytest.skip("needs triton's compiler (not TRITON_INTERPRET=1)", allow_module_level=True)

from quantizers.kernels import aot  # noqa: E402 (needs triton's compiler)

FULL_ARCHS = (80, 90)  # the whole matrix; sm_86/89/120 get the representative subset below


def _find(label: str, tile_prefix: str) -> aot.Variant:
    (v,) = [
        v for v in aot.variants() if v.label == label and aot.tile_name(v).startswith(tile_prefix)
    ]
    return v


# (label, tile, arch, spec): the 3-bit tiles that used to spill, act-order's gathers that used
# to overflow sm_86/89's shared memory, bf16 training tiles, a GEMV, fp32's FMA dot.
REPRESENTATIVE = [
    ("dx 3-bit fp16 aligned", "16x64x128", 80, "div16"),
    ("fwd 3-bit fp16 act-order", "16x64x64", 89, "plain"),
    ("fwd 4-bit bf16 aligned bias", "128x128x32", 90, "div16"),
    ("dx 2-bit bf16 aligned", "128x32x128", 120, "plain"),
    ("gemv 3-bit bf16 act-order", "1x32x64", 86, "div16"),
    ("fwd 8-bit fp32 act-order", "16x32x32", 80, "plain"),
]


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """An empty Triton cache: compile for real, not from an earlier run's cubins."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))


def test_matrix_covers_every_launch_setting():
    """The variants found by sweeping the launchers cover every kind x bits x dtype x group
    layout (x bias for forward), and every tile the tile rules return."""
    labels = {v.label for v in aot.variants()}
    for bits, dtype, layout in itertools.product(aot.BITS, aot.DTYPES, ("aligned", "act-order")):
        stem = f"{bits}-bit {dtype} {layout}"
        assert {f"fwd {stem}", f"fwd {stem} bias", f"dx {stem}", f"gemv {stem}"} <= labels
    tiles = {(v.kernel, *(dict(v.constexprs)[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")))
             for v in aot.variants()}  # fmt: skip
    for dtype in aot.DTYPES.values():
        for m in (9, 64, 65, 4096):
            t = QMM.gemm_tile(m, dtype, 4)
            assert ("_qmm_fwd_kernel", t.block_m, t.block_n, t.block_k) in tiles
            t = QMM.dx_tile(m, dtype, 4)
            assert ("_qmm_dx_kernel", t.block_m, t.block_n, t.block_k) in tiles
    for m in range(1, QMM.GEMV_MAX_M + 1):
        t = QMM.gemv_tile(m)
        assert ("_qmv_kernel", t.block_m, t.block_n, t.block_k) in tiles


@pytest.mark.parametrize("label, tile, arch, spec", REPRESENTATIVE)
def test_representative_variants_compile_without_spills(label, tile, arch, spec, fresh_cache):
    v = _find(label, tile)
    r = aot.compile_one(v, aot.variants()[v], arch, spec)
    assert not r.error, r.error
    assert r.stack == 0 and r.local == 0, f"{label} {tile} sm_{arch}: spills {r}"
    assert 0 < r.registers <= 255
    assert r.shared <= aot.SHARED_LIMIT[arch], f"{r.shared} B > sm_{arch}'s limit"


@pytest.mark.slow
def test_full_matrix_compiles_without_spills_within_shared_memory(monkeypatch, tmp_path):
    cache = aot.load_cache(aot.DEFAULT_CACHE)
    results = aot.compile_matrix(FULL_ARCHS, jobs=2, cache=cache)
    assert len(results) == len(aot.variants()) * len(FULL_ARCHS) * len(aot.SPECS)
    bad = [f"{r.label} {r.tile} sm_{r.arch} {r.spec}: {r}" for _, r in results if not r.ok]
    assert not bad, "\n".join(bad[:20])
    # recorded results must still be what the compiler produces: recompile one per arch
    recorded = [(k, r) for k, r in results if k in cache]
    sample = {r.arch: (k, r) for k, r in recorded[:: max(1, len(recorded) // 40)]}.values()
    items = {(v.label, aot.tile_name(v)): (v, launch) for v, launch in aot.variants().items()}
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # really compile the sample
    for _, r in sample:
        fresh = aot.compile_one(*items[(r.label, r.tile)], r.arch, r.spec)
        assert (fresh.registers, fresh.stack, fresh.local, fresh.shared) == (
            r.registers, r.stack, r.local, r.shared
        ), f"recorded {r} but compiled {fresh}"  # fmt: skip
