"""`qdiablo export`: a quantized base, its adapter, optionally the merged model, a model card and
a manifest of sha256 hashes, in one folder (see `qdiablo.export.export` for the layout)."""

from qdiablo.export.export import export_model, load_exported, requantize_config
from qdiablo.export.manifest import is_export_folder, verify_export

__all__ = [
    "export_model",
    "is_export_folder",
    "load_exported",
    "requantize_config",
    "verify_export",
]
