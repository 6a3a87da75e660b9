"""Judges: the both-orders tie rule, the LLM judge (stub and tiny models), the HTTP judge."""

from __future__ import annotations

import http.server
import json
import re
import socket
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhb_jax.eval import judges
from rlhb_jax.eval.judges import (
  DEFAULT_TEMPLATE,
  HTTPJudge,
  LLMJudge,
  combine_verdicts,
  pairwise_prompt,
  parse_label,
  win_tie_loss,
)
from rlhb_jax.model.llama import LlamaConfig, Transformer, positions_from_mask

# -- Stubs: a word-level tokenizer and two LMs whose next-token logits we control -----------------

_WORD_LIST = (
  "<pad> <unk> <assistant> A B Question Response Which response is better ? Answer with one "
  "letter , or : . GOOD bad meh so what why how the capital of France Paris turtles"
)
WORDS = _WORD_LIST.split()


class WordTokenizer:
  """Whitespace and punctuation split over a fixed word list; the chat turn opener is one token."""

  pad_id = 0

  def __init__(self):
    self.ids = {w: i for i, w in enumerate(WORDS)}
    self.vocab_size = len(WORDS)

  def encode(self, text: str) -> list[int]:
    return [self.ids.get(w, 1) for w in re.findall(r"[\w<>]+|[^\w\s]", text)]

  def chat_prompt(self, message: str) -> list[int]:
    return self.encode(message) + [self.ids["<assistant>"]]


TOK = WordTokenizer()
A_ID, B_ID, GOOD_ID = TOK.ids["A"], TOK.ids["B"], TOK.ids["GOOD"]


class SlotBiasLM(nnx.Module):
  """Whatever the prompt, the same next-token logits: `bias` on label A's token, 0 elsewhere."""

  def __init__(self, bias: float):
    self.bias = nnx.Param(jnp.zeros(TOK.vocab_size).at[A_ID].set(bias))

  def trunk(self, tokens, positions, mask, cache=None):
    return jnp.zeros((*tokens.shape, 1)), None

  def logits(self, h):
    return h + self.bias[...]


class ContentLM(nnx.Module):
  """Prefers the slot holding the word GOOD: logit +1 on that slot's label, -1 on the other's.

  The GOOD token is in the first slot iff it comes before the first "B" token (the second slot's
  header), whichever order the judge shows. No GOOD: no preference.
  """

  def __init__(self):
    self.direction = nnx.Param(jnp.zeros(TOK.vocab_size).at[A_ID].set(1.0).at[B_ID].set(-1.0))

  def trunk(self, tokens, positions, mask, cache=None):
    good = (tokens == GOOD_ID) & mask
    first_b = jnp.argmax((tokens == B_ID) & mask, axis=1)
    in_first = jnp.argmax(good, axis=1) < first_b
    s = jnp.where(good.any(axis=1), jnp.where(in_first, 1.0, -1.0), 0.0)
    return jnp.broadcast_to(s[:, None, None], (*tokens.shape, 1)), None

  def logits(self, h):
    return h * self.direction[...]


QUERIES = ["what is the capital of France ?", "why so", "how"]
GOOD_FIRST = (["GOOD Paris", "meh", "bad"], ["bad", "GOOD turtles", "bad"])  # A wins, B wins, tie


def test_combine_verdicts_table():
  table = {
    ("first", "second"): "win",  # A preferred in both orders
    ("second", "first"): "loss",  # B preferred in both orders
    ("first", "first"): "tie",  # the first slot wins whatever it holds: position bias
    ("second", "second"): "tie",
    ("tie", "tie"): "tie",
    ("first", "tie"): "tie",
    ("tie", "second"): "tie",
    ("second", "tie"): "tie",
    ("tie", "first"): "tie",
  }
  for (first, second), want in table.items():
    assert combine_verdicts(first, second) == want, (first, second)
  with pytest.raises(ValueError, match="expected one of"):
    combine_verdicts("A", "B")


