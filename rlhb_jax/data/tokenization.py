"""Tokenizers: a thin wrapper over transformers' fast tokenizer, built from any model source.

Sources: a Hugging Face directory (`tokenizer.json`), a GGUF file (vocabulary, merges, special
tokens and chat template in its metadata; built here with `gguf` + `tokenizers`, because
transformers' own GGUF path needs torch), or the project's own `tokenizers.Tokenizer` (the
simulator's tiny BPE).
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# The tiny BPE's chat format: "<|user|>{content}<|assistant|>" for one user message.
DEFAULT_CHAT_TEMPLATE = (
  "{% for message in messages %}"
  "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
  "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<eos>"
  "{% endif %}{% endfor %}"
  "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_EXTRA_FILE = "rlhb_tokenizer.json"  # eos ids beyond the tokenizer's own eos token

# llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) -> the original tokenizer's split regex.
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")  # digits split one by one first
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
_CONTROL = 3  # llama.cpp token types
_USER_DEFINED = 4


class Tokenizer:
  """Text <-> token ids for one model, plus its chat template.

  Attributes:
    hf: the wrapped `PreTrainedTokenizerFast`.
    eos_ids: every id that ends a generation.
    pad_id: the id used for padding (the eos id when the tokenizer has no pad token).
  """

  def __init__(self, hf: PreTrainedTokenizerFast, extra_eos_ids: Sequence[int] = ()):
    if hf.eos_token_id is None:
      raise ValueError("tokenizer has no eos token")
    self.hf = hf
    self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys([hf.eos_token_id, *extra_eos_ids]))
    self.pad_id: int = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id

  @property
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can produce (added tokens included)."""
    return len(self.hf)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, with no special tokens added."""
    return self.hf.encode(text, add_special_tokens=False)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, skipping special tokens."""
    return self.hf.decode(list(ids), skip_special_tokens=True)

  def chat_prompt(self, user_message: str, system: str = "") -> list[int]:
    """Ids of one user message in the chat template, ending with the assistant's turn opener.

    `system` replaces the template's default system message ("" keeps the default)."""
    if not self.hf.chat_template:
      return self.encode(user_message)
    messages = [{"role": "user", "content": user_message}]
    if system:
      messages.insert(0, {"role": "system", "content": system})
    text = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return self.encode(text)

  # -- persistence ---------------------------------------------------------------------------------

  def save(self, directory: str | pathlib.Path) -> None:
    """Writes tokenizer.json, its config (chat template included) and our eos ids to `directory`."""
    directory = pathlib.Path(directory)
    self.hf.save_pretrained(directory)
    (directory / _EXTRA_FILE).write_text(json.dumps({"eos_ids": list(self.eos_ids)}))

  @classmethod
  def load(cls, directory: str | pathlib.Path) -> Tokenizer:
    """Reads a directory written by `save` (or any Hugging Face tokenizer directory)."""
    directory = pathlib.Path(directory)
    hf = PreTrainedTokenizerFast.from_pretrained(str(directory))
    extra = directory / _EXTRA_FILE
    eos = json.loads(extra.read_text())["eos_ids"] if extra.exists() else ()
    return cls(hf, eos)

  # -- constructors --------------------------------------------------------------------------------

  @classmethod
  def from_hf_dir(cls, path: str | pathlib.Path) -> Tokenizer:
    """A Hugging Face model directory; eos ids also taken from generation_config.json if present."""
    path = pathlib.Path(path)
    tok = cls.load(path)
    gen = path / "generation_config.json"
    if gen.exists():
      eos = json.loads(gen.read_text()).get("eos_token_id")
      eos = [eos] if isinstance(eos, int) else (eos or [])
      tok.eos_ids = tuple(dict.fromkeys([*tok.eos_ids, *eos]))
    return tok

  @classmethod
  def from_tokenizers(
    cls,
    tok: tokenizers.Tokenizer,
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    eos_token: str = "<eos>",
    pad_token: str = "<pad>",
  ) -> Tokenizer:
    """The project's own BPE (specials `<pad>`, `<eos>`, `<bos>`, `<|user|>`, `<|assistant|>`)."""
    for token in (eos_token, pad_token):
      if tok.token_to_id(token) is None:
        raise ValueError(f"special token {token!r} is not in the vocabulary")
    hf = PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token=eos_token, pad_token=pad_token, chat_template=chat_template
    )
    return cls(hf)

  @classmethod
  def from_gguf(cls, path: str | pathlib.Path) -> Tokenizer:
    """The tokenizer described by a GGUF file's metadata (byte-level BPE vocabularies only)."""
    meta = _gguf_tokenizer_metadata(str(path))
    if meta["model"] != "gpt2":
      raise NotImplementedError(
        f"GGUF tokenizer model {meta['model']!r}: only byte-level BPE ('gpt2') is supported"
      )
    tokens, types = meta["tokens"], meta["token_type"]
    tok = _byte_level_bpe(tokens, meta["merges"], meta["pre"])
    to_byte_level = _byte_alphabet()
    # Control tokens (<|im_start|>, ...) are matched whole and skipped on decode; user-defined ones
    # are matched whole but kept. Only tokens spelled in the byte alphabet are in the BPE vocab.
    specials = [
      AddedToken(t, special=True, normalized=False)
      for t, ty in zip(tokens, types, strict=True)
      if ty == _CONTROL and set(t) <= to_byte_level
    ]
    user = [
      AddedToken(t, special=False, normalized=False)
      for t, ty in zip(tokens, types, strict=True)
      if ty == _USER_DEFINED and set(t) <= to_byte_level
    ]
    tok.add_special_tokens(specials)
    tok.add_tokens(user)
    name = lambda key: tokens[meta[key]] if meta.get(key) is not None else None
    hf = PreTrainedTokenizerFast(
      tokenizer_object=tok,
      bos_token=name("bos_token_id"),
      eos_token=name("eos_token_id"),
      unk_token=name("unknown_token_id"),
      pad_token=name("padding_token_id"),
      chat_template=meta.get("chat_template"),
    )
    return cls(hf)


