"""The one vocabulary of base kinds, for `qdiablo.models.load_base` and every flag mapped onto it.

Kept apart from the loader (which imports torch) so that building the CLI's flags stays light.
The packed kinds are the registered quantizers (quantizers/registry.py), read live: a quantizer
registered after import (a plugin, a test) is a base kind at once.
"""

from quantizers.registry import METHOD_NAMES, Names

PACKED_KINDS = METHOD_NAMES  # a `qdiablo quantize --method M` folder loads as kind M
BASE_KINDS = Names(lambda: ("auto", "fp", *METHOD_NAMES, "nf4", "nf2"))
# `qdiablo train --base`: every kind but "auto" (training names its base explicitly).
TRAIN_BASE_KINDS = Names(lambda: tuple(k for k in BASE_KINDS if k != "auto"))
# `qdiablo eval --quant` onto the base kinds: `none` keeps what the folder holds.
QUANT_FLAG_KINDS = {"none": "auto", "nf4": "nf4", "nf2": "nf2"}
BASE_QUANT_CHOICES = tuple(QUANT_FLAG_KINDS)
