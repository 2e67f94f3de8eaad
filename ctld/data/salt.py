"""The salt of the patient/series hashes: `shards.salt`, else `$CTLD_SALT`, else a random salt kept per user.

The salt keys every identifier hash (`ctld.data.dicom.anon_id`), so it is a secret: it is never written to
shards, manifests, configs written to disk or logs, and its default file lives outside the shard folder that
users copy and share.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from pathlib import Path

from ctld.config import REDACTED

logger = logging.getLogger(__name__)


def default_salt_file() -> Path:
    """$CTLD_SALT_FILE, else ${XDG_CONFIG_HOME:-~/.config}/ctld/salt: per user, outside any shard folder."""
    if os.environ.get("CTLD_SALT_FILE"):
        return Path(os.environ["CTLD_SALT_FILE"]).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "ctld" / "salt"


def _read_salt(path: Path) -> str:
    salt = path.read_text().strip()
    if not salt:
        raise SystemExit(f"ctld-shards: salt file {path} is empty; delete it (a new random salt is made) or fill it")
    return salt


def _write_salt_file(path: Path, salt: str) -> bool:
    """Create `path` (mode 0600) holding `salt`, never replacing one; False if it already exists."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(salt + "\n")
    try:
        os.link(tmp, path)  # atomic and exclusive: two builds starting together end with one salt
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def resolve_salt(cfg_salt: str, out_dir: Path) -> str:
    """shards.salt, else $CTLD_SALT, else a random salt kept per user in `default_salt_file()` (mode 0600), so
    reruns hash identically and nothing secret sits in the shard folder users copy. A `<out>/.salt` of an older
    build is still used (its shards keep their hashes) and moved to the per-user file when that is free."""
    if cfg_salt == REDACTED:
        raise SystemExit(f"ctld-shards: shards.salt is {REDACTED!r}, the placeholder ctld writes instead of the salt; "
                         "set the real salt (shards.salt or $CTLD_SALT) or leave it empty")
    if cfg_salt:
        return cfg_salt
    if os.environ.get("CTLD_SALT"):
        return os.environ["CTLD_SALT"]
    path = default_salt_file()
    legacy = out_dir / ".salt"
    try:
        if legacy.is_file():
            salt = _read_salt(legacy)
            if _write_salt_file(path, salt) or _read_salt(path) == salt:
                legacy.unlink()
                logger.warning("moved the salt of %s out of the shard folder to %s (keep it private)", out_dir, path)
            else:
                logger.warning("%s holds a salt that differs from %s; it is used, but move it out of the shard folder "
                               "(e.g. to a file named by $CTLD_SALT_FILE) before sharing the folder", legacy, path)
            return salt
        if not path.is_file():
            _write_salt_file(path, secrets.token_hex(32))
        return _read_salt(path)
    except OSError as error:
        raise SystemExit(f"ctld-shards: cannot read or create the salt file {path} ({error}); set shards.salt, "
                         "$CTLD_SALT or $CTLD_SALT_FILE") from error


def salt_check(salt: str) -> str:
    """A hash that tells two salts apart without revealing either: what partitions of one build compare. PBKDF2
    (200,000 rounds of HMAC-SHA256 keyed by the salt, over a fixed label) makes each guess of a weak salt cost as
    much as that, where a plain hash would allow billions of guesses per second."""
    return hashlib.pbkdf2_hmac("sha256", salt.encode(), b"ctld salt check", 200_000).hex()