@functools.cache
def _byte_alphabet() -> frozenset[str]:
  return frozenset(_bytes_to_unicode().values())


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map (how byte-level vocabularies spell)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> tokenizers.Tokenizer:
  """A byte-level BPE `tokenizers.Tokenizer` from llama.cpp's vocabulary, merges, pre-tokenizer."""
  alphabet, spell = _byte_alphabet(), _bytes_to_unicode()
  # Tokens stored as raw text (outside the byte alphabet) are respelled so BPE can produce them.
  vocab = {
    t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
    for i, t in enumerate(tokens)
  }
  pairs = [tuple(m.split(" ", 1)) for m in merges]
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
  if pre in _DIGITS_THEN_GPT2:
    tok.pre_tokenizer = pre_tokenizers.Sequence(
      [
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
      ]
    )
  elif pre in _SPLITS:
    tok.pre_tokenizer = pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
  else:  # "gpt2", "default" and unknown names: GPT-2's own split
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  return tok


def _gguf_tokenizer_metadata(path: str) -> dict:
  """The `tokenizer.*` metadata of a GGUF file as plain Python values, keys without the prefix."""
  import gguf  # heavy-ish; only GGUF users pay for it

  reader = gguf.GGUFReader(path)
  meta = {}
  for key, field in reader.fields.items():
    if key.startswith("tokenizer.ggml."):
      meta[key.removeprefix("tokenizer.ggml.")] = field.contents()
    elif key == "tokenizer.chat_template":
      meta["chat_template"] = field.contents()
  meta.setdefault("merges", [])
  meta.setdefault("token_type", [1] * len(meta["tokens"]))
  meta.setdefault("pre", "default")
  return meta
