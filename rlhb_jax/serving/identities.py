"""The store's tables about who is asking: API keys, server secrets, and the sessions minted.

`IdentityTables` is mixed into `FeedbackStore` (store.py), whose serialised transactions
(`_write`, `_read`) it uses. Keys are kept as SHA-256 hashes (auth.py); the secrets (the session
signing key, the address key) live in `store_meta`, so every replica shares them, and
`rotate_secret` replaces one (every session signed with the old one is then refused). A session
mint is remembered by the keyed hash of the client's network only, for the per-address daily cap.
"""

from __future__ import annotations

import datetime
import secrets
import uuid
from collections.abc import Callable
from typing import Any

from rlhb_jax.serving.records import KeyRow


def utc_now(offset_seconds: float = 0.0) -> str:
  """The time (plus `offset_seconds`) as ISO 8601 UTC with milliseconds: sorts as it reads."""
  now = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=offset_seconds)
  return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_secret() -> str:
  return secrets.token_hex(32)


class IdentityTables:
  """API keys, secrets and session mints of a `FeedbackStore`."""

  _write: Callable[[Callable[[], Any]], Any]
  _read: Callable[..., list[tuple]]
  _execute: Callable[..., Any]
  _one: Callable[..., tuple | None]

  def add_key(self, name: str, key_hash: str) -> str:
    """Stores a new active key under `name`; returns its id (public, names it in lists)."""
    key_id = uuid.uuid4().hex[:12]
    self._write(
      lambda: self._execute(
        "INSERT INTO api_keys (id, name, key_hash, created_at) VALUES (?, ?, ?, ?)",
        (key_id, name, key_hash, utc_now()),
      )
    )
    return key_id

  def list_keys(self) -> list[KeyRow]:
    rows = self._read("SELECT id, name, created_at, revoked_at FROM api_keys ORDER BY created_at")
    return [KeyRow(*row) for row in rows]

  def revoke_key(self, key_id: str) -> bool:
    """Revokes the key; False if no active key has that id."""

    def revoke():
      cur = self._execute(
        "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
        (utc_now(), key_id),
      )
      return cur.rowcount == 1

    return self._write(revoke)

  def key_id(self, key_hash: str) -> str | None:
    """The id of the active key with this hash, or None (unknown or revoked)."""
    rows = self._read(
      "SELECT id FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (key_hash,)
    )
    return rows[0][0] if rows else None

  def secret(self, name: str, make: Callable[[], str] = new_secret) -> str:
    """A server secret kept in `store_meta` (made once with `make`), shared by every replica."""

    def get_or_make():
      self._execute(
        "INSERT INTO store_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
        (name, make()),
      )
      return self._one("SELECT value FROM store_meta WHERE key = ?", (name,))[0]

    return self._write(get_or_make)

  def rotate_secret(self, name: str) -> None:
    """Replaces the secret `name` with a new random one (servers pick it up as they poll)."""
    self._write(
      lambda: self._execute(
        "INSERT INTO store_meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (name, new_secret()),
      )
    )

  def mint_session(self, network: str, per_day: int) -> bool:
    """Records a session minted for `network` (a keyed hash); False, recording nothing, when
    `per_day` were already minted for it in the last 24 hours (`per_day` 0: no cap)."""

    if per_day <= 0:
      return True

    def mint():
      day_ago = utc_now(-86400.0)
      self._execute(
        "DELETE FROM session_mints WHERE network = ? AND created_at <= ?", (network, day_ago)
      )
      (n,) = self._one("SELECT COUNT(*) FROM session_mints WHERE network = ?", (network,))
      if n >= per_day:
        return False
      self._execute(
        "INSERT INTO session_mints (network, created_at) VALUES (?, ?)", (network, utc_now())
      )
      return True

    return self._write(mint)
