"""Manifest (JSONL, one clip per line, docs/data.md): parsing, path resolution and geometry loading.

Errors are `RowError`s naming the 0-based row, the offending path (or the manifest) and the reason, so the
shard writer can reject a row and carry on.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEXT_EMBEDDING_WIDTH = 4096  # UMT5-XXL's, the only text encoder of the real presets: what a manifest may store
KEYS = {"video", "depth", "xyz", "intrinsics", "poses", "valid", "caption", "text_embedding", "id"}
ID_RE = re.compile(r"[A-Za-z0-9_-]+")  # matched whole (fullmatch): "$" would let "abc\n" through


class RowError(ValueError):
    """A bad manifest row: `row`, `path` and `reason` are kept for the rejects file."""

    def __init__(self, row: int, path: str, reason: str, missing: bool = False):
        super().__init__(f"row {row} ({path}): {reason}")
        self.row, self.path, self.reason, self.missing = row, str(path), reason, missing

    def record(self) -> dict:
        """The reject's entry; `missing`: the file at `path` was not there (a re-run retries the row once it is)."""
        return {"row": self.row, "path": self.path, "reason": self.reason, **({"missing": True} if self.missing else {})}


def not_a_file(row: int, path: Path, what: str, base: Path | None = None) -> RowError:
    """The RowError for a `path` that is no file: a folder (a wrong path, not one a re-run will find filled), or
    nothing there (missing: a re-run retries the row once it is). `base`: the manifest's folder, to say so where the
    path as written names a file relative to the current folder instead."""
    if path.is_dir():
        return RowError(row, str(path), f"{what} is a folder, not a file")
    reason = f"{what} not found"
    written = path.relative_to(base) if base is not None and path.is_relative_to(base) else None
    if written is not None and written.is_file():
        reason += (f" (a file {written} is there relative to the current folder, {Path.cwd()}, but the manifest's "
                   f"relative paths resolve against its own folder, {base}: write them relative to that folder, or "
                   "absolute)")
    return RowError(row, str(path), reason, missing=True)


class ManifestError(ValueError):
    """A manifest that cannot be read as rows at all (one JSON document rather than JSON Lines)."""


class DuplicateKeyError(ValueError):
    """A JSON object that repeats a key (json.loads would silently keep the last value)."""


def _unique_keys(pairs: list) -> dict:
    """json.loads' object_pairs_hook: an object whose keys are unique, else DuplicateKeyError naming the key."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKeyError(f"duplicate key {key!r} in a JSON object")
        obj[key] = value
    return obj


def _int(digits: str) -> int:
    """json.loads' parse_int: a literal longer than int() converts is refused saying so (int()'s own message advises
    a Python setting)."""
    limit = sys.get_int_max_str_digits()
    if limit and len(digits.lstrip("-")) > limit:
        raise ValueError(f"an integer of {len(digits.lstrip('-'))} digits (at most {limit} are read)")
    return int(digits)


def loads(text):
    """json.loads refusing duplicate keys (DuplicateKeyError); every fault of the text is a ValueError, nesting too
    deep for the parser and integers too long to convert included."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_int=_int)
    except RecursionError:
        raise ValueError("nested too deeply to parse") from None


@dataclass(frozen=True)
class ManifestRow:
    row: int
    id: str
    video: Path
    source: str  # the video path as written in the manifest
    geometry: str  # "depth" or "xyz"
    geometry_path: Path
    intrinsics: object = None  # inline list or a Path
    poses: object = None  # inline list or a Path
    valid: Path | None = None
    caption: str = ""
    text_embedding: Path | None = None
    base: Path | None = None  # the manifest's folder, which relative paths resolve against

    def inputs(self) -> tuple:
        """What the row's sample is made of (files by their real path, so links and spellings compare equal)."""
        def number(v):  # inline cameras: 1 and 1.0 are the same number
            if isinstance(v, list):
                return [number(x) for x in v]
            return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

        def real(v):
            return os.path.realpath(v) if isinstance(v, Path) else json.dumps(number(v))

        return (self.geometry, self.caption) + tuple(real(v) for v in (
            self.video, self.geometry_path, self.intrinsics, self.poses, self.valid, self.text_embedding))

    def input_paths(self) -> list[Path]:
        paths = [self.video, self.geometry_path, self.valid, self.text_embedding, self.intrinsics, self.poses]
        return [p for p in paths if isinstance(p, Path)]

    def fingerprints(self) -> dict:
        """{path: [size, mtime_ns]} of every file the row reads (null where none is there): a re-run compares them to
        tell inputs that changed since the row was sharded."""
        out = {}
        for p in self.input_paths():
            try:
                st = p.stat()
            except OSError:
                out[str(p)] = None
                continue
            out[str(p)] = [st.st_size, st.st_mtime_ns]
        return out


