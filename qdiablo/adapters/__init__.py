"""Adapters on a frozen base: DiaBlo (qdiablo.diablo) and LoRA (PEFT), with what they share.

- `method`: `AdapterMethod`, everything qdiablo asks of one adapter method;
- `registry`: `--adapter` names → methods (`register_adapter`, `get_adapter`, `method_of`);
- `diablo`, `lora`: the two built-in methods (LoRA also on packed QuantLinear layers);
- `common`: the layers an adapter wraps, the trainable-parameter count, FSDP shard copies;
- `budget`: DiaBlo's N and LoRA's rank at matched trainable parameters;
- `loading`: `adapter_method`, `adapter_kind` and `load_adapter`, for a saved adapter folder;
- `scales`: the base's scales trained beside an adapter (`--train-scales`).
"""
