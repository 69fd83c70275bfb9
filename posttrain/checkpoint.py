"""Crash-safe checkpoints: safetensors + JSON only, committed atomically.

State (model/optimizer/scheduler state dicts, RNG, counters) is split into a flat tensor dict stored as
safetensors and a JSON skeleton that references those tensors by name, so loading never unpickles: a
checkpoint from an untrusted source can at worst fail to load, never run code.

On-disk layout under a checkpoint root:

    ckpt_root/
      latest                     {"step": N, "dir": "step-0000000N"}, replaced atomically
      step-00000001/             committed: manifest.json lists every file with size and sha256
      .tmp-step-00000002-<hex>/  being written (one writer per learner rank); removed on recovery

A save goes: `begin_checkpoint` (rank 0, broadcast the path) -> every rank writes its files ->
barrier -> `commit_checkpoint` (rank 0). A crash before the commit's rename leaves only a `.tmp-` folder;
a crash after it leaves a complete `step-` folder. Either way `latest_checkpoint` finds a verified
checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NotRequired, TypeAlias, TypedDict

if TYPE_CHECKING:
    import numpy as np
    import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
_TMP = ".tmp-"  # in-progress checkpoints and temp files; always safe to delete on recovery
_OLD = ".old-"  # a committed step folder moved aside while a same-step commit replaces it
_TRASH = ".trash-"  # pruned folders, renamed first so a half-deleted one is never mistaken for a checkpoint
_STEP_RE = re.compile(r"step-(\d{8,})")
_FORMAT_KEY = "posttrain.format"
_SKELETON_KEY = "posttrain.skeleton"
_CHUNK = 8 << 20


class CheckpointError(Exception):
    """A checkpoint cannot be written, found, verified or loaded; the message names the file or path."""


Skeleton: TypeAlias = "None | bool | int | float | str | list[Skeleton] | dict[str, Skeleton]"
"""The JSON structure `flatten_state` stores beside the tensors (grammar below)."""


class ManifestFile(TypedDict):
    """One file of a checkpoint as `manifest.json` lists it."""

    path: str
    size: int
    sha256: str


class Manifest(TypedDict):
    """A checkpoint's `manifest.json`."""

    format: int
    step: int
    created_unix: float
    meta: dict[str, Any]  # the caller's JSON metadata (`commit_checkpoint(meta=...)`)
    files: list[ManifestFile]


class RngState(TypedDict):
    """What `capture_rng` returns and `restore_rng` takes."""

    python: tuple[Any, ...]  # random.getstate()
    numpy: dict[str, Any]  # np.random.get_state(legacy=False)
    torch: torch.Tensor
    cuda: NotRequired[list[torch.Tensor]]


# ---------------------------------------------------------------------------------------------------------
# Nested state <-> (tensor dict, JSON skeleton)
#
# Skeleton grammar: JSON null/bool/int/str/finite float are themselves; a JSON list is a Python list; every
# other value is an object tagged with "$t". Dicts are always tagged (items as [key, value] pairs), so int
# keys keep their type and no user key can collide with a tag.