def test_llm_judge_builds_the_swapped_prompt():
  judge = LLMJudge(ContentLM(), TOK, batch_size=2)
  seen = []
  real = judge.label_logprobs
  judge.label_logprobs = lambda prompts: (seen.extend(prompts), real(prompts))[1]
  judge.compare("why so", "GOOD Paris", "bad turtles")
  assert len(seen) == 2
  assert seen[0] == TOK.chat_prompt(
    pairwise_prompt(DEFAULT_TEMPLATE, "why so", "GOOD Paris", "bad turtles", ("A", "B"))
  )
  assert seen[1] == judge.prompt_ids("why so", "bad turtles", "GOOD Paris")
  # Same question, the responses trade places: order 2 has B's text where order 1 had A's.
  a_ids, b_ids = TOK.encode("GOOD Paris"), TOK.encode("bad turtles")
  find = lambda ids, sub: next(i for i in range(len(ids)) if ids[i : i + len(sub)] == sub)
  assert find(seen[0], a_ids) == find(seen[1], b_ids) < find(seen[0], b_ids) == find(seen[1], a_ids)


@pytest.mark.parametrize("bias", [4.0, -4.0])
def test_position_biased_llm_judge_gives_only_ties(bias):
  judge = LLMJudge(SlotBiasLM(bias), TOK, batch_size=2)
  a, b = GOOD_FIRST
  slot = "first" if bias > 0 else "second"
  assert judge.order_verdicts(QUERIES, a, b) == [slot] * 6  # a confident preference, every order
  assert judge.compare_many(QUERIES, a, b) == ["tie"] * 3
  assert win_tie_loss(judge, QUERIES, a, b) == {"win": 0.0, "tie": 1.0, "loss": 0.0}


@pytest.mark.parametrize("chat_template", [True, False])
def test_content_consistent_llm_judge_gives_win_and_loss(chat_template):
  judge = LLMJudge(ContentLM(), TOK, batch_size=2, chat_template=chat_template)
  a, b = GOOD_FIRST
  assert judge.order_verdicts(QUERIES, a, b) == ["first", "second", "second", "first", "tie", "tie"]
  assert judge.compare_many(QUERIES, a, b) == ["win", "loss", "tie"]
  assert judge.compare_many(QUERIES, b, a) == ["loss", "win", "tie"]
  assert [judge.compare(*p) for p in zip(QUERIES, a, b, strict=True)] == ["win", "loss", "tie"]
  assert win_tie_loss(judge, QUERIES, a, b) == pytest.approx(
    {"win": 1 / 3, "tie": 1 / 3, "loss": 1 / 3}
  )


def test_llm_judge_margin_turns_weak_preferences_into_ties():
  a, b = GOOD_FIRST
  assert LLMJudge(SlotBiasLM(0.5), TOK).order_verdicts(QUERIES[:1], a[:1], b[:1]) == ["first"] * 2
  weak = LLMJudge(SlotBiasLM(0.5), TOK, margin=1.0)
  assert weak.order_verdicts(QUERIES[:1], a[:1], b[:1]) == ["tie"] * 2
  strong = LLMJudge(SlotBiasLM(2.0), TOK, margin=1.0)
  assert strong.order_verdicts(QUERIES[:1], a[:1], b[:1]) == ["first"] * 2


def test_llm_judge_refuses_bad_inputs():
  with pytest.raises(ValueError, match="single tokens"):
    LLMJudge(ContentLM(), TOK, labels=("First", "Second"))
  with pytest.raises(ValueError, match="distinct"):
    LLMJudge(ContentLM(), TOK, labels=("A", "A"))
  judge = LLMJudge(ContentLM(), TOK, buckets=(8,))
  with pytest.raises(ValueError, match="largest bucket 8"):
    judge.compare("why", "GOOD", "bad")
  with pytest.raises(ValueError, match="2 queries, 1 A responses"):
    judge.compare_many(["why", "how"], ["GOOD"], ["bad"])


def test_win_tie_loss_prefers_compare_many_and_keeps_compare():
  class Batched:
    calls = 0

    def compare(self, query, a, b):
      raise AssertionError("compare_many should be used")

    def compare_many(self, queries, a, b):
      self.calls += 1
      return ["win" if x > y else "loss" if x < y else "tie" for x, y in zip(a, b, strict=True)]

  class OneByOne:
    def compare(self, query, a, b):
      return "win" if a > b else "loss" if a < b else "tie"

  batched = Batched()
  want = {"win": 0.5, "tie": 0.25, "loss": 0.25}
  args = (["q"] * 4, ["b", "b", "a", "c"], ["a", "a", "b", "c"])
  assert win_tie_loss(batched, *args) == want and batched.calls == 1
  assert win_tie_loss(OneByOne(), *args) == want
  with pytest.raises(ValueError):
    win_tie_loss(batched, ["q"], ["a", "b"], ["a", "b"])


# -- A tiny random Transformer with a real BPE tokenizer, end to end ------------------------------


