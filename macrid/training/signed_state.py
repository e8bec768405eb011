"""Ray Tune's experiment state, signed: `--resume` unpickles nothing that this project's driver did not write.

Tune keeps a sweep's state in <lake>/runs/<sweep>/ray/ as pickles (tuner.pkl, searcher-state-*.pkl) and as JSON
with cloudpickle blobs inside (experiment_state-*.json). `Tuner.restore` loads them, so whoever can write to the
bucket could run code on the driver of the next resume. The trust boundary is therefore the key, not the lake:

    write   the sweep's driver hands Tune `signing_filesystem(fs, experiment_dir)`: every file it writes at the
            top of the experiment folder is stored as one signed envelope, a header line then Tune's bytes:
                MACRID-SIGNED-1 {"name", "sweep", "sha256", "hmac"}\n<bytes>
            with hmac = HMAC-SHA256(key, name NUL sweep NUL sha256(bytes)): bound to the file's name and to the
            sweep (the experiment folder's sweep name), written in the one PUT (S3) or rename (local) that
            writes the data, so a driver killed at any moment leaves each file either old and signed or new and
            signed, never data without its signature
    resume  `verify_experiment` checks every such file before `Tuner.restore` is called, and the same
            filesystem checks each one again as Tune reads it, handing Tune the bytes without the header (no
            window between the check and the load)

The key is MACRID_STATE_KEY (any string; on Kubernetes, from a Secret), or else a random key in a file outside
the lake (MACRID_STATE_KEY_FILE, default ~/.config/macrid/state.key, mode 0600) created on first use. Only the
driver holds it: the filesystem pickled into trials and into Tune's own state carries no key and signs nothing.
Trial folders (results, progress, Ray Train's checkpoints) are not covered: restore reads them as JSON and CSV,
and model weights are loaded with `weights_only=True` (checkpoint.py).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import secrets

import pyarrow as pa
import pyarrow.fs as pafs

from macrid.errors import ConfigError

MAGIC = b"MACRID-SIGNED-1 "
KEY_ENV = "MACRID_STATE_KEY"
KEY_FILE_ENV = "MACRID_STATE_KEY_FILE"


def key_file() -> str:
    return os.environ.get(KEY_FILE_ENV) or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "macrid", "state.key")


def state_key() -> bytes:
    """The driver's signing key: MACRID_STATE_KEY, or the key file (created, 0600, on first use)."""
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].encode()
    path = key_file()
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another driver created it first
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    with open(path) as f:
        key = f.read().strip()
    if not key:
        raise ConfigError(f"{path}: the sweep-state key file is empty; delete it (a new key is made) or set {KEY_ENV}")
    return key.encode()


def signature(key: bytes, name: str, sweep: str, data: bytes) -> str:
    """HMAC-SHA256 over the file's name in the experiment folder, the sweep's name and its content's SHA-256."""
    return hmac.new(key, name.encode() + b"\0" + sweep.encode() + b"\0" + hashlib.sha256(data).digest(),
                    hashlib.sha256).hexdigest()


def sweep_of(experiment: str) -> str:
    """The sweep an experiment folder belongs to: <lake>/runs/<sweep>/ray -> <sweep>."""
    return experiment.rstrip("/").rsplit("/", 2)[-2]


def envelope(key: bytes, name: str, sweep: str, data: bytes) -> bytes:
    """One stored file: the signature header line, then the data."""
    header = {"name": name, "sweep": sweep, "sha256": hashlib.sha256(data).hexdigest(),
              "hmac": signature(key, name, sweep, data)}
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + data


def _signed_name(experiment: str, path: str) -> str | None:
    """The name a file at `path` is signed under, or None when it is not a top-level state file."""
    head, _, name = path.rstrip("/").rpartition("/")
    if head.rstrip("/") != experiment.rstrip("/"):
        return None
    return name