class _Flattener:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[int] = set()
        self._active: set[int] = set()  # containers on the current path, to reject cycles

    def node(self, x: Any, path: str) -> Skeleton:
        import numpy as np
        import torch

        kind = type(x)
        if x is None or kind in (bool, int, str):
            return x
        if kind is float:
            return x if math.isfinite(x) else {"$t": "float", "v": repr(x)}
        if isinstance(x, torch.Tensor):
            return {"$t": "tensor", "key": self._tensor(x, path)}
        if kind is np.ndarray or isinstance(x, np.generic):
            tag = "ndarray" if kind is np.ndarray else "npscalar"
            return {"$t": tag, "key": self._tensor(self._from_numpy(np.asarray(x), path), path)}
        if kind is torch.dtype:
            return {"$t": "dtype", "v": str(x).removeprefix("torch.")}
        if kind is torch.Size:
            return {"$t": "size", "v": list(x)}
        if kind in (list, tuple, dict, OrderedDict):
            return self._container(x, path)
        raise CheckpointError(f"{path}: cannot store object of type {kind.__name__}")

    def _container(
        self, x: list[object] | tuple[object, ...] | dict[str | int, object], path: str
    ) -> Skeleton:
        if id(x) in self._active:
            raise CheckpointError(f"{path}: reference cycle")
        self._active.add(id(x))
        try:
            if isinstance(x, dict):
                for k in x:
                    if type(k) not in (str, int):
                        raise CheckpointError(f"{path}: cannot store dict key of type {type(k).__name__}")
                items: list[Skeleton] = [[k, self.node(v, f"{path}[{k!r}]")] for k, v in x.items()]
                return {"$t": "dict" if type(x) is dict else "odict", "items": items}
            items = [self.node(v, f"{path}[{i}]") for i, v in enumerate(x)]
            return items if type(x) is list else {"$t": "tuple", "items": items}
        finally:
            self._active.discard(id(x))

    def _from_numpy(self, a: np.ndarray, path: str) -> torch.Tensor:
        import torch

        if not (a.flags.c_contiguous and a.flags.writeable):
            a = a.copy(order="C")
        try:
            return torch.from_numpy(a)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot store numpy array of dtype {a.dtype}: {e}") from e

    def _tensor(self, t: torch.Tensor, path: str) -> str:
        import torch

        if t.layout != torch.strided or t.is_meta:
            raise CheckpointError(f"{path}: cannot store {t.layout} tensor on {t.device}")
        t = t.detach().cpu()
        storage = t.untyped_storage()
        # safetensors refuses tensors that share memory or are strided views; copy only those.
        if not t.is_contiguous() or storage.data_ptr() in self._storages or storage.nbytes() != t.nbytes:
            t = t.clone(memory_format=torch.contiguous_format)
        if t.nbytes:
            self._storages.add(t.untyped_storage().data_ptr())
        self.tensors[path] = t  # paths are unique: repr() keeps 0 and '0' apart
        return path


def flatten_state(obj: object) -> tuple[dict[str, torch.Tensor], Skeleton]:
    """Split `obj` into CPU tensors keyed by their path and a JSON-able skeleton referencing them.

    Supports dict/OrderedDict (str or int keys), list, tuple, torch tensors, numpy arrays and scalars,
    int, float (inf/nan too), bool, str, None, torch.dtype and torch.Size. Anything else raises
    CheckpointError naming where it sits, e.g. "state['optimizer']['loss_scaler']".
    """
    flat = _Flattener()
    skeleton = flat.node(obj, "state")
    return flat.tensors, skeleton


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of `flatten_state`: rebuild the original structure (tensors stay where `tensors` has them)."""
    import torch

    if skeleton is None or type(skeleton) in (bool, int, float, str):
        return skeleton
    if type(skeleton) is list:
        return [unflatten_state(tensors, v) for v in skeleton]
    if type(skeleton) is not dict:
        raise CheckpointError(f"malformed skeleton node {skeleton!r}")
    tag = skeleton.get("$t")
    if tag in ("dict", "odict"):
        pairs = ((k, unflatten_state(tensors, v)) for k, v in skeleton["items"])
        return dict(pairs) if tag == "dict" else OrderedDict(pairs)
    if tag == "tuple":
        return tuple(unflatten_state(tensors, v) for v in skeleton["items"])
    if tag == "float":
        return float(skeleton["v"])
    if tag == "size":
        return torch.Size(skeleton["v"])
    if tag == "dtype":
        dtype = getattr(torch, skeleton["v"], None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"unknown torch dtype {skeleton['v']!r}")
        return dtype
    if tag in ("tensor", "ndarray", "npscalar"):
        if skeleton["key"] not in tensors:
            raise CheckpointError(f"tensor {skeleton['key']!r} is missing from the safetensors file")
        t = tensors[skeleton["key"]]
        return t if tag == "tensor" else t.numpy() if tag == "ndarray" else t.numpy()[()]
    raise CheckpointError(f"unknown skeleton tag {tag!r}")


# ---------------------------------------------------------------------------------------------------------
# Files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(path: str | os.PathLike[str], content: str | bytes | Callable[[Path], object]) -> None:
    """Write the file `path` atomically: readers see the old file or the new one, never half of one.

    `content` is text (written as `Path.write_text` does), bytes, or a function that writes the file at the
    path it is given (e.g. `lambda p: save_file(tensors, str(p))`). It goes to a temp file `.tmp-<name>-<hex>`
    in the same folder, which is fsynced, renamed over `path` with os.replace, and the folder is fsynced so
    the rename itself survives a crash. A write that raises removes its temp file; a crash leaves at most
    that temp file beside an untouched `path`.
    """
    path = Path(path)
    tmp = path.with_name(f"{_TMP}{path.name}-{uuid.uuid4().hex}")
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def publish_folder(tmp: Path, final: Path) -> None:
    """Rename the complete folder tmp to final; an existing final is moved aside, then deleted, so final
    is never a half-written or half-deleted folder.

    A crash between the two renames leaves `.old-<name>-*` and no final (for checkpoints `_repair` moves it
    back).
    """
    old = final.with_name(f"{_OLD}{final.name}-{uuid.uuid4().hex}") if final.exists() else None
    if old is not None:
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)


def _dumps(obj: object, what: str) -> str:
    try:
        return json.dumps(obj, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} is not JSON-serializable: {e}") from e


def _file_name(directory: str | os.PathLike[str], name: str) -> Path:
    if not name or os.sep in name or name.startswith("."):
        raise CheckpointError(f"invalid state name {name!r}: a plain file name without '/' or leading '.'")
    return Path(directory) / name


def save_state(directory: str | os.PathLike[str], name: str, obj: object) -> None:
    """Write `obj` to the single file `directory/name`, atomically: tensors as safetensors, the structure
    as JSON in the file's metadata (one file, so callers that expect a given file name get exactly it)."""
    from safetensors.torch import save_file

    tensors, skeleton = flatten_state(obj)
    meta = {_FORMAT_KEY: str(FORMAT_VERSION), _SKELETON_KEY: _dumps(skeleton, f"state {name!r}")}
    path = _file_name(directory, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    publish_file(path, lambda p: save_file(tensors, str(p), metadata=meta))


def load_state(directory: str | os.PathLike[str], name: str) -> Any:
    """Read what `save_state` wrote; every tensor lands on CPU. Never unpickles."""
    from safetensors import safe_open

    path = _file_name(directory, name)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except Exception as e:  # OSError, or SafetensorError for a malformed file
        raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from e
    if meta.get(_FORMAT_KEY) != str(FORMAT_VERSION) or _SKELETON_KEY not in meta:
        raise CheckpointError(f"{path}: not a posttrain state file (format {FORMAT_VERSION})")
    try:
        skeleton = json.loads(meta[_SKELETON_KEY])
    except ValueError as e:
        raise CheckpointError(f"{path}: unreadable structure metadata: {e}") from e
    return unflatten_state(tensors, skeleton)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read JSON: {e}") from e


# ---------------------------------------------------------------------------------------------------------
# RNG


def capture_rng() -> RngState:
    """Python, numpy-global, torch CPU and (when present) per-GPU CUDA RNG states; storable by save_state."""
    import random

    import numpy as np
    import torch

    state: RngState = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: RngState) -> None:
    """Undo `capture_rng`: subsequent draws repeat the ones that followed the capture."""
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # A resume may see a different GPU count; restore the devices both runs have.
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