def _path(base: Path, value, row: int, key: str, manifest: str) -> Path:
    if not isinstance(value, str) or not value:
        raise RowError(row, manifest, f"'{key}' must be a non-empty path string, got {value!r}")
    p = Path(value)
    return p if p.is_absolute() else base / p


def _reads_as_list(text: str) -> bool:
    """A camera value given as the JSON text of a list ("[[5, 0, 2.5], ...]"), not a path ("[cam0]/K.npy")."""
    try:
        return isinstance(json.loads(text), list)
    except ValueError:
        return False


def parse_row(obj, row: int, base: Path, manifest: str = "<manifest>") -> ManifestRow:
    """One decoded JSON line of file `manifest` -> ManifestRow (paths resolved against `base`; files are not
    opened). A fault of the row itself names the manifest; one of a field that names a file, the clip's video."""
    if not isinstance(obj, dict):
        raise RowError(row, manifest, f"a row must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - KEYS)
    if unknown:
        raise RowError(row, manifest, f"unknown key(s) {unknown}; allowed: {sorted(KEYS)}")
    if "video" not in obj:
        raise RowError(row, manifest, "missing required key 'video'")
    video = _path(base, obj["video"], row, "video", manifest)
    has = [k for k in ("depth", "xyz") if k in obj]
    if len(has) != 1:
        raise RowError(row, str(video), f"exactly one of 'depth' or 'xyz' is required, got {has or 'neither'}")
    geometry = has[0]
    cams = {}
    for key in ("intrinsics", "poses"):
        if geometry == "depth" and key not in obj:
            raise RowError(row, str(video), f"'{key}' is required with depth geometry")
        if key in obj and obj[key] is None:  # a depth sample without cameras could never be read
            raise RowError(row, str(video), f"'{key}' is null: give a list or a path" +
                           (" (with xyz geometry, leave both keys out for no cameras)" if geometry == "xyz" else ""))
        if isinstance(obj.get(key), str) and _reads_as_list(obj[key]):  # not a file a re-run could find
            raise RowError(row, str(video), f"'{key}' is a string that reads as a list ({obj[key][:40]!r}...): give "
                           "the list itself, not its text (a CSV or pandas export quotes nested lists)")
        if key in obj:
            cams[key] = _path(base, obj[key], row, key, str(video)) if isinstance(obj[key], str) else obj[key]
    clip_id = obj.get("id", f"row{row:09d}")
    if not isinstance(clip_id, str) or not ID_RE.fullmatch(clip_id):
        raise RowError(row, str(video), f"'id' must be letters, digits, '_' or '-', got {clip_id!r}")
    caption = obj.get("caption", "")
    if not isinstance(caption, str):
        raise RowError(row, str(video), f"'caption' must be a string, got {type(caption).__name__}")
    return ManifestRow(
        row=row, id=clip_id, video=video, source=obj["video"], geometry=geometry,
        geometry_path=_path(base, obj[geometry], row, geometry, str(video)),
        valid=_path(base, obj["valid"], row, "valid", str(video)) if "valid" in obj else None,
        caption=caption,
        text_embedding=(_path(base, obj["text_embedding"], row, "text_embedding", str(video))
                        if "text_embedding" in obj else None),
        base=base, **cams)


def read_manifest(path) -> tuple[list[ManifestRow], list[RowError]]:
    """All rows of a JSONL manifest: (parsed rows, errors of rows that could not be parsed). Blank lines are
    skipped but still count, so row numbers are line numbers (0-based)."""
    if Path(path).is_dir():
        raise IsADirectoryError(_folder_given(Path(path)))
    if not Path(path).is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    path = Path(path).resolve()  # rejects name it so, however it was spelled (they are part of the shard plan)
    base = path.parent
    data = path.read_bytes()
    wide = _wide_encoding(data)
    if wide:
        raise ManifestError(f"{path}: not UTF-8 text: the file is {wide} (as Windows PowerShell's `>` writes): save it "
                            f"as UTF-8, e.g. iconv -f {wide.split()[0]} -t UTF-8 {path} > manifest-utf8.jsonl, or in "
                            "PowerShell `Get-Content IN | Set-Content -Encoding utf8 OUT`")
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM is no row
    kind = _one_document(data)
    if kind:
        lines = data.strip().count(b"\n") + 1
        how = f": jq -c '.[]' {path} > manifest.jsonl" if kind == "an array" else ""
        raise ManifestError(f"{path}: not JSON Lines: one JSON object per line (this file is {kind} written over "
                            f"{lines} lines): write each clip's object on a line of its own{how}")
    rows, errors = [], []
    # rows are lines ending in b"\n" only (str.splitlines would also split at U+2028 and other separators that
    # JSON strings may hold raw), each decoded on its own: a row that is not UTF-8 is rejected, not fatal
    for i, raw in enumerate(data.split(b"\n")):
        if not raw.strip():
            continue
        try:
            obj = loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            errors.append(RowError(i, str(path), f"not UTF-8 text: {exc}"))
            continue
        except DuplicateKeyError as exc:
            errors.append(RowError(i, str(path), str(exc)))
            continue
        except ValueError as exc:
            errors.append(RowError(i, str(path), f"not valid JSON: {exc}"))
            continue
        try:
            rows.append(parse_row(obj, i, base, str(path)))
        except RowError as exc:
            errors.append(exc)
    return rows, errors


def _wide_encoding(data: bytes) -> str | None:
    """'UTF-16 text' or 'UTF-32 text' where the manifest starts with such a byte-order mark, or holds NUL bytes in
    its first line (no UTF-8 JSON text does), else None: read line by line, it would give a reject per line."""
    if data.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "UTF-32 text"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16 text"
    first = data.split(b"\n", 1)[0]
    if b"\x00" in first:
        return "UTF-32 text" if b"\x00\x00\x00" in first else "UTF-16 text"
    return None


def _one_document(data: bytes) -> str | None:
    """'an array' or 'an object' where the manifest's text is one JSON document (a pretty-printed array of rows, or
    one object over several lines) rather than JSON Lines, which would give a reject per line; else None. JSON Lines
    of several rows fails to parse as one document at the end of its first row, so this costs a row's parse."""
    text = data.strip()
    if not text.startswith((b"[", b"{")):
        return None
    try:
        value = loads(text.decode("utf-8"))
    except ValueError:  # JSON Lines (or damage: the rows report it)
        return None
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) and b"\n" in text else None


