"""The tiny model's shapes, shared by the tests that run whole jobs on it."""

TINY_MODEL = {
  "model.embed_dim": 32,
  "model.num_layers": 1,
  "model.num_heads": 2,
  "model.num_kv_heads": 1,
  "model.head_dim": 16,
  "model.mlp_dim": 64,
}
