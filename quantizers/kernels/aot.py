"""Compile every Triton kernel variant the launchers can start, for real GPU targets, on a machine
without a GPU, and read what each cubin needs (registers, spills, shared memory).

The matrix holds every registered kernel backend that declares `aot_launches`
(quantizers/kernels/backends.py): the built-in Triton kernels give `launches` below. The
launchers of `triton_qmm` build `Launch`es from tensors; here they get meta tensors (shapes,
strides and dtypes, no data) over a sweep of M, bit widths, dtypes, group layouts and bias, so
every tile and constexpr combination they can choose is found by running their own rules. Each
launch goes through Triton's own argument binder for the target, which yields exactly what the
JIT would compile: the signature, the constexprs (ints equal to 1 included), and the
divisibility-by-16 attributes of a real aligned shape. Each is compiled twice: with those
attributes ("div16") and with none ("plain", the ragged-shape variant). `triton.compile` with a
`GPUTarget` runs the wheel's ptxas with no driver; the wheel's cuobjdump reads the cubin's
registers, stack frame and local memory; dynamic shared memory is in the kernel's metadata.

    python -m quantizers.kernels.aot --archs 80 90 --jobs 2     # the matrix, as a markdown table

Private Triton APIs (the binder) are used: the dev extra pins the Triton version this is checked
with (pyproject.toml).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from quantizers.kernels import triton_qmm as qmm
from quantizers.kernels.backends import all_backends

# Opt-in dynamic shared memory per block (CUDA programming guide, compute capabilities table).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 120: 99 * 1024}
ARCHS = tuple(SHARED_LIMIT)
SPECS = ("div16", "plain")
PTXAS_ARTEFACT = (8, 128)
"""(bytes, registers): a stack frame this small in a kernel this far under the 255-register cap
is not register pressure but Triton 3.9's `--regAllocOptLevel=2` ptxas flag (a workaround for a
ptxas 13 bug): the same PTX through the same ptxas without it has no stack frame. Tolerated (and
shown in the table); anything larger, or near the cap, is a spill and fails."""
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BITS = (2, 3, 4, 8)
K, N = 4096, 4096  # an aligned real shape: every size and stride a multiple of 16
SMS = 132  # the GEMV's split count is a runtime integer; any device's SM count will do
# M over every power of two and its neighbours: whatever breakpoints the tile rules use.
M_SWEEP = sorted({max(1, 2**i + d) for i in range(14) for d in (-1, 0, 1)})


@dataclass(frozen=True)
class Variant:
    """One kernel the JIT can build: kernel name, the launch's constexprs and options, and the
    name of the launch it came from (kind, bits, dtype, group layout, bias)."""

    kernel: str
    label: str
    constexprs: tuple
    num_warps: int
    num_stages: int


@dataclass
class Result:
    kernel: str
    label: str
    tile: str
    arch: int
    spec: str  # "div16" or "plain"
    registers: int
    stack: int
    local: int
    shared: int
    seconds: float
    error: str = ""

    @property
    def ok(self) -> bool:
        """Compiled, within the target's shared memory, and no spill (see PTXAS_ARTEFACT)."""
        spill = self.stack + self.local
        artefact = spill <= PTXAS_ARTEFACT[0] and self.registers <= PTXAS_ARTEFACT[1]
        return (
            not self.error and self.shared <= SHARED_LIMIT[self.arch] and (spill == 0 or artefact)
        )


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def launches(m: int, bits: int, dtype: torch.dtype, aligned: bool, bias: bool) -> list:
    """The Launches the three launchers build for X [m, K] at these settings (meta tensors)."""
    qweight = _meta(K * bits // 32, N, dtype=torch.int32)
    groups, group = (K // 128, 128) if aligned else (K // 128, None)  # None: act-order
    qzeros = _meta(groups, N * bits // 32, dtype=torch.int32)
    scales = _meta(groups, N, dtype=torch.float16)
    g_idx = _meta(K, dtype=torch.int32)
    packed = (qweight, qzeros, scales, g_idx, bits)
    x, dy = _meta(m, K, dtype=dtype), _meta(m, N, dtype=dtype)
    b = _meta(N, dtype=dtype) if bias else None
    out = []
    if m <= qmm.GEMV_MAX_M:
        plan = qmm.gemv_plan(m, N, K, 4 * SMS)
        part = _meta(plan.splits, m, N, dtype=torch.float32)
        out.append(("gemv", qmm.gemv_launch(x, *packed, group, plan, part)))
    else:
        out.append(("fwd", qmm.forward_launch(x, *packed, b, group, _meta(m, N, dtype=dtype))))
    if not bias:  # dX has no bias; it runs for every M
        out.append(("dx", qmm.dx_launch(dy, *packed, group, _meta(m, K, dtype=dtype))))
    return out


def _bind(launch, target: GPUTarget):
    """Triton's own binder for `target`: (signature, constexprs, attrs, options) as the JIT
    would compile them."""
    backend = make_backend(target)
    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*launch.args, **launch.meta)
    return fn._pack_args(backend, launch.meta, bound, spec, options)


def _settings():
    """Every (bits, dtype name, dtype, aligned, bias, m) of the sweep."""
    for bits in BITS:
        for dname, dtype in DTYPES.items():
            for aligned in (True, False):
                for bias in (False, True):
                    for m in M_SWEEP:
                        yield bits, dname, dtype, aligned, bias, m


@functools.cache
def variants() -> dict[Variant, object]:
    """Every distinct (kernel, constexprs, warps, stages) the launchers of every registered
    backend with `aot_launches` can start, each with one Launch that starts it."""
    found: dict[Variant, object] = {}
    for backend in all_backends():
        if backend.aot_launches is None:
            continue
        for bits, dname, dtype, aligned, bias, m in _settings():
            for kind, launch in backend.aot_launches(m, bits, dtype, aligned, bias):
                consts = tuple(
                    (k, v) for k, v in launch.meta.items() if k not in ("num_warps", "num_stages")
                )
                layout = "aligned" if aligned else "act-order"
                label = f"{kind} {bits}-bit {dname} {layout}" + (
                    " bias" if bias and kind == "fwd" else ""
                )
                v = Variant(
                    launch.kernel.__name__,
                    label,
                    consts,
                    launch.meta["num_warps"],
                    launch.meta["num_stages"],
                )
                found.setdefault(v, launch)
    return found


def tile_name(v: Variant) -> str:
    c = dict(v.constexprs)
    return f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{v.num_warps} s{v.num_stages}"


_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack bytes, local bytes) of the cubin's one kernel, via the wheel's
    cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    match = _USAGE.search(out)
    if match is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {out[-500:]}")
    return tuple(int(g) for g in match.groups())


def compile_one(variant: Variant, launch, arch: int, spec: str) -> Result:
    """Compile one variant for sm_<arch>, with the JIT's attributes ("div16") or none ("plain")."""
    target = GPUTarget("cuda", arch, 32)
    t0 = time.perf_counter()
    try:
        options, signature, constexprs, attrs = _bind(launch, target)
        if spec == "plain":
            attrs = {}
        src = ASTSource(launch.kernel, signature, constexprs, attrs)
        compiled = triton.compile(src, target=target, options=options.__dict__)
        regs, stack, local = resource_usage(compiled.asm["cubin"])
        shared, error = compiled.metadata.shared, ""
    except Exception as e:  # a compile error is a result: it is reported, not raised
        regs = stack = local = shared = 0
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e) else ''}"
    seconds = time.perf_counter() - t0
    return Result(
        variant.kernel, variant.label, tile_name(variant), arch, spec,
        regs, stack, local, shared, seconds, error,
    )  # fmt: skip