def _folder_given(folder: Path) -> str:
    """The message for a folder given where the manifest goes, naming the manifests in it (a folder of clips is no
    manifest: one has to be written, docs/data.md)."""
    found = sorted(str(p) for p in folder.glob("*.jsonl") if p.is_file())[:3]
    such = f", such as {' or '.join(found)}" if found else " (docs/data.md says how to write one)"
    return f"{folder} is a folder: MANIFEST is a file of JSON Lines (.jsonl, one clip per line){such}"


def repeated_rows(rows: list[ManifestRow]) -> list[tuple[int, str]]:
    """(row, what it repeats, in words) of the rows that repeat an earlier row's clip (every input equal) or id.
    Such a row is sharded (a clip may be listed on purpose more than once), but a manifest concatenated twice or a
    clip added again would otherwise train that clip twice as often without a word."""
    first_of_clip, first_of_id, out = {}, {}, []
    for r in rows:
        clip = r.inputs()
        if clip in first_of_clip:
            out.append((r.row, f"row {r.row} ({r.video}) is row {first_of_clip[clip]}'s clip again "
                               "(every input equal)"))
        elif r.id in first_of_id:
            out.append((r.row, f"row {r.row} ({r.video}) has row {first_of_id[r.id]}'s id {r.id!r}"))
        first_of_clip.setdefault(clip, r.row)
        first_of_id.setdefault(r.id, r.row)
    return out


