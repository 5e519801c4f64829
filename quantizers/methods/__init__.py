"""The built-in quantizers and steps, one module each, registered in `quantizers.registry` when
this package is imported (the `quantizers` package imports it first of all; no torch).

    rtn          round to nearest on the min-max grid (no calibration data)
    gptq         GPTQ, error-compensating (act-order, static groups)
    magr         pre-step: MagR magnitude reduction (`magr=True`)
    cd           post-step: coordinate descent against the original weights (`cd_sweeps`)
    reconstruct  block step: block-wise reconstruction (`reconstruct=True`)

A new quantizer is one more module like `rtn.py` (imported here, or by whoever uses it):
tests/test_quantizer_registry.py registers one from the test file alone.
"""

from quantizers.methods import cd, gptq, magr, reconstruct, rtn

__all__ = ["cd", "gptq", "magr", "reconstruct", "rtn"]