def _compile_job(job: tuple) -> Result:
    index, arch, spec = job
    items = list(variants().items())
    return compile_one(*items[index], arch, spec)


def cache_key(variant: Variant, arch: int, spec: str) -> str:
    """What a compile result depends on: the kernel's source (Triton's hash of it and of the
    functions it calls), triton's version, the variant, the target and the attributes."""
    kernel = variants()[variant].kernel
    h = hashlib.sha256(f"{triton.__version__} {kernel.cache_key}".encode())
    h.update(repr((variant, arch, spec)).encode())
    return h.hexdigest()[:20]


def load_cache(path: str) -> dict[str, Result]:
    """Results recorded by `main --update` (benchmarks/results/kernel_aot.json), by cache key."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        records = json.load(f)["results"]
    return {r.pop("key"): Result(**r) for r in records}


def compile_matrix(
    archs=ARCHS,
    specs=SPECS,
    jobs: int = 1,
    select=None,
    progress: bool = False,
    cache: dict[str, Result] | None = None,
) -> list[tuple[str, Result]]:
    """(cache key, result) for every variant (or those `select(variant)` keeps), every arch and
    spec. Results found in `cache` (same kernel source and triton version) are not recompiled."""
    items = list(variants())
    cache = cache or {}
    work = [
        (i, a, s) for i, v in enumerate(items) if select is None or select(v)
        for a in archs for s in specs
    ]  # fmt: skip
    keys = [cache_key(items[i], a, s) for i, a, s in work]
    todo = [job for job, key in zip(work, keys) if key not in cache]
    if jobs <= 1 or len(todo) <= 1:
        it = map(_compile_job, todo)
    else:
        pool = ProcessPoolExecutor(jobs)
        it = pool.map(_compile_job, todo, chunksize=2)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(todo), desc="compiling kernels", file=sys.stderr)
    fresh = dict(zip([key for key in keys if key not in cache], it))
    if jobs > 1 and len(todo) > 1:
        pool.shutdown()
    return [(key, cache[key] if key in cache else fresh[key]) for key in keys]


def markdown(results: list[Result]) -> str:
    """One row per (kernel variant, arch), both specs folded: the worse of the two."""
    rows: dict[tuple, list[Result]] = {}
    for r in results:
        rows.setdefault((r.kernel, r.label, r.tile, r.arch), []).append(r)
    lines = [
        "| kernel | variant | tile (MxNxK, warps, stages) | arch | registers | shared bytes "
        "| spills (stack+local bytes) | ok |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for (kernel, label, tile, arch), rs in rows.items():
        regs = max(r.registers for r in rs)
        shared = max(r.shared for r in rs)
        spill = max(r.stack + r.local for r in rs)
        ok = "yes" if all(r.ok for r in rs) else "NO " + "; ".join(r.error for r in rs if r.error)
        lines.append(
            f"| {kernel} | {label} | {tile} | sm_{arch} | {regs} | {shared} | {spill} | {ok} |"
        )
    return "\n".join(lines)


def summary_markdown(results: list[Result]) -> str:
    """One row per (kernel, tile, arch): how many variants (bits x dtype x layout x bias x spec)
    compiled, their register range, most shared memory, worst spill, and failures."""
    rows: dict[tuple, list[Result]] = {}
    for r in results:
        kind = r.label.split()[0]
        rows.setdefault((kind, r.kernel, r.tile, r.arch), []).append(r)
    lines = [
        "| kernel | tile (MxNxK, warps, stages) | arch | compiled variants | registers "
        "| shared bytes (max) | spill bytes (max) | failing |",
        "|---|---|---|---:|---|---:|---:|---:|",
    ]
    for (kind, kernel, tile, arch), rs in sorted(rows.items(), key=lambda kv: kv[0]):
        regs = sorted(r.registers for r in rs)
        lines.append(
            f"| {kind} `{kernel}` | {tile} | sm_{arch} | {len(rs)} | {regs[0]}–{regs[-1]} "
            f"| {max(r.shared for r in rs)} | {max(r.stack + r.local for r in rs)} "
            f"| {sum(not r.ok for r in rs)} |"
        )
    return "\n".join(lines)


DEFAULT_CACHE = os.path.join(
    os.path.dirname(__file__), "..", "..", "benchmarks", "results", "kernel_aot.json"
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--archs", nargs="+", type=int, default=list(ARCHS))
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cache", default=DEFAULT_CACHE, help="recorded results (default: %(default)s)")
    p.add_argument("--update", action="store_true", help="write every result to --cache")
    p.add_argument("--fresh", action="store_true", help="ignore --cache: compile everything")
    p.add_argument("--summary", action="store_true", help="one row per kernel, tile and arch")
    args = p.parse_args()
    cache = {} if args.fresh else load_cache(args.cache)
    t0 = time.perf_counter()
    results = compile_matrix(args.archs, jobs=args.jobs, progress=True, cache=cache)
    wall = time.perf_counter() - t0
    rows = [r for _, r in results]
    print(summary_markdown(rows) if args.summary else markdown(rows))
    bad = [r for r in rows if not r.ok]
    compiled = sum(key not in cache for key, _ in results)
    print(
        f"\n{len(rows)} results ({len(variants())} variants x {len(args.archs)} archs x 2 specs),"
        f" {compiled} compiled in {wall:.0f} s with {args.jobs} jobs"
        f" ({sum(r.seconds for r in rows):.0f} s of compile time in all),"
        f" triton {triton.__version__}; {len(bad)} failing"
    )
    if args.update:
        current = {cache_key(v, a, s) for v in variants() for a in ARCHS for s in SPECS}
        merged = {**load_cache(args.cache), **dict(results)}
        merged = {k: r for k, r in merged.items() if k in current}  # drop stale source's
        records = [{"key": k, **asdict(r)} for k, r in merged.items()]
        tmp = args.cache + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"triton": triton.__version__, "results": records}, f, indent=0)
        os.replace(tmp, args.cache)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
