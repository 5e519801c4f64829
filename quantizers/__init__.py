"""Calibration, MagR, RTN, GPTQ, packing, the packed QuantLinear, and the GPTQ checkpoint layout.

This package imports from neither `qdiablo` nor `eval` (DESIGN.md §6).
"""