@pytest.fixture(scope="module")
def tiny():
  from rlhb_jax.data.tokenization import Tokenizer
  from rlhb_jax.sim.bpe import train_bpe

  texts = [
    pairwise_prompt(DEFAULT_TEMPLATE, "what is the capital of France?", "Paris", "Rome", ("A", "B"))
  ]
  texts += ["the cat sat on the mat", "Answer A", "Answer B", "hello world"] * 5
  tok = Tokenizer.from_tokenizers(train_bpe(texts, 200))
  cfg = LlamaConfig(
    vocab_size=tok.vocab_size,
    embed_dim=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
  )
  return Transformer(cfg, rngs=nnx.Rngs(3)), tok


def test_llm_judge_on_tiny_transformer_end_to_end(tiny):
  model, tok = tiny
  judge = LLMJudge(model, tok, batch_size=2, buckets=(64, 128, 256))
  assert judge.label_ids == (tok.encode("A")[0], tok.encode("B")[0])
  queries = ["what is the capital of France?", "hello?", "the cat?"]
  a, b = ["Paris", "the mat", "hello world"], ["Rome", "a cat sat on the mat today", "world"]
  verdicts = judge.compare_many(queries, a, b)
  assert set(verdicts) <= {"win", "tie", "loss"} and len(verdicts) == 3
  flip = {"win": "loss", "loss": "win", "tie": "tie"}
  assert judge.compare_many(queries, b, a) == [flip[v] for v in verdicts]
  assert judge.compare_many(queries, a, a) == ["tie"] * 3  # identical: same slot in both orders

  # The batched, left-padded label log-probs equal an unpadded forward of each prompt alone.
  prompts = [judge.prompt_ids(q, x, y) for q, x, y in zip(queries, a, b, strict=True)]
  got = judge.label_logprobs(prompts)
  for p, row in zip(prompts, got, strict=True):
    tokens = jnp.asarray([p])
    mask = jnp.ones_like(tokens, bool)
    logits, _ = model(tokens, positions_from_mask(mask), mask)
    want = jax.nn.log_softmax(logits[0, -1])[jnp.asarray(judge.label_ids)]
    np.testing.assert_allclose(row, want, atol=1e-5)
  assert not np.allclose(got[:, 0] - got[:, 1], 0.0)  # a real preference, not a constant tie


def test_llm_judge_new_batches_in_the_same_bucket_do_not_recompile(tiny):
  model, tok = tiny
  judge = LLMJudge(model, tok, batch_size=2, buckets=(256,))
  judge.compare_many(["hello?"], ["world"], ["hello world"])
  compiled = judges.label_logprobs_jit._cache_size()
  judge.compare_many(["the cat?"] * 3, ["the mat", "sat", "cat"], ["on", "the", "hello"])
  assert judges.label_logprobs_jit._cache_size() == compiled


# -- The HTTP judge against a fake OpenAI-compatible server ----------------------------------------


class FakeAPI(http.server.BaseHTTPRequestHandler):
  """Chat completions that answer by `server.mode`: "first" always says A (position bias),
  "content" names the slot holding GOOD (none: an unreadable reply), "error" is a 503, "flaky"
  fails once, then answers like "content"."""

  def do_POST(self):
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    server = self.server
    server.requests.append((self.path, self.headers.get("Authorization"), body))
    if server.mode == "error" or (server.mode == "flaky" and len(server.requests) == 1):
      return self._send(503, {"error": {"message": "overloaded"}})
    message = body["messages"][-1]["content"]
    if server.mode == "first":
      reply = "A"
    elif "GOOD" not in message:
      reply = "Both are fine."
    else:
      reply = "A." if message.index("GOOD") < message.index("Response B") else "**B**"
    self._send(200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})

  def _send(self, code, payload):
    data = json.dumps(payload).encode()
    self.send_response(code)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def log_message(self, *args):
    pass


@pytest.fixture
def api():
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeAPI)
  server.mode, server.requests = "content", []
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
  server.shutdown()
  server.server_close()


def test_parse_label_reads_common_replies():
  for reply, want in [
    ("A", "first"),
    (" b.\n", "second"),
    ("**B**", "second"),
    ("Response A", "first"),
    ("B is better.", "second"),
    ("A is worse than B", "tie"),
    ("Both are fine.", "tie"),
    ("", "tie"),
  ]:
    assert parse_label(reply) == want, reply
  assert parse_label("2", ("1", "2")) == "second"


