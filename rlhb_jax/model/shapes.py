"""Architectures of well-known checkpoints, for random initialisation (benchmarks, dry runs).

Loading a real checkpoint reads its shape from the checkpoint itself (`model/loading.py`); these
presets let a benchmark or a sharding dry run build a model of the same size without the weights.
"""

from rlhb_jax.model.llama import LlamaConfig

SHAPES = {
  "smollm2-135m": LlamaConfig(
    vocab_size=49152,
    embed_dim=576,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    mlp_dim=1536,
    rope_theta=100000.0,
  ),
  "llama3.2-1b": LlamaConfig(
    vocab_size=128256,
    embed_dim=2048,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    mlp_dim=8192,
    rope_theta=500000.0,
  ),
}