# ---------------------------------------------------------------------------------------------------------
# Checkpoint folders


def _step_name(step: int) -> str:
    if type(step) is not int or step < 0:
        raise CheckpointError(f"step must be a non-negative int, got {step!r}")
    return f"step-{step:08d}"


def begin_checkpoint(ckpt_root: str | os.PathLike[str], step: int) -> Path:
    """Create a fresh, empty temp folder under `ckpt_root` for the writers of `step` to fill."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_TMP}{_step_name(step)}-{uuid.uuid4().hex}"
    tmp.mkdir()
    return tmp


def _hash_file(path: Path, fsync: bool = False) -> tuple[int, str]:
    """(size, sha256) of what is in the file; optionally fsync it, which flushes whoever wrote it."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return size, digest.hexdigest()


def _collect_files(tmp: Path) -> list[ManifestFile]:
    files: list[ManifestFile] = []
    for dirpath, dirnames, filenames in os.walk(tmp):
        dirnames.sort()
        for fname in sorted(filenames):
            path = Path(dirpath) / fname
            if path.is_symlink() or not path.is_file():
                raise CheckpointError(f"{path}: checkpoints may only hold regular files")
            size, sha = _hash_file(path, fsync=True)
            files.append({"path": path.relative_to(tmp).as_posix(), "size": size, "sha256": sha})
        _fsync_dir(Path(dirpath))
    return files