ARRAY_MAGICS = (b"\x93NUMPY", b"PK\x03\x04", b"PK\x05\x06")  # an .npy; an .npz (a zip; an empty one)


def load_array(path: Path, member: str, row: int, check=None, base: Path | None = None) -> np.ndarray:
    """A .npy, or member `member` of a .npz (never unpickled); a .json holds a nested list. `check(shape, dtype)`
    is called before the array is loaded, with what the .npy header says, so that an array of the wrong shape is
    refused without reading it. `base`: the manifest's folder, for the message of a missing file."""
    if not path.is_file():
        raise not_a_file(row, path, "file", base)
    try:
        if path.suffix == ".json":
            a = _numbers(loads(path.read_text()), row, str(path), member)
            if check is not None:
                check(a.shape, a.dtype)
            return a
        with path.open("rb") as f:  # numpy reads any other header as a pickle, which it then refuses to load
            magic = f.read(6)
            if not magic.startswith(ARRAY_MAGICS):
                raise RowError(row, str(path), "cannot load array: the file begins with neither an .npy's nor an "
                                               ".npz's header (damaged, or another format; pickles are never loaded)")
            f.seek(0)
            # the header alone first: a header that promises more data than the file holds, or an array of another
            # shape, is an error here, not an allocation of that size (out of memory is no fault of the file's)
            shape, dtype = (_npy_header(f, path.stat().st_size, path, row) if magic == ARRAY_MAGICS[0]
                            else _npz_header(path, member, row))
        if check is not None:
            check(shape, dtype)
        loaded = np.load(path, mmap_mode="r", allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return loaded[member]
        return np.array(loaded)
    except (RowError, MemoryError):
        raise
    except Exception as exc:
        raise RowError(row, str(path), f"cannot load array: {_load_problem(exc)}") from None


def _npz_header(path: Path, member: str, row: int) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of member `member` of the .npz at `path`, from its header alone."""
    with zipfile.ZipFile(path) as zf:
        names = {n.removesuffix(".npy"): n for n in zf.namelist()}
        if member not in names:
            raise RowError(row, str(path), f"npz has no member '{member}' (has {list(names)})")
        with zf.open(names[member]) as f:
            return _npy_header(f, zf.getinfo(names[member]).file_size, path, row)


def _npy_header(f, size: int, path: Path, row: int) -> tuple[tuple, np.dtype]:
    """(shape, dtype) from the .npy header at the start of file object `f` (`size` bytes long), reading nothing
    after it; RowError for an object array or a file shorter than its header says."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    if dtype.hasobject:
        raise RowError(row, str(path), f"cannot load array: {OBJECTS}")
    if f.tell() + math.prod(shape) * dtype.itemsize > size:
        raise RowError(row, str(path), f"cannot load array: {TRUNCATED}")
    return tuple(shape), dtype


OBJECTS = "it holds Python objects (an object array is a pickle, and pickles are never loaded)"
TRUNCATED = "the file is shorter than its header says (truncated)"


def _load_problem(exc: Exception) -> str:
    """numpy's reason a memory-mapped load failed, said of the file."""
    said = str(exc)
    if "Python objects in dtype" in said:
        return OBJECTS
    if "mmap length is greater than file size" in said:
        return TRUNCATED
    return said


MATRICES = {"intrinsics": "a 3x3 matrix (or one per frame, [T, 3, 3]) of nested lists, [[fx, 0, cx], [0, fy, cy], "
                          "[0, 0, 1]]",
            "poses": "[T, 4, 4]: a 4x4 camera-to-world matrix per frame, of nested lists"}


def _numbers(value, row: int, where: str, name: str) -> np.ndarray:
    """A nested JSON list of real numbers as float64 (np.asarray would also take "5" or true as numbers)."""
    def real(v):
        if isinstance(v, list):
            return all(real(x) for x in v)
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def has_object(v):
        return isinstance(v, dict) or isinstance(v, list) and any(has_object(x) for x in v)

    if has_object(value):  # {"fx": ...}: named values, where the manifest takes the matrix
        raise RowError(row, where, f"'{name}' must be {MATRICES.get(name, 'a nested list of numbers')}, got a JSON "
                                   f"object: {json.dumps(value)[:80]}")
    if not real(value):
        raise RowError(row, where, f"'{name}' must hold real numbers (no strings, booleans or nulls)")
    try:
        return np.asarray(value, np.float64)
    except ValueError as exc:  # ragged nesting
        raise RowError(row, where, f"'{name}' is not a numeric array: {exc}") from None


def _finite_array(value, row: int, where: str, shape: tuple, name: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iuf":
            raise RowError(row, where, f"'{name}' must hold real numbers, got a {value.dtype} array")
        a = value.astype(np.float64)
    else:
        a = _numbers(value, row, where, name)
    if a.shape not in shape:
        want = " or ".join(str(list(s)) for s in shape)
        raise RowError(row, where, f"'{name}' has shape {list(a.shape)}, expected {want}")
    if not np.isfinite(a).all():
        raise RowError(row, where, f"'{name}' has non-finite values")
    return a


def _where(value, r: ManifestRow) -> str:
    """The file an inline-or-path camera value came from (inline values: the row's video)."""
    return str(value) if isinstance(value, Path) else str(r.video)


OPENGL_DEPTH = ("depth is z > 0 in front of the camera (OpenCV axes), while OpenGL's camera looks down -z: store its "
                "negation, and mark pixels without depth 0 (or false in 'valid')")


def _no_negative_depth(depth: np.ndarray, row: int, where: str) -> None:
    """RowError for negative depth without a valid mask: it is another axis convention (OpenGL's z points backwards),
    not missing depth (0), and reading it as invalid left the whole clip without geometry."""
    negative = depth < 0
    if negative.any():
        t, y, x = np.argwhere(negative)[0]
        n = int(negative.sum())
        raise RowError(row, where, f"depth has {n} negative value{'s' if n > 1 else ''} (first at frame {t}, y {y}, "
                                   f"x {x}): {OPENGL_DEPTH}")


FLOAT16_NORMAL = float(np.finfo(np.float16).tiny)  # 6.1e-05: below it float16 loses precision, then flushes to 0
SUBNORMAL_SHARE = 0.01


def _fits_float16_below(g: np.ndarray, geometry: str, row: int, where: str) -> None:
    """RowError where float16 storage would lose small valid values (geometry in another unit than metres: depth
    x 1e-9 stored as 0 everywhere, an empty validity mask when read): more than SUBNORMAL_SHARE of the valid values
    below float16's normal range (a few stray ones are stored as they round, 0 reading as invalid). A point counts by
    its largest |coordinate|; `g` is 0 where invalid."""
    mag = np.abs(g).max(-1) if geometry == "xyz" else g
    low = (mag > 0) & (mag < FLOAT16_NORMAL)
    if not low.any():
        return
    small = mag[low]
    zero, subnormal, total = int((small.astype(np.float16) == 0).sum()), int(low.sum()), int(np.count_nonzero(mag))
    if subnormal > SUBNORMAL_SHARE * total:
        what = "depth values" if geometry == "depth" else "points (by their largest |coordinate|)"
        raise RowError(row, where, f"{what} as small as {small.min():.3g} fall below float16's smallest normal value, "
                                   f"{FLOAT16_NORMAL:.2g}: of {total} valid, {subnormal} would be stored with reduced "
                                   f"precision and {zero} as 0 (then read as invalid): give the geometry in metres "
                                   f"(float16 storage holds {FLOAT16_NORMAL:.2g} to 65000)")


def load_geometry(r: ManifestRow, num_frames: int, height: int, width: int) -> dict:
    """Load and check a row's geometry against its video's frame count and size.

    Returns geometry (float32 [T,H,W] depth or [T,H,W,3] xyz, 0 where invalid), valid bool [T,H,W], and
    cameras (required with depth, optional with xyz): intrinsics [T,3,3], poses_c2w [T,4,4]. Non-finite
    values are allowed only where an explicit valid mask is false, and so is negative depth; depth must be > 0
    where valid; at least one pixel must be valid; values must fit float16 storage."""
    T, H, W = num_frames, height, width
    gp = str(r.geometry_path)
    want = (T, H, W) if r.geometry == "depth" else (T, H, W, 3)

    def geometry_header(shape, dtype):  # checked from the header, before a file of another shape is read
        if shape != want:
            raise RowError(r.row, gp, f"{r.geometry} shape {list(shape)} does not match the video "
                                      f"({T} frames, {H}x{W}): expected {list(want)}")
        if not np.issubdtype(dtype, np.floating):
            raise RowError(r.row, gp, f"{r.geometry} must be floating point, got {dtype}")

    def valid_header(shape, dtype):
        if shape != (T, H, W):
            raise RowError(r.row, str(r.valid), f"valid shape {list(shape)}, expected {[T, H, W]}")

    g = load_array(r.geometry_path, r.geometry, r.row, geometry_header, r.base)
    g = g.astype(np.float32)
    finite = np.isfinite(g) if g.ndim == 3 else np.isfinite(g).all(-1)
    if r.valid is not None:
        v = load_array(r.valid, "valid", r.row, valid_header, r.base)
        if v.dtype != np.bool_ and not np.issubdtype(v.dtype, np.integer):
            raise RowError(r.row, str(r.valid), f"valid must be bool or 0/1 integers, got {v.dtype}")
        if v.dtype != np.bool_ and not np.isin(v, (0, 1)).all():
            found = np.unique(v)
            shown = ", ".join(map(str, found[:6])) + (f", ... ({len(found)} values)" if len(found) > 6 else "")
            raise RowError(r.row, str(r.valid), f"valid must be bool or 0/1 integers; this {v.dtype} mask holds values "
                                                f"{{{shown}}} (a 0/255 image mask: store mask > 0)")
        valid = v.astype(bool)
        bad = valid & ~finite
        if bad.any():
            t, y, x = np.argwhere(bad)[0]
            raise RowError(r.row, gp, f"non-finite {r.geometry} at valid pixel (frame {t}, y {y}, x {x}); "
                                      f"{int(bad.sum())} such pixels")
    else:
        if not finite.all():
            t, y, x = np.argwhere(~finite)[0]
            raise RowError(r.row, gp, f"non-finite {r.geometry} at (frame {t}, y {y}, x {x}) and no valid mask "
                                      f"marks it invalid; {int((~finite).sum())} such pixels")
        if r.geometry == "depth":
            _no_negative_depth(g, r.row, gp)
        valid = g > 0 if r.geometry == "depth" else np.ones((T, H, W), bool)
    if not valid.any():
        which = "the valid mask is false everywhere" if r.valid is not None else "the depth is 0 everywhere"
        raise RowError(r.row, str(r.valid) if r.valid is not None else gp,
                       f"no valid geometry: no pixel of any frame is valid ({which}), so the clip would train its xyz "
                       "branch on nothing (a loss of 0): fix the geometry, or leave the row out")
    g[~valid] = 0.0
    if np.abs(g).max(initial=0.0) > 65000.0:
        raise RowError(r.row, gp, f"{r.geometry} values up to {np.abs(g).max():.4g} exceed float16 storage")
    out = {"geometry": g, "valid": valid}
    if r.geometry == "depth" and (g[valid] <= 0).any():
        hint = f": {OPENGL_DEPTH}" if (g[valid] < 0).any() else ""
        raise RowError(r.row, gp, f"depth must be > 0 where valid; {int((g[valid] <= 0).sum())} pixels are not{hint}")
    # frame 0's pixels see points in front of its camera: z <= 0 there is a missing-point marker (0, 0, 0) or
    # another axis convention (OpenGL's z points backwards), which would train on wrong geometry
    behind = int((g[0, ..., 2][valid[0]] <= 0).sum()) if r.geometry == "xyz" else 0
    if behind:
        raise RowError(r.row, gp, f"xyz of frame 0 has {behind} valid points with z <= 0, which its own camera could "
                                  "not see: pointmaps are in the first frame's camera with OpenCV axes (x right, "
                                  "y down, z forward); mark points without geometry false in 'valid'")
    _fits_float16_below(g, r.geometry, r.row, gp)
    if (r.intrinsics is None) != (r.poses is None):
        raise RowError(r.row, str(r.video), "'intrinsics' and 'poses' go together")
    if r.geometry == "depth" and r.intrinsics is None:
        raise RowError(r.row, str(r.video), "depth geometry needs 'intrinsics' and 'poses'")
    if r.intrinsics is not None:
        K = r.intrinsics
        if isinstance(K, Path):
            K = load_array(K, "intrinsics", r.row, base=r.base)
        K = _finite_array(K, r.row, _where(r.intrinsics, r), ((3, 3), (T, 3, 3)), "intrinsics")
        K = np.broadcast_to(K, (T, 3, 3)).copy()
        if not (np.allclose(K[:, 2], [0, 0, 1]) and (K[:, 0, 0] > 0).all() and (K[:, 1, 1] > 0).all()):
            raise RowError(r.row, _where(r.intrinsics, r), "intrinsics must have last row [0, 0, 1] and fx, fy > 0")
        # pixel centres are at integers (geometry.py): the frame spans [-0.5, W - 0.5] x [-0.5, H - 0.5]
        outside = (np.abs(K[:, 0, 2] - (W - 1) / 2) > W / 2) | (np.abs(K[:, 1, 2] - (H - 1) / 2) > H / 2)
        if outside.any():
            i = int(np.argmax(outside))
            raise RowError(r.row, _where(r.intrinsics, r),
                           f"intrinsics of frame {i} put the principal point at ({K[i, 0, 2]:.6g}, {K[i, 1, 2]:.6g}), "
                           f"outside the {W}x{H} video: intrinsics of another resolution? (fx, fy, cx, cy scale "
                           "with the frame size)")
        P = r.poses
        if isinstance(P, Path):
            P = load_array(P, "poses", r.row, base=r.base)
        P = _finite_array(P, r.row, _where(r.poses, r), ((T, 4, 4),), "poses")
        if not np.allclose(P[:, 3], [0, 0, 0, 1]):
            raise RowError(r.row, _where(r.poses, r), "poses must be 4x4 rigid transforms with last row [0, 0, 0, 1]")
        if not np.allclose(P[:, :3, :3] @ P[:, :3, :3].transpose(0, 2, 1), np.eye(3), atol=1e-4):
            raise RowError(r.row, _where(r.poses, r), "pose rotations are not orthonormal")
        if (np.linalg.det(P[:, :3, :3]) < 0).any():
            frame = int(np.argmax(np.linalg.det(P[:, :3, :3]) < 0))
            raise RowError(r.row, _where(r.poses, r), f"pose of frame {frame} is a reflection (det R = -1), not a "
                                                       "rotation: check the axis convention (OpenCV: x right, y down, z forward)")
        out.update(intrinsics=K, poses_c2w=P)
    return out


def load_text_embedding(r: ManifestRow) -> np.ndarray | None:
    if r.text_embedding is None:
        return None
    e = load_array(r.text_embedding, "text_embedding", r.row, base=r.base)
    if e.ndim != 2 or e.shape[1] != TEXT_EMBEDDING_WIDTH or not np.issubdtype(e.dtype, np.floating):
        raise RowError(r.row, str(r.text_embedding),
                       f"text embedding must be float [L, {TEXT_EMBEDDING_WIDTH}], got {e.dtype} {list(e.shape)}")
    # L = 0 is how a collated batch marks a sample without one: a stored one would give its batch mates without an
    # embedding an all-zero text context instead of their captions'
    if e.shape[0] == 0:
        raise RowError(r.row, str(r.text_embedding), "text embedding has no rows (L = 0): leave 'text_embedding' out "
                                                     "to have the caption encoded")
    if not np.isfinite(e).all() or np.abs(e).max(initial=0) > 65000:
        raise RowError(r.row, str(r.text_embedding), "text embedding has non-finite or float16-overflowing values")
    return e
