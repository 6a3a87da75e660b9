"""mode=keys: add, list and revoke the API keys the server accepts (`serve.auth=keys` or
`keys_or_session`), in the run's feedback store (`serve.store_url`, default DIR/feedback.db).

  python -m rlhb_jax.main --config configs/base.py --workdir DIR --config.mode=keys \
    --config.api_keys.action=add --config.api_keys.name=alice  # prints the key, once
  ... --config.api_keys.action=list  # ids, names, dates; never the keys
  ... --config.api_keys.action=revoke --config.api_keys.id=KEY_ID  # refused from then on
  ... --config.api_keys.action=rotate_sessions  # a new session secret: every session refused

The store keeps a key's SHA-256 only, so a lost key cannot be shown again: revoke it, add another.
"""

from __future__ import annotations

import dataclasses
import pathlib

from rlhb_jax.config import Config
from rlhb_jax.serving import add_key, open_store
from rlhb_jax.serving.auth import SESSION_SECRET


class KeysError(Exception):
  """A key action that cannot be done (no name to add, no such key to revoke)."""


def run(cfg: Config, workdir: pathlib.Path) -> dict:
  action, serve = cfg.api_keys.action, cfg.serve
  with open_store(serve.store_url, workdir, serve.sqlite_synchronous) as store:
    if action == "add":
      try:
        key_id, key = add_key(store, cfg.api_keys.name)
      except ValueError as e:
        raise KeysError(f"{e}: --config.api_keys.name=NAME") from None
      print(f"key id: {key_id}  name: {cfg.api_keys.name}  store: {store.where}")
      print(f"key: {key}")
      print("Shown once: the store keeps only its hash. Clients send: Authorization: Bearer <key>")
      return {"id": key_id, "key": key}
    if action == "rotate_sessions":
      store.rotate_secret(SESSION_SECRET)
      print(
        f"new session secret in {store.where}: every session issued before is refused once the "
        "servers re-read it (within serve.reload_poll_seconds); the page gets a new one"
      )
      return {"rotated": SESSION_SECRET}
    if action == "revoke":
      if not store.revoke_key(cfg.api_keys.id):
        raise KeysError(
          f"no active key with id {cfg.api_keys.id!r} in {store.where}; "
          "--config.api_keys.action=list shows them"
        )
      print(f"revoked key {cfg.api_keys.id}")
      return {"revoked": cfg.api_keys.id}
    rows = store.list_keys()
  print(f"{len(rows)} keys in {store.where}")
  for row in rows:
    status = f"revoked {row.revoked_at}" if row.revoked_at else "active"
    print(f"  {row.id}  {row.name!r}  created {row.created_at}  {status}")
  return {"keys": [dataclasses.asdict(r) for r in rows]}