def commit_checkpoint(tmp_dir: str | os.PathLike[str], step: int, meta: Mapping[str, object]) -> Path:
    """Seal `tmp_dir` with a manifest, rename it to `step-N` and point `latest` at it; returns the step folder.

    Call from one process after every writer has finished. `meta` must be JSON-serializable.
    """
    tmp = Path(tmp_dir)
    root, name = tmp.parent, _step_name(step)
    if not tmp.name.startswith(f"{_TMP}{name}-") or not tmp.is_dir():
        raise CheckpointError(f"{tmp}: not a folder made by begin_checkpoint(..., {step})")
    if (tmp / MANIFEST).exists():
        raise CheckpointError(f"{tmp / MANIFEST}: already committed")
    manifest = {
        "format": FORMAT_VERSION,
        "step": step,
        "created_unix": time.time(),
        "meta": meta,
        "files": _collect_files(tmp),
    }
    text = _dumps(manifest, "checkpoint meta")
    # Last write before the rename: a step folder without a valid manifest can only come from tampering.
    publish_file(tmp / MANIFEST, text)
    final = root / name
    publish_folder(tmp, final)
    text = _dumps({"step": step, "dir": name}, "latest")
    publish_file(root / LATEST, text)
    return final


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """The parsed `manifest.json` of a checkpoint folder; CheckpointError if absent or malformed."""
    manifest_path = Path(path) / MANIFEST
    manifest: Manifest = _read_json(manifest_path)
    try:
        ok = manifest["format"] == FORMAT_VERSION and type(manifest["step"]) is int
        ok = ok and all(
            type(f["path"]) is str and type(f["size"]) is int and type(f["sha256"]) is str
            for f in manifest["files"]
        )
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{manifest_path}: malformed manifest")
    return manifest


def verify_checkpoint(path: str | os.PathLike[str]) -> Manifest:
    """Check every file the manifest lists (present, size, sha256); returns the manifest."""
    folder = Path(path)
    manifest = read_manifest(folder)
    for entry in manifest["files"]:
        rel = Path(entry["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise CheckpointError(f"{folder / MANIFEST}: file path {entry['path']!r} escapes the checkpoint")
        file = folder / rel
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from checkpoint")
        size, sha = _hash_file(file)
        if size != entry["size"]:
            raise CheckpointError(f"{file}: size {size} != {entry['size']} in the manifest (corrupted)")
        if sha != entry["sha256"]:
            raise CheckpointError(f"{file}: sha256 does not match the manifest (corrupted)")
    return manifest


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Committed-looking `step-N` folders, oldest first."""
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def _has_valid_manifest(path: Path, step: int) -> bool:
    try:
        return read_manifest(path)["step"] == step
    except CheckpointError:
        return False


def _latest_target(root: Path) -> tuple[int, Path] | None:
    """(step, folder) that `latest` points to, or None when the pointer is missing or unreadable."""
    try:
        name = json.loads((root / LATEST).read_text())["dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    m = _STEP_RE.fullmatch(name) if isinstance(name, str) else None
    return (int(m.group(1)), root / name) if m else None


def _repair(root: Path) -> None:
    """Roll back a replacement interrupted between its renames, then delete temp and trash leftovers."""
    for old in sorted(root.glob(f"{_OLD}step-*")):
        final = root / old.name.removeprefix(_OLD).rsplit("-", 1)[0]
        if final.exists() or not _STEP_RE.fullmatch(final.name):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, final)
    for stale in [*root.glob(f"{_TMP}*"), *root.glob(f"{_TRASH}*")]:
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    _fsync_dir(root)


def latest_checkpoint(ckpt_root: str | os.PathLike[str], repair: bool = True) -> Path | None:
    """The verified checkpoint to resume from, or None when there is none.

    Follows `latest`; if that is missing or points at no folder with a valid manifest, falls back to the
    newest `step-N` folder that has one. The chosen folder is verified file by file and a mismatch raises
    CheckpointError naming the file (delete that folder to fall back to the one before). With `repair`
    (the default) interrupted saves are cleaned up first; pass False while another process may be saving.
    """
    root = Path(ckpt_root)
    if not root.is_dir():
        return None
    if repair:
        _repair(root)
    target = _latest_target(root)
    candidates = [target] if target else []
    candidates += reversed(_step_dirs(root))
    chosen = next((p for step, p in candidates if _has_valid_manifest(p, step)), None)
    if chosen is not None:
        verify_checkpoint(chosen)
    return chosen


def prune_checkpoints(ckpt_root: str | os.PathLike[str], keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step folders, never the one `latest` points to; returns those deleted."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    steps = [p for _, p in _step_dirs(root)]
    target = _latest_target(root)
    keep = set(steps[-keep_last:]) | ({target[1]} if target else set())
    removed = [p for p in steps if p not in keep]
    for path in removed:
        trash = root / f"{_TRASH}{path.name}-{uuid.uuid4().hex}"
        os.rename(path, trash)
        shutil.rmtree(trash)
    if removed:
        _fsync_dir(root)
    return removed
