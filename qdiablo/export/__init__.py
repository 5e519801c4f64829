"""`qdiablo export`: a quantized base, its adapter, optionally the merged model, a model card and
a manifest of sha256 hashes, in one folder (see `qdiablo.export.export` for the layout).

Reading an export back lives with the other loaders (`qdiablo.models.load_exported`) and the
manifest in `qdiablo.manifest`; both are re-exported here."""

from qdiablo.export.export import export_model, requantize_config
from qdiablo.manifest import is_export_folder, verify_export
from qdiablo.models import load_exported

__all__ = [
    "export_model",
    "is_export_folder",
    "load_exported",
    "requantize_config",
    "verify_export",
]
