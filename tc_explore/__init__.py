"""tc_explore: reverse-engineer language-model circuits with transcoders."""
from .errors import (IncompatibleTranscoderError, InvalidInputError, OfflineFileMissingError,
                     TcExploreError, UnknownTranscoderSetError, UnsafeFileError)
from .hub import load_transcoders
from .registry import list_transcoder_sets, registry
from .model import load_model
from .replacement import (ablate_mlps, mean_mlp_outputs, replace_mlps, run_with_ablated_mlps,
                          run_with_transcoders, transcoder_hooks, mlp_ablation_hooks)
from .transcoder import Transcoder, TranscoderSet
from .cross_layer import CrossLayerTranscoderSet
from .architecture import Architecture
from .evaluation import evaluate_transcoders
from .interventions import Intervention, generate, intervene

__version__ = "0.1.0"

__all__ = [
    "load_model", "load_transcoders", "list_transcoder_sets", "registry",
    "Transcoder", "TranscoderSet", "CrossLayerTranscoderSet", "Architecture",
    "replace_mlps", "ablate_mlps", "run_with_transcoders", "run_with_ablated_mlps",
    "transcoder_hooks", "mlp_ablation_hooks", "mean_mlp_outputs", "evaluate_transcoders",
    "Intervention", "intervene", "generate",
    "TcExploreError", "InvalidInputError", "IncompatibleTranscoderError", "UnsafeFileError",
    "OfflineFileMissingError", "UnknownTranscoderSetError",
]
