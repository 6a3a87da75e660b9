"""The simulator's users as identified clients: one API key each, one vote each.

With `serve.auth=keys` or `keys_or_session`, `mode=online`'s simulated users act as real ones must:
the user who asks gets the answer (`POST /v1/generate`), every other user it is shown to opens it
(`GET /v1/responses/{id}`, which records the impression), and each user posts only its own events,
one per type, value 1. The counts the simulator draws for a response (`Simulator.sample_behavior`:
likes and dislikes are one categorical draw per user, so they never overlap) are split over the
users who saw it, so the store's per-identity counts sum to exactly what was drawn.
"""

from __future__ import annotations

import concurrent.futures
import json
import urllib.request

import numpy as np

from rlhb_jax.serving import FeedbackStore, add_key


def request(url: str, body: dict | None = None, headers: dict | None = None) -> dict:
  """One JSON request (POST with a body, else GET); raises urllib's HTTPError on a refusal."""
  data = None if body is None else json.dumps(body).encode()
  head = {"Content-Type": "application/json"} | (headers or {})
  req = urllib.request.Request(url, data, head, method="GET" if body is None else "POST")
  with urllib.request.urlopen(req, timeout=120) as resp:
    return json.loads(resp.read())


class SimUsers:
  """Simulated users 0, 1, ..., each with an API key made in `store` the first time it acts."""

  def __init__(self, store: FeedbackStore, prefix: str = "online-sim-user"):
    self.store, self.prefix = store, prefix
    self._keys: dict[int, tuple[str, str]] = {}  # user -> (key id, key)

  def headers(self, user: int) -> dict[str, str]:
    if user not in self._keys:
      self._keys[user] = add_key(self.store, f"{self.prefix}-{user}")
    return {"Authorization": f"Bearer {self._keys[user][1]}"}

  def revoke(self) -> None:
    """Revokes every key made (a resumed run makes new ones)."""
    for key_id, _ in self._keys.values():
      self.store.revoke_key(key_id)
    self._keys.clear()


def viewers(asker: int, n: int, pool: int, rng: np.random.Generator) -> list[int]:
  """`n` distinct users shown an answer, the asker first, from `max(pool, n)` users."""
  others = [u for u in rng.choice(max(pool, n + 1), n, replace=False).tolist() if u != asker]
  return [asker, *others[: n - 1]]


def user_events(counts: dict[str, int], n: int) -> list[list[str]]:
  """The types each of `n` users reported, so that the sums over users are `counts`."""
  likes, dislikes = counts.get("likes", 0), counts.get("dislikes", 0)
  out = []
  for k in range(n):
    kinds = ["impressions"]
    if k < likes:
      kinds.append("likes")
    elif k < likes + dislikes:
      kinds.append("dislikes")
    if k < counts.get("clicks", 0):
      kinds.append("clicks")
    if k >= n - counts.get("requeries", 0):
      kinds.append("requeries")
    out.append(kinds)
  return out


def simulate(url, sim, queries, round: int, seed: int, threads: int, users: SimUsers, pool: int):
  """`online.simulate_clients` with identities; returns the behavior counts summed over the round
  (the same draws as without identities)."""
  asker_rng = np.random.default_rng([seed, round, 13])
  askers = asker_rng.choice(pool, len(queries)).tolist()
  for u in askers:
    users.headers(u)  # made here, in order: the key-making writes stay out of the worker threads

  def ask(i: int) -> dict:
    return request(f"{url}/v1/generate", {"query": queries[i]}, users.headers(askers[i]))

  with concurrent.futures.ThreadPoolExecutor(threads) as ex:
    answers = list(ex.map(ask, range(len(queries))))
  tasks, totals = [], {}
  for i, (q, a) in enumerate(zip(queries, answers, strict=True)):
    rng = np.random.default_rng([seed, round, i, 11])  # as without identities: the same counts
    n = sim.sample_impressions(rng)
    counts = sim.sample_behavior(q, a["response"], n, rng, round)
    for kind, value in counts.items():
      totals[kind] = totals.get(kind, 0) + value
    shown = viewers(askers[i], n, pool, np.random.default_rng([seed, round, i, 13]))
    for k, (user, kinds) in enumerate(zip(shown, user_events(counts, n), strict=True)):
      users.headers(user)
      tasks.append((a["id"], user, k > 0, kinds))

  def act(task) -> None:
    rid, user, opens, kinds = task
    head = users.headers(user)
    if opens:  # shown the answer another user asked for
      request(f"{url}/v1/responses/{rid}", None, head)
    for kind in kinds:
      request(
        f"{url}/v1/feedback", {"id": rid, "event_id": f"{rid}-{user}-{kind}", "type": kind}, head
      )

  with concurrent.futures.ThreadPoolExecutor(threads) as ex:
    list(ex.map(act, tasks))
  return totals
