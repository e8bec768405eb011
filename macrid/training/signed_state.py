"""Ray Tune's experiment state, signed: `--resume` unpickles nothing that this project's driver did not write.

Tune keeps a sweep's state in <lake>/runs/<sweep>/ray/ as pickles (tuner.pkl, searcher-state-*.pkl) and as JSON
with cloudpickle blobs inside (experiment_state-*.json). `Tuner.restore` loads them, so whoever can write to the
bucket could run code on the driver of the next resume. The trust boundary is therefore the key, not the lake:

    write   the sweep's driver hands Tune `signing_filesystem(fs, experiment_dir)`: every file it writes at the
            top of the experiment folder gets `<file>.sig` beside it, HMAC-SHA256(key, name + sha256(bytes))
    resume  `verify_experiment` checks every such file before `Tuner.restore` is called, and the same
            filesystem checks each one again as Tune reads it (no window between the check and the load)

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

SIGNATURE_SUFFIX = ".sig"
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


def signature(key: bytes, name: str, data: bytes) -> str:
    """HMAC-SHA256 over the file's name in the experiment folder and its content's SHA-256."""
    return hmac.new(key, name.encode() + b"\0" + hashlib.sha256(data).digest(), hashlib.sha256).hexdigest()


def _signed_name(experiment: str, path: str) -> str | None:
    """The name a file at `path` is signed under, or None when it is not a top-level state file."""
    head, _, name = path.rstrip("/").rpartition("/")
    if head.rstrip("/") != experiment.rstrip("/") or name.endswith(SIGNATURE_SUFFIX):
        return None
    return name


def verify(key: bytes, experiment: str, name: str, data: bytes, sig_text: str | None) -> None:
    where = f"{experiment}/{name}"
    what = (f"refusing to resume: Ray Tune would unpickle {where}, which this project did not write with "
            f"this key")
    todo = (f"if the sweep ran on another machine, set {KEY_ENV} to the key its driver used; if someone else changed "
            f"the lake, start a new sweep under another --name")
    if sig_text is None:
        raise ConfigError(f"{what} ({name}{SIGNATURE_SUFFIX} is missing); {todo}")
    try:
        record = json.loads(sig_text)
        expected = record["hmac"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{what} ({name}{SIGNATURE_SUFFIX} is not a signature record); {todo}") from None
    if not hmac.compare_digest(str(expected), signature(key, name, data)):
        raise ConfigError(f"{what} (its signature does not match its content); {todo}")


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def verify_experiment(fs: pafs.FileSystem, experiment: str, key: bytes) -> list[str]:
    """Check every top-level file of Tune's experiment folder against its signature; returns the names checked."""
    infos = fs.get_file_info(pafs.FileSelector(experiment, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File
                   and not i.base_name.endswith(SIGNATURE_SUFFIX))
    sigs = {i.base_name for i in infos if i.base_name.endswith(SIGNATURE_SUFFIX)}
    for name in names:
        sig = _read(fs, f"{experiment}/{name}{SIGNATURE_SUFFIX}").decode() if name + SIGNATURE_SUFFIX in sigs else None
        verify(key, experiment, name, _read(fs, f"{experiment}/{name}"), sig)
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
        with self.inner.open_output_stream(path) as f:
            f.write(data)
        record = {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "hmac": signature(self.key, name, data)}
        with self.inner.open_output_stream(path + SIGNATURE_SUFFIX) as f:
            f.write(json.dumps(record).encode())

    def _checked(self, path: str) -> pa.NativeFile | None:
        name = _signed_name(self.experiment, path)
        if self.key is None or name is None:
            return None
        data = _read(self.inner, path)
        try:
            sig = _read(self.inner, path + SIGNATURE_SUFFIX).decode()
        except FileNotFoundError:
            sig = None
        verify(self.key, self.experiment, name, data, sig)
        return pa.BufferReader(data)

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
        self.inner.copy_file(src, dest)
        self._resign(dest)

    def move(self, src, dest):
        self.inner.move(src, dest)
        self._resign(dest)

    def _resign(self, dest: str) -> None:
        name = _signed_name(self.experiment, dest)
        if self.key is not None and name is not None:
            self.write_signed(dest, name, _read(self.inner, dest))

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
