"""Child process of tests/test_fake_cuda.py: qdiablo's CUDA code paths on a CPU-only torch.

Run under LD_PRELOAD=<fakecuda.so> (built from fakecuda.cpp by the test). FakeTensorMode places
tensors on "cuda" without a GPU (shapes, dtypes and devices, no data), so an operation that mixes
a CPU tensor into CUDA work raises as it would on a GPU; the shim's no-op CUDA device guard lets
autograd run backward on them. Checked, on "cuda":

- quantize: one decoder block, MagR + GPTQ with calibration data on the device;
- train: a packed DiaBlo step (forward + backward) in bf16 autocast, with and without gradient
  checkpointing: every gradient on the GPU, and no device→host read or host→device copy asked
  for by quantizers/ or qdiablo/diablo/ during the step;
- generate: greedy decoding with the KV cache, with and without the dequantized cache.

Values read back to the host (`.item()`, `bool(t)`, `.tolist()`) get stand-ins (fake tensors
hold no data). Prints one JSON object: per check, "ok" or the error, and the reads and copies.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import logging
import os
import sys
import traceback
from pathlib import Path

ctypes.CDLL(os.environ["QDIABLO_FAKECUDA_SO"], mode=ctypes.RTLD_GLOBAL).register_fake_cuda_guard()

import torch  # noqa: E402
from torch._library.custom_ops import OPDEFS  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OURS = tuple(str(REPO / p) for p in ("quantizers", "qdiablo", "eval"))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("QDIABLO_KERNEL", "torch")  # the torch path: triton needs a real GPU
logging.disable(logging.WARNING)


def site() -> str:
    """The innermost caller outside torch: a repository file:line, or a library."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        f = frame.filename
        if "/torch/" in f or f == __file__:
            continue
        return f"{f}:{frame.lineno}"
    return "torch"


# Reads whose default stand-in (True, 0) would take a branch fake tensors cannot follow, by
# the source line that asks.
STANDINS = {
    "if bool(done.any()):": False,  # greedy decoding: no row has finished
    "for row, t, d in zip(alive.tolist(), token.tolist(), done.tolist()):": False,
}


def source_line() -> str:
    """The text of the innermost repository line on the stack."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(OURS):
            return (frame.line or "").strip()
    return ""


class Spy(TorchDispatchMode):
    """Records device→host reads and host→device copies (with where they come from), answers
    reads with stand-ins, and runs qdiablo's custom ops' real bodies (FakeTensorMode would run
    only their shape functions)."""

    def __init__(self):
        super().__init__()
        self.reads: collections.Counter = collections.Counter()
        self.copies: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "qdiablo":
            with self:
                return OPDEFS[func.name()]._init_fn(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "equal") and args[0].device.type == "cuda":
            where, line = site(), source_line()
            self.reads[(name, where)] += 1
            if name == "equal":
                return True
            if line in STANDINS:
                return STANDINS[line]
            return True if args[0].dtype == torch.bool else 0  # checks pass, counts are zero
        if name == "_to_copy" and args[0].device.type == "cpu":
            dst = kwargs.get("device")
            if dst is not None and torch.device(dst).type == "cuda":
                self.copies[site()] += 1
        return func(*args, **kwargs)

    def ours(self) -> dict[str, list]:
        return {
            "reads": sorted(f"{k[0]} {k[1]}" for k in self.reads if k[1].startswith(OURS)),
            "copies": sorted(k for k in self.copies if k.startswith(OURS)),
        }


def _item_standin(self):
    if type(self).__name__ == "FakeTensor" and self.device.type == "cuda":
        return self.item()
    return _REAL["int"](self)


_REAL = {"int": torch.Tensor.__int__, "float": torch.Tensor.__float__}
torch.Tensor.__int__ = _item_standin
torch.Tensor.__index__ = _item_standin
torch.Tensor.__float__ = lambda self: float(_item_standin(self))


@contextlib.contextmanager
def cuda_autocast(dtype):
    """torch.autocast("cuda") switches itself off without CUDA: set its state by hand."""
    enabled, old = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        torch.autocast_decrement_nesting()
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", old)


@contextlib.contextmanager
def cuda_available():
    """Checkpointing's recompute re-enters torch.autocast("cuda"), which checks availability."""
    real = torch.cuda.is_available, torch.cuda.is_bf16_supported
    torch.cuda.is_available = lambda: True
    torch.cuda.is_bf16_supported = lambda *a, **k: True
    try:
        yield
    finally:
        torch.cuda.is_available, torch.cuda.is_bf16_supported = real


