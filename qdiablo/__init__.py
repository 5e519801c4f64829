"""qdiablo: quantization-aware fine-tuning with DiaBlo diagonal blocks on MagR + GPTQ/RTN bases."""

__version__ = "0.1.0"
