"""Architectures of well-known checkpoints, for random initialisation (benchmarks, dry runs).

Loading a real checkpoint reads its shape from the checkpoint itself (`model/loading.py`); these
presets let a benchmark or a sharding dry run build a model of the same size without the weights.
"""

from rlhb_jax.model.llama import LlamaConfig

_FIELDS = ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim")
SHAPES = {
  name: LlamaConfig(**dict(zip(_FIELDS, dims, strict=True)), mlp_dim=mlp, rope_theta=theta)
  for name, dims, mlp, theta in (
    ("smollm2-135m", (49152, 576, 30, 9, 3, 64), 1536, 100000.0),
    ("llama3.2-1b", (128256, 2048, 16, 32, 8, 64), 8192, 500000.0),
  )
}
# Meta-Llama-3-8B(-Instruct): untied embeddings, no RoPE scaling (3.1 adds it).
SHAPES["llama3-8b"] = LlamaConfig(
  vocab_size=128256,
  embed_dim=4096,
  num_layers=32,
  num_heads=32,
  num_kv_heads=8,
  head_dim=128,
  mlp_dim=14336,
  rope_theta=500000.0,
  tie_embeddings=False,
)
