"""Adapters on a frozen base: DiaBlo (qdiablo.diablo) and LoRA (PEFT), with what they share.

- `common`: the layers an adapter wraps, the trainable-parameter count;
- `budget`: DiaBlo's N and LoRA's rank at matched trainable parameters;
- `diablo`, `lora`: attaching each to a base (LoRA also on packed QuantLinear layers);
- `loading`: `adapter_kind` and `load_adapter`, for a saved adapter folder.
"""