def opened(key: bytes, experiment: str, name: str, stored: bytes) -> bytes:
    """The data inside a stored envelope, once its signature is checked against this key, name and sweep."""
    where = f"{experiment}/{name}"
    what = f"refusing to resume: Ray Tune would unpickle {where}, which this project did not write with this key"
    todo = (f"if the sweep ran on another machine, set {KEY_ENV} to the key its driver used; if someone else changed "
            f"the lake (or the sweep was started before macrid 0.4), start a new sweep under another --name")
    if not stored.startswith(MAGIC) or b"\n" not in stored:
        raise ConfigError(f"{what} (it carries no signature); {todo}")
    line, _, data = stored[len(MAGIC):].partition(b"\n")
    try:
        expected = json.loads(line)["hmac"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{what} (its signature header is damaged); {todo}") from None
    if not hmac.compare_digest(str(expected), signature(key, name, sweep_of(experiment), data)):
        raise ConfigError(f"{what} (its signature does not match its content, name or sweep); {todo}")
    return data


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def verify_experiment(fs: pafs.FileSystem, experiment: str, key: bytes) -> list[str]:
    """Check every top-level file of Tune's experiment folder against its signature; returns the names checked."""
    infos = fs.get_file_info(pafs.FileSelector(experiment, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith("."))
    for name in names:
        opened(key, experiment, name, _read(fs, f"{experiment}/{name}"))
    return names


class _SignedWrite(io.BytesIO):
    """Collects a state file's bytes; on close writes them, then their signature."""

    def __init__(self, handler: SigningHandler, path: str, name: str):
        super().__init__()
        self._handler, self._path, self._name = handler, path, name

    def close(self) -> None:
        if not self.closed:
            self._handler.write_signed(self._path, self._name, self.getvalue())
        super().close()


class SigningHandler(pafs.FileSystemHandler):
    """A pyarrow filesystem handler over `inner` that signs, and checks on read, the experiment's state files.

    Pickled (Tune sends its storage filesystem to trials and stores it in its state), it becomes a plain
    pass-through without the key."""

    def __init__(self, inner: pafs.FileSystem, experiment: str, key: bytes | None):
        self.inner, self.experiment, self.key = inner, experiment.rstrip("/"), key

    def __reduce__(self):
        return SigningHandler, (self.inner, self.experiment, None)

    def write_signed(self, path: str, name: str, data: bytes) -> None:
        """Data and signature in one write: one PUT on an object store; locally a temporary file renamed over
        the old one, so a killed driver leaves the old file or the new one, each whole."""
        stored = envelope(self.key, name, sweep_of(self.experiment), data)
        if not isinstance(self.inner, pafs.LocalFileSystem):
            with self.inner.open_output_stream(path) as f:
                f.write(stored)
            return
        head, _, base = path.rpartition("/")
        temporary = f"{head}/.{base}.{secrets.token_hex(6)}.partial"  # dot-named: verify_experiment skips it
        with self.inner.open_output_stream(temporary) as f:
            f.write(stored)
        self.inner.move(temporary, path)

    def _checked(self, path: str) -> pa.NativeFile | None:
        name = _signed_name(self.experiment, path)
        if self.key is None or name is None or name.startswith("."):
            return None
        return pa.BufferReader(opened(self.key, self.experiment, name, _read(self.inner, path)))

    # -- reads: state files are checked --
    def open_input_stream(self, path):
        return self._checked(path) or self.inner.open_input_stream(path)

    def open_input_file(self, path):
        return self._checked(path) or self.inner.open_input_file(path)

    # -- writes: state files are signed --
    def open_output_stream(self, path, metadata):
        name = _signed_name(self.experiment, path)
        if self.key is None or name is None:
            return self.inner.open_output_stream(path, metadata=metadata)
        return pa.PythonFile(_SignedWrite(self, path, name), mode="w")

    def open_append_stream(self, path, metadata):
        if self.key is not None and _signed_name(self.experiment, path) is not None:
            raise OSError(f"{path}: appending to a signed sweep-state file is not supported")
        return self.inner.open_append_stream(path, metadata=metadata)

    def copy_file(self, src, dest):
        self._relocate(src, dest, keep=True)

    def move(self, src, dest):
        self._relocate(src, dest, keep=False)

    def _relocate(self, src: str, dest: str, keep: bool) -> None:
        """A state file's signature names the file, so a copy or move into or out of the top level is re-signed:
        the data is read as Tune sees it (checked when it was signed) and written as one new envelope."""
        old, new = _signed_name(self.experiment, src), _signed_name(self.experiment, dest)
        if self.key is None or (old is None and new is None):
            (self.inner.copy_file if keep else self.inner.move)(src, dest)
            return
        data = _read(self, src)
        if new is not None:
            self.write_signed(dest, new, data)
        else:
            with self.inner.open_output_stream(dest) as f:
                f.write(data)
        if not keep:
            self.inner.delete_file(src)

    # -- everything else passes through --
    def get_type_name(self):
        return "macrid-signed+" + self.inner.type_name

    def equals(self, other):
        return isinstance(other, SigningHandler) and self.inner.equals(other.inner) \
            and self.experiment == other.experiment

    def normalize_path(self, path):
        return self.inner.normalize_path(path)

    def get_file_info(self, paths):
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.inner.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.inner.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.inner.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.inner.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.inner.delete_file(path)


def signing_filesystem(inner: pafs.FileSystem, experiment: str, key: bytes) -> pafs.FileSystem:
    """`inner`, with the state files at the top of `experiment` (a path on `inner`) signed and checked."""
    return pafs.PyFileSystem(SigningHandler(inner, experiment, key))