@contextlib.contextmanager
def movable_fakes():
    """Module.to() swaps a fake parameter's tensor in place (torch.utils.swap_tensors), which
    fails while the fake mode holds weak references to it; quantize moves each block to the
    device and back: there, point the parameter at the moved data instead."""
    real = torch.utils.swap_tensors

    def swap_or_assign(t1, t2):
        try:
            real(t1, t2)
        except RuntimeError:
            t1.data = t2.data

    torch.utils.swap_tensors = swap_or_assign
    try:
        yield
    finally:
        torch.utils.swap_tensors = real


def off_cuda(module) -> list[str]:
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [n for n, t in tensors if t.device.type != "cuda"]


def tiny(layers: int = 2):
    from conftest import make_tiny_llama

    return make_tiny_llama(hidden=128, intermediate=352, layers=layers, vocab=256)


def check_quantize() -> dict:
    from quantizers import QuantConfig, QuantLinear, quantize_model

    model = tiny(layers=1)  # on the host: quantize moves one block at a time to the device
    calib = [torch.randint(0, 256, (2, 32)) for _ in range(2)]
    with FakeTensorMode(allow_non_fake_inputs=True), Spy() as spy, movable_fakes():
        config = QuantConfig(method="gptq", bits=4, group_size=32, magr=True)
        quantize_model(model, calib, config, device="cuda")
        packed = [m for m in model.modules() if isinstance(m, QuantLinear)]
        assert len(packed) == 7, len(packed)
    return {"packed_layers": len(packed), **spy.ours()}


def packed_diablo():
    from qdiablo.diablo import DiaBloConfig, get_diablo_model
    from quantizers import QuantConfig, quantize_model

    model = tiny()
    quantize_model(model, None, QuantConfig(method="rtn", bits=2, group_size=64))
    model.config.use_cache = False
    return get_diablo_model(model, DiaBloConfig(num_blocks=8))  # real CPU weights: fingerprint


def check_train(checkpointing: bool) -> dict:
    wrapped = packed_diablo()
    with FakeTensorMode(allow_non_fake_inputs=True):
        wrapped.to("cuda")
        left = off_cuda(wrapped)
        assert not left, f"left on the CPU after .to('cuda'): {left[:5]}"
        if checkpointing:
            wrapped.model.activation_checkpointing_enable({"use_reentrant": False})
        wrapped.train()
        ids = torch.randint(0, 256, (2, 48), device="cuda")
        with Spy() as spy:
            with cuda_autocast(torch.bfloat16):
                loss = wrapped(input_ids=ids, labels=ids).loss
            with cuda_available() if checkpointing else contextlib.nullcontext():
                loss.backward()
        grads = {
            f"{p.grad.device.type}/{p.grad.dtype}"
            for p in wrapped.parameters()
            if p.requires_grad and p.grad is not None
        }
        assert grads == {"cuda/torch.float32"}, grads
        assert loss.device.type == "cuda"
    return spy.ours()


@contextlib.contextmanager
def no_grad_context(model, dequant_cache: bool = True):
    """eval.generate.inference_context under no_grad: a CPU tensor moved to "cuda" under
    inference mode is beyond what fake tensors can do (torch.tensor(..., device) is not)."""
    from eval import generate as generation

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), generation._dequantized_once(model, dequant_cache):
            yield
    finally:
        model.train(was_training)


def check_generate(dequant_cache: bool) -> dict:
    from eval import generate as generation
    from eval.generate import generate

    model = tiny()
    from quantizers import QuantConfig, quantize_model

    quantize_model(model, None, QuantConfig(method="rtn", bits=4, group_size=32))
    real = generation.inference_context
    generation.inference_context = no_grad_context  # fake tensors: no inference mode
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), Spy() as spy:
            model.to("cuda")
            out = generate(
                model,
                [[1, 5, 9, 13], [1, 7]],
                eos_token_ids=[2],
                pad_token_id=0,
                max_new_tokens=3,
                batch_size=2,
                progress=False,
                dequant_cache=dequant_cache,
            )
    finally:
        generation.inference_context = real
    # fake tensors hold no values: every row reads as row 0 and no token as EOS
    assert len(out) == 2 and sum(len(g.token_ids) for g in out) == 2 * 3, out
    return spy.ours()


CHECKS = {
    "quantize": check_quantize,
    "train": lambda: check_train(False),
    "train-checkpointing": lambda: check_train(True),
    "generate": lambda: check_generate(False),
    "generate-dequant-cache": lambda: check_generate(True),
}


def main() -> None:
    results = {}
    for name in sys.argv[1:] or CHECKS:
        try:
            results[name] = {"ok": True, **CHECKS[name]()}
        except Exception as e:  # reported to the test, which fails on it
            tb = [
                f"{f.filename}:{f.lineno}"
                for f in traceback.extract_tb(e.__traceback__)
                if f.filename.startswith(OURS) or "transformers" in f.filename
            ]
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            results[name] = {"ok": False, "error": error[:500], "at": tb[-6:]}
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
