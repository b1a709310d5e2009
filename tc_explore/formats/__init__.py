"""One reader (and a writer, for our own files and test fixtures) per published
transcoder file format. Readers never execute code from a file."""
from .gpt2_pickle import (LanguageModelSAERunnerConfig, read_gpt2_transcoder,
                          read_log_feature_sparsity, write_gpt2_transcoder,
                          write_log_feature_sparsity, safe_torch_load)
from .gemma_scope import read_gemma_scope_npz, write_gemma_scope_npz
from .circuit_tracer import (read_circuit_tracer_safetensors, write_circuit_tracer_safetensors,
                             read_gemma_scope_2_safetensors, write_gemma_scope_2_safetensors,
                             read_circuit_tracer_config, parse_hf_uri)

__all__ = [
    "LanguageModelSAERunnerConfig", "read_gpt2_transcoder", "read_log_feature_sparsity",
    "write_gpt2_transcoder", "write_log_feature_sparsity", "safe_torch_load",
    "read_gemma_scope_npz", "write_gemma_scope_npz",
    "read_circuit_tracer_safetensors", "write_circuit_tracer_safetensors",
    "read_gemma_scope_2_safetensors", "write_gemma_scope_2_safetensors",
    "read_circuit_tracer_config", "parse_hf_uri",
]