def test_http_judge_content_verdicts_and_request(api, monkeypatch):
  server, url = api
  monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test")
  judge = HTTPJudge(url + "/", "judge-model", api_key_env="JUDGE_TEST_KEY", max_workers=2)
  a, b = GOOD_FIRST
  assert judge.compare_many(QUERIES, a, b) == ["win", "loss", "tie"]
  assert win_tie_loss(judge, QUERIES, b, a) == pytest.approx(
    {"win": 1 / 3, "tie": 1 / 3, "loss": 1 / 3}
  )
  path, auth, body = server.requests[0]
  assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
  assert body["model"] == "judge-model" and body["temperature"] == 0
  messages = sorted(r[2]["messages"][0]["content"] for r in server.requests[:6])
  want = [
    pairwise_prompt(DEFAULT_TEMPLATE, q, *o, ("A", "B"))
    for q, x, y in zip(QUERIES, a, b, strict=True)
    for o in ((x, y), (y, x))
  ]
  assert messages == sorted(want)  # both orders of every pair were asked


def test_http_judge_position_bias_gives_ties(api, monkeypatch):
  server, url = api
  server.mode = "first"
  monkeypatch.delenv("OPENAI_API_KEY", raising=False)
  judge = HTTPJudge(url, "m")
  a, b = GOOD_FIRST
  assert judge.order_verdicts(QUERIES, a, b) == ["first"] * 6
  assert judge.compare_many(QUERIES, a, b) == ["tie"] * 3
  assert server.requests[0][1] is None  # no key in the environment: no Authorization header


def test_http_judge_errors_name_the_url(api):
  server, url = api
  server.mode = "error"
  with pytest.raises(RuntimeError, match=re.escape(f"{url}/chat/completions: HTTP 503")):
    HTTPJudge(url, "m", retries=0).compare("q", "x", "y")
  server.mode = "flaky"
  assert HTTPJudge(url, "m", retries=1, backoff=0.0).compare("q", "GOOD", "bad") == "win"
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  dead = f"http://127.0.0.1:{port}/v1"
  with pytest.raises(RuntimeError, match=re.escape(f"{dead}/chat/completions: cannot reach it")):
    HTTPJudge(dead, "m", retries=0, timeout=5).compare("q", "x", "y")


# -- The real SmolLM2-135M-Instruct ----------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_judge_reads_its_answer_tokens():
  from rlhb_jax.model.config import ModelSpec
  from rlhb_jax.model.loading import load_model

  model, tok = load_model(ModelSpec(source="smollm2-135m-instruct"))
  judge = LLMJudge(model, tok, batch_size=4)
  assert judge.label_ids == (tok.encode("A")[0], tok.encode("B")[0])  # bare after "assistant\n"
  queries = [
    "What is the capital of France?",
    "What is 2 + 2?",
    "How many legs does a spider have?",
  ]
  a = ["The capital of France is Paris.", "2 + 2 = 4.", "A spider has eight legs."]
  b = ["I like turtles.", "2 + 2 = 5.", "Spiders have three legs."]
  prompts = [judge.prompt_ids(*o) for o in judges._both_orders(queries, a, b)]
  mass = np.exp(judge.label_logprobs(prompts)).sum(axis=1)
  assert (mass > 0.15).all(), mass  # the answer position really is where A / B come out
  verdicts = judge.compare_many(queries, a, b)
  flip = {"win": "loss", "loss": "win", "tie": "tie"}
  assert judge.compare_many(queries, b, a) == [flip[v] for v in verdicts]
  assert judge.compare_many(queries, a, a) == ["tie"] * 3


def test_heldout_queries_are_a_seeded_subset_and_zero_means_every_one():
  import types

  from rlhb_jax import config as config_lib
  from rlhb_jax.eval.evaluate import heldout_queries
  from rlhb_jax.sim import Simulator

  sim = Simulator(seed=0)
  every = sim.queries("heldout")

  def run(n: int, seed: int = 0):
    cfg = config_lib.replace(config_lib.Config(), **{"eval.num_queries": n, "seed": seed})
    return types.SimpleNamespace(simulator=sim, cfg=cfg)

  assert heldout_queries(run(0)) == every and len(every) > 200
  some = heldout_queries(run(48))
  assert len(some) == 48 and some == [q for q in every if q in set(some)]  # in the list's order
  assert heldout_queries(run(48)) == some and heldout_queries(run(48, seed=1)) != some
  with pytest.raises(ValueError, match="num_queries=-1"):
    config_lib.replace(config_lib.Config(), **{"eval.num_queries": -1})
