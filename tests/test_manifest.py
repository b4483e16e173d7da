import io
import json
import re

import numpy as np
import pytest

from data_pipeline.manifest import RowError, load_geometry, load_text_embedding, read_manifest

T, H, W = 3, 4, 6


def write_rows(tmp_path, rows, name="manifest.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path):
    np.save(tmp_path / "d.npy", np.full((T, H, W), 2.0, np.float32))
    np.save(tmp_path / "poses.npy", np.broadcast_to(np.eye(4), (T, 4, 4)))
    (tmp_path / "K.json").write_text(json.dumps([[5, 0, 2.5], [0, 5, 1.5], [0, 0, 1]]))
    return tmp_path


def depth_row(**kw):
    row = {"video": "v.mp4", "depth": "d.npy", "intrinsics": [[5, 0, 2.5], [0, 5, 1.5], [0, 0, 1]],
           "poses": "poses.npy"}
    row.update(kw)
    return {k: v for k, v in row.items() if v is not None}


def test_relative_paths_resolve_against_the_manifest_folder(files, tmp_path, monkeypatch):
    sub = tmp_path / "elsewhere"
    sub.mkdir()
    monkeypatch.chdir(sub)
    path = write_rows(tmp_path, [depth_row(caption="a cat", id="clip_1"), depth_row(video="/abs/v.mp4")])
    rows, errors = read_manifest(path)
    assert errors == []
    assert rows[0].video == tmp_path / "v.mp4" and rows[0].geometry_path == tmp_path / "d.npy"
    assert rows[0].poses == tmp_path / "poses.npy" and rows[0].caption == "a cat" and rows[0].id == "clip_1"
    assert str(rows[1].video) == "/abs/v.mp4" and rows[1].source == "/abs/v.mp4" and rows[1].id == "row000000001"


def test_row_errors_name_row_and_reason(tmp_path):
    path = write_rows(tmp_path, [
        depth_row(),
        "{not json",
        {"depth": "d.npy"},
        depth_row(colour="red"),
        depth_row(xyz="x.npy"),
        depth_row(poses=None),
        depth_row(id="bad id!"),
        "",
        {"video": "v.mp4", "xyz": "x.npy"},
        [1, 2],
    ])
    rows, errors = read_manifest(path)
    assert [r.row for r in rows] == [0, 8] and rows[1].geometry == "xyz"
    by_row = {e.row: e.reason for e in errors}
    assert "not valid JSON" in by_row[1]
    assert "missing required key 'video'" in by_row[2]
    assert "unknown key" in by_row[3] and "colour" in by_row[3]
    assert "exactly one of 'depth' or 'xyz'" in by_row[4]
    assert "'poses' is required" in by_row[5]
    assert "'id'" in by_row[6]
    assert "JSON object" in by_row[9]
    assert set(by_row) == {1, 2, 3, 4, 5, 6, 9}
    # a fault of the row itself names the manifest; one of a clip's fields, the clip
    paths = {e.row: e.path for e in errors}
    assert [paths[r] for r in (1, 2, 3, 9)] == [str(path.resolve())] * 4 and paths[4] == str(tmp_path / "v.mp4")
    assert str(RowError(4, "p.mp4", "why")) == "row 4 (p.mp4): why"
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_rows_are_lines_of_bytes_each_decoded_on_its_own(tmp_path):
    """A caption holding a raw U+2028 (valid inside a JSON string) stays one row, and a row that is not UTF-8 is
    rejected on its own: row numbers (and the keys made from them) stay the line numbers. CRLF endings are fine."""
    lines = [json.dumps(depth_row(caption="one\u2028two\u0085three"), ensure_ascii=False).encode("utf-8"),
             b'{"video": "v.mp4", "caption": "\xff\xfe"}',
             json.dumps(depth_row(id="third")).encode() + b"\r"]
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # with a byte-order mark, as some editors write
    rows, errors = read_manifest(path)
    assert [r.row for r in rows] == [0, 2] and rows[0].caption == "one\u2028two\u0085three" and rows[1].id == "third"
    assert [(e.row, "not UTF-8" in e.reason) for e in errors] == [(1, True)]


def test_a_row_the_json_parser_cannot_take_is_rejected_as_that_row(tmp_path):
    """An integer literal past int()'s digit limit (ValueError) and nesting past the parser's recursion limit
    (RecursionError) escaped the JSONDecodeError handler and ended the whole read."""
    path = write_rows(tmp_path, [json.dumps(depth_row())[:-1] + ', "caption": 1' + "0" * 5000 + "}",
                                 '{"video": ' + "[" * 100000 + "]" * 100000 + "}",
                                 depth_row(caption="kept")])
    rows, errors = read_manifest(path)
    assert [(r.row, r.caption) for r in rows] == [(2, "kept")]
    assert [(e.row, e.path) for e in errors] == [(0, str(path.resolve())), (1, str(path.resolve()))]
    assert errors[0].reason == "not valid JSON: an integer of 5001 digits (at most 4300 are read)"
    assert errors[1].reason == "not valid JSON: nested too deeply to parse"


def load(tmp_path, row, t=T):
    rows, errors = read_manifest(write_rows(tmp_path, [row], "one.jsonl"))
    assert not errors
    return load_geometry(rows[0], t, H, W)


def test_load_depth_geometry(files):
    g = load(files, depth_row())
    assert g["geometry"].shape == (T, H, W) and g["valid"].all()
    assert g["intrinsics"].shape == (T, 3, 3) and g["poses_c2w"].shape == (T, 4, 4)
    g = load(files, depth_row(intrinsics="K.json"))
    assert g["intrinsics"][2, 0, 2] == 2.5


def test_geometry_errors(files):
    d = np.full((T, H, W), 2.0, np.float32)
    d[1, 2, 3] = np.nan
    np.save(files / "nan.npy", d)
    valid = np.ones((T, H, W), bool)
    valid[1, 2, 3] = False
    np.savez_compressed(files / "valid.npz", valid=valid)
    np.save(files / "neg.npy", -np.abs(np.nan_to_num(d)))
    with pytest.raises(RowError, match=r"non-finite depth at \(frame 1, y 2, x 3\)"):
        load(files, depth_row(depth="nan.npy"))
    g = load(files, depth_row(depth="nan.npy", valid="valid.npz"))  # NaN only where marked invalid: fine
    assert g["geometry"][1, 2, 3] == 0 and not g["valid"][1, 2, 3]
    with pytest.raises(RowError, match="does not match the video"):
        load(files, depth_row(), t=T + 1)
    with pytest.raises(RowError, match=r"'intrinsics' has shape \[2, 3\]"):
        load(files, depth_row(intrinsics=[[1, 0, 0], [0, 1, 0]]))
    with pytest.raises(RowError, match="last row"):
        load(files, depth_row(intrinsics=[[5, 0, 2], [0, 5, 1], [1, 0, 1]]))
    np.save(files / "badpose.npy", np.broadcast_to(np.eye(4) * 2, (T, 4, 4)))
    with pytest.raises(RowError, match="pose") as e:
        load(files, depth_row(poses="badpose.npy"))
    assert e.value.path.endswith("badpose.npy") and e.value.row == 0
    mirrored = np.broadcast_to(np.eye(4), (T, 4, 4)).copy()
    mirrored[2, 1, 1] = -1  # orthonormal, but a reflection (a flipped y axis)
    np.save(files / "mirror.npy", mirrored)
    with pytest.raises(RowError, match="pose of frame 2 is a reflection"):
        load(files, depth_row(poses="mirror.npy"))
    with pytest.raises(RowError, match="file not found") as e:
        load(files, depth_row(depth="missing.npy"))
    assert e.value.missing
    (files / "folder.npy").mkdir()
    with pytest.raises(RowError, match="file is a folder, not a file") as e:
        load(files, depth_row(depth="folder.npy"))
    assert not e.value.missing  # not one that a re-run finds filled
    (files / "junk.npz").write_bytes(b"PKjunk")  # numpy: "contains pickled (object) data ... load it unsafely"
    with pytest.raises(RowError, match=r"cannot load array: the file begins with neither an .npy's nor an .npz's "
                                       r"header \(damaged, or another format; pickles are never loaded\)$"):
        load(files, depth_row(depth="junk.npz"))
    np.savez(files / "wrong.npz", other=d)
    with pytest.raises(RowError, match="no member 'depth'"):
        load(files, depth_row(depth="wrong.npz"))
    np.save(files / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(RowError, match=r"cannot load array: it holds Python objects \(an object array is a pickle"):
        load(files, depth_row(depth="obj.npy"))
    np.save(files / "huge.npy", d * 1e6)
    with pytest.raises(RowError, match="float16"):
        load(files, depth_row(depth="huge.npy", valid="valid.npz"))



def test_negative_depth_is_rejected_as_another_convention(files):
    """Depth stored as OpenGL's negative z passed (without a mask, depth <= 0 reads as invalid), and the clip trained
    with no valid pixel and an xyz loss of 0. Without a mask a negative value is an error; a mask may mark one false
    (a -1 'no depth' marker), and where it says valid the error gives the same hint. 0 without a mask is no depth."""
    d = np.full((T, H, W), 2.0, np.float32)
    d[1, 2, 3] = -2.0
    np.save(files / "neg.npy", -np.full((T, H, W), 2.0, np.float32))
    np.save(files / "one_neg.npy", d)
    for name, count in (("neg.npy", T * H * W), ("one_neg.npy", 1)):
        with pytest.raises(RowError, match=rf"depth has {count} negative values? \(first at frame \d+, y \d+, x \d+\): "
                                           r"depth is z > 0 in front of the camera \(OpenCV axes\), while OpenGL's "
                                           r"camera looks down -z: store its negation") as e:
            load(files, depth_row(depth=name))
        assert e.value.path.endswith(name)
    valid = d > 0
    np.save(files / "valid.npy", valid)
    g = load(files, depth_row(depth="one_neg.npy", valid="valid.npy"))  # masked out: fine, stored as 0
    assert g["geometry"][1, 2, 3] == 0 and not g["valid"][1, 2, 3]
    np.save(files / "all_valid.npy", np.ones((T, H, W), bool))
    with pytest.raises(RowError, match=r"depth must be > 0 where valid; 1 pixels are not.*OpenGL"):
        load(files, depth_row(depth="one_neg.npy", valid="all_valid.npy"))


@pytest.mark.parametrize("how", ["zero_depth", "mask_all_false", "xyz_mask_all_false"])
def test_a_row_without_any_valid_geometry_is_rejected(files, how):
    """All-zero depth or a mask false everywhere left no valid pixel: the clip trained with an xyz loss of 0 and
    'valid fraction 0.0' in the index, without a word."""
    np.save(files / "zero.npy", np.zeros((T, H, W), np.float32))
    np.save(files / "none_valid.npy", np.zeros((T, H, W), bool))
    np.save(files / "x.npy", np.ones((T, H, W, 3), np.float32))
    row, path = {"zero_depth": (depth_row(depth="zero.npy"), "zero.npy"),
                 "mask_all_false": (depth_row(valid="none_valid.npy"), "none_valid.npy"),
                 "xyz_mask_all_false": ({"video": "v.mp4", "xyz": "x.npy", "valid": "none_valid.npy"},
                                        "none_valid.npy")}[how]
    with pytest.raises(RowError, match=r"no valid geometry: no pixel of any frame is valid") as e:
        load(files, row)
    assert e.value.path.endswith(path) and e.value.row == 0


@pytest.mark.parametrize("K, frame", [
    ([[20, 0, 2.5 * 4 + 1.5], [0, 20, 1.5 * 4 + 1.5], [0, 0, 1]], 0),  # a 4x larger frame's intrinsics
    ([[5, 0, -0.6], [0, 5, 1.5], [0, 0, 1]], 0),
    ([[5, 0, 2.5], [0, 5, 3.6], [0, 0, 1]], 0),
    ([[[5, 0, 2.5], [0, 5, 1.5], [0, 0, 1]]] * (T - 1) + [[[5, 0, 9], [0, 5, 1.5], [0, 0, 1]]], T - 1),
])
def test_intrinsics_of_another_resolution_are_rejected(files, K, frame):
    """A principal point outside the video's frame is intrinsics of another size (the original footage's, say):
    they would pass every other check and give wrong pointmaps. The frame spans [-0.5, W - 0.5] in x."""
    with pytest.raises(RowError, match=rf"intrinsics of frame {frame} put the principal point at .* outside the "
                                       rf"{W}x{H} video") as e:
        load(files, depth_row(intrinsics=K))
    assert e.value.row == 0
    for cx, cy in ((-0.5, -0.5), (W - 0.5, H - 0.5)):  # the frame's edges are inside
        load(files, depth_row(intrinsics=[[5, 0, cx], [0, 5, cy], [0, 0, 1]]))

def test_a_npy_whose_header_promises_more_than_the_file_holds_is_rejected(files):
    """A cut or damaged .npy whose header claims a huge shape is the file's fault, said so without allocating
    that shape (an out-of-memory error is no fault of the row's, and is not a reject for good)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10 ** 6, 10 ** 6, 10)})
    (files / "cut.npy").write_bytes(buf.getvalue() + bytes(64))
    with pytest.raises(RowError, match=r"cannot load array: the file is shorter than its header says \(truncated\)") as e:
        load(files, depth_row(depth="cut.npy"))
    assert e.value.path.endswith("cut.npy") and "allocate" not in e.value.reason


def test_text_embedding(files):
    np.save(files / "emb.npy", np.zeros((7, 4096), np.float32))
    np.save(files / "bad_emb.npy", np.zeros((7, 10), np.float32))
    rows, _ = read_manifest(write_rows(files, [depth_row(text_embedding="emb.npy"),
                                               depth_row(text_embedding="bad_emb.npy"), depth_row()]))
    assert load_text_embedding(rows[0]).shape == (7, 4096)
    with pytest.raises(RowError, match=r"\[L, 4096\]"):
        load_text_embedding(rows[1])
    assert load_text_embedding(rows[2]) is None


def test_an_empty_text_embedding_is_rejected(files):
    """[0, 4096] is no embedding: collated next to a sample without one it would hide that sample's caption."""
    np.save(files / "emb0.npy", np.zeros((0, 4096), np.float32))
    rows, _ = read_manifest(write_rows(files, [depth_row(text_embedding="emb0.npy")]))
    with pytest.raises(RowError, match=r"text embedding has no rows \(L = 0\)") as e:
        load_text_embedding(rows[0])
    assert e.value.path.endswith("emb0.npy")


def test_xyz_geometry_with_optional_cameras(files):
    xyz = np.ones((T, H, W, 3), np.float32)
    xyz[0, 0, 0] = np.inf
    np.savez_compressed(files / "x.npz", xyz=xyz)
    with pytest.raises(RowError, match=r"non-finite xyz at \(frame 0, y 0, x 0\)"):
        load(files, {"video": "v.mp4", "xyz": "x.npz"})
    xyz[0, 0, 0] = 3.0
    np.savez_compressed(files / "x.npz", xyz=xyz)
    g = load(files, {"video": "v.mp4", "xyz": "x.npz"})
    assert g["geometry"].shape == (T, H, W, 3) and g["valid"].all() and "intrinsics" not in g
    g = load(files, {"video": "v.mp4", "xyz": "x.npz", "intrinsics": "K.json", "poses": "poses.npy"})
    assert g["intrinsics"].shape == (T, 3, 3) and g["poses_c2w"].shape == (T, 4, 4)
    with pytest.raises(RowError, match="go together"):
        load(files, {"video": "v.mp4", "xyz": "x.npz", "intrinsics": "K.json"})


@pytest.mark.parametrize("how", ["opengl", "zero_marker"])
def test_pointmaps_behind_the_first_camera_are_rejected(files, how):
    """Frame 0's pixels see points in front of its camera (z > 0 in its OpenCV axes). Pointmaps in OpenGL's axes
    (z backwards), or with (0, 0, 0) marking missing points and no valid mask, passed and trained on wrong
    geometry. Masked out, such points are fine, and later frames may hold points behind the first camera."""
    xyz = np.ones((T, H, W, 3), np.float32)
    xyz[1:, 0, 0, 2] = -4.0  # later frames: behind the first camera is possible
    if how == "opengl":
        xyz[0, ..., 1:] *= -1
    else:
        xyz[0, 1, 2:4] = 0.0
    np.save(files / "x.npy", xyz)
    with pytest.raises(RowError, match=rf"xyz of frame 0 has {H * W if how == 'opengl' else 2} valid points with "
                                       r"z <= 0, .* OpenCV axes") as e:
        load(files, {"video": "v.mp4", "xyz": "x.npy"})
    assert e.value.path.endswith("x.npy")
    valid = xyz[..., 2] != 0
    valid[1:] = True
    np.save(files / "valid.npy", valid)
    if how == "zero_marker":
        assert load(files, {"video": "v.mp4", "xyz": "x.npy", "valid": "valid.npy"})["valid"].sum() == T * H * W - 2


def test_null_cameras_are_rejected_with_the_reason(files):
    """A depth row with "intrinsics": null or "poses": null would make a sample without cam.json, which the
    reader skips every epoch: it is a bad row. With xyz geometry null is no way to leave cameras out either."""
    rows, errors = read_manifest(write_rows(files, [
        '{"video": "v.mp4", "depth": "d.npy", "intrinsics": null, "poses": null}',
        '{"video": "v.mp4", "depth": "d.npy", "intrinsics": [[5, 0, 2.5], [0, 5, 1.5], [0, 0, 1]], "poses": null}',
        '{"video": "v.mp4", "xyz": "x.npy", "intrinsics": null, "poses": null}',
        json.dumps(depth_row()),
    ]))
    assert [r.row for r in rows] == [3]
    by_row = {e.row: e.reason for e in errors}
    assert set(by_row) == {0, 1, 2}
    assert "'intrinsics' is null" in by_row[0] and "'poses' is null" in by_row[1]
    assert "leave both keys out" in by_row[2]


def test_a_camera_matrix_given_as_its_text_is_named_not_looked_for_as_a_file(files):
    """"intrinsics": "[[5, 0, 2.5], ...]" (a CSV or pandas export quotes nested lists) was taken for a missing file
    ("missing": true, so a re-run would be expected to find it)."""
    rows, errors = read_manifest(write_rows(files, [
        json.dumps(depth_row(intrinsics="[[5, 0, 2.5], [0, 5, 1.5], [0, 0, 1]]")),
        json.dumps(depth_row(poses=" [[1, 0, 0, 0]]")),
        json.dumps(depth_row(intrinsics="[cam0]/K.json"))]))  # a path that begins with '[' stays a path
    assert [r.row for r in rows] == [2] and rows[0].intrinsics == files / "[cam0]" / "K.json"
    assert [e.row for e in errors] == [0, 1]
    assert all(not e.missing and e.path == str(files / "v.mp4") for e in errors)
    assert "'intrinsics' is a string that reads as a list ('[[5, 0, 2.5]" in errors[0].reason
    assert "give the list itself, not its text" in errors[1].reason and "'poses'" in errors[1].reason


def test_depth_rows_without_cameras_never_load(files):
    """load_geometry itself refuses depth geometry without cameras (a ManifestRow made without the parser)."""
    import dataclasses

    rows, _ = read_manifest(write_rows(files, [depth_row()]))
    row = dataclasses.replace(rows[0], intrinsics=None, poses=None)
    with pytest.raises(RowError, match="depth geometry needs 'intrinsics' and 'poses'"):
        load_geometry(row, T, H, W)


def test_duplicate_keys_in_a_row_are_rejected(tmp_path):
    path = write_rows(tmp_path, [
        json.dumps(depth_row()),
        '{"video": "v.mp4", "depth": "d.npy", "intrinsics": "K.json", "poses": "p.npy", "video": "w.mp4"}',
        '{"video": "v.mp4", "xyz": "x.npy", "caption": "a", "caption": "b"}',
    ])
    rows, errors = read_manifest(path)
    assert [r.row for r in rows] == [0]
    by_row = {e.row: e for e in errors}
    assert "duplicate key 'video'" in by_row[1].reason and "duplicate key 'caption'" in by_row[2].reason
    assert str(by_row[1]).startswith("row 1 (")


def test_a_json_camera_file_with_duplicate_keys_is_rejected(files):
    (files / "Kdup.json").write_text('{"a": 1, "a": 2}')
    with pytest.raises(RowError, match="duplicate key 'a'"):
        load(files, depth_row(intrinsics="Kdup.json"))


@pytest.mark.parametrize("clip_id", ["abc\n", "abc\r\n", "\nabc", "a b", ""])
def test_ids_are_matched_whole(tmp_path, clip_id):
    rows, errors = read_manifest(write_rows(tmp_path, [depth_row(id=clip_id)]))
    assert not rows and "'id' must be letters, digits" in errors[0].reason


@pytest.mark.parametrize("where, value", [
    ("intrinsics", [["5", 0, 2.5], [0, 5, 1.5], [0, 0, 1]]),
    ("intrinsics", [[5, 0, 2.5], [0, 5, 1.5], [False, False, True]]),
    ("intrinsics", [[5, 0, 2.5], [0, 5, 1.5], [0, 0, None]]),
    ("intrinsics", "Kstr.json"),
    ("intrinsics", "Kbool.npy"),
    ("poses", "posestr.npy"),
    ("poses", [[["1", 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]] * T),
])
def test_cameras_must_be_real_numbers(files, where, value):
    """Strings and booleans would be converted to numbers by numpy (np.asarray(['5'], float) is [5.]): refused, in
    inline lists, .json files and .npy files alike."""
    (files / "Kstr.json").write_text(json.dumps([[5, 0, "2.5"], [0, 5, 1.5], [0, 0, 1]]))
    np.save(files / "Kbool.npy", np.eye(3, dtype=bool))
    np.save(files / "posestr.npy", np.broadcast_to(np.eye(4), (T, 4, 4)).astype(str))
    with pytest.raises(RowError, match=rf"'{where}' must hold real numbers"):
        load(files, depth_row(**{where: value}))
    load(files, depth_row(intrinsics=[[5, 0, 2.5], [0, 5.0, 1.5], [0, 0, 1]]))  # ints and floats are fine


@pytest.mark.parametrize("where, value", [
    ("intrinsics", {"fx": 5, "fy": 5, "cx": 2.5, "cy": 1.5}),
    ("intrinsics", "Kdict.json"),
    ("poses", {"R": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "t": [0, 0, 0]}),
])
def test_cameras_given_as_a_json_object_name_the_matrix_expected(files, where, value):
    """{"fx": ..., "fy": ...} was told it 'must hold real numbers (no strings, booleans or nulls)', which it does."""
    (files / "Kdict.json").write_text(json.dumps({"fx": 5, "fy": 5, "cx": 2.5, "cy": 1.5}))
    want = {"intrinsics": r"a 3x3 matrix \(or one per frame, \[T, 3, 3\]\) of nested lists, \[\[fx, 0, cx\], "
                          r"\[0, fy, cy\], \[0, 0, 1\]\]",
            "poses": r"\[T, 4, 4\]: a 4x4 camera-to-world matrix per frame, of nested lists"}[where]
    with pytest.raises(RowError, match=rf"'{where}' must be {want}, got a JSON object") as e:
        load(files, depth_row(**{where: value}))
    assert e.value.path.endswith("Kdict.json" if value == "Kdict.json" else "v.mp4")


def test_geometry_below_float16s_normal_range_is_rejected(files):
    """Depth x 1e-9 was stored as float16 0 everywhere (the reader's mask, depth > 0, then empty) and passed. A row is
    rejected where more than 1% of its valid values fall below float16's smallest normal value (6.1e-05, subnormal:
    fewer significant bits, then 0); a point counts by its largest |coordinate|. A stray pixel that rounds to 0 (a
    clip in metres) does not reject the clip."""
    np.save(files / "nano.npy", np.full((T, H, W), 2e-9, np.float32))
    with pytest.raises(RowError, match=re.escape("depth values as small as 2e-09 fall below float16's smallest normal "
                                                 "value, 6.1e-05: of 72 valid, 72 would be stored with reduced "
                                                 "precision and 72 as 0 (then read as invalid): give the geometry in "
                                                 "metres")) as e:
        load(files, depth_row(depth="nano.npy"))
    assert e.value.path.endswith("nano.npy")
    frames = 30  # 720 values: 5 subnormal ones (0.7%) pass, 8 (1.1%) do not
    d = np.full((frames, H, W), 2.0, np.float32)
    d[0, 0, :5] = 3e-5
    np.save(files / "few.npy", d)
    row = depth_row(depth="few.npy", poses=np.broadcast_to(np.eye(4), (frames, 4, 4)).tolist())
    assert load(files, row, t=frames)["geometry"][0, 0, 0] == np.float32(3e-5)
    d[0, 1, :3] = 3e-5
    np.save(files / "few.npy", d)
    with pytest.raises(RowError, match=r"of 720 valid, 8 would be stored with reduced precision and 0 as 0"):
        load(files, row, t=frames)
    d[0, 1, :3] = 2.0
    d[0, 0, :5] = 2e-8  # five stray values that float16 stores as 0 (0.7%)
    np.save(files / "few.npy", d)
    assert load(files, row, t=frames)["geometry"][0, 0, 0] == np.float32(2e-8)
    xyz = np.ones((T, H, W, 3), np.float32)
    xyz[..., 0] = 1e-9  # points on the optical axis: a tiny coordinate is no unit problem
    np.save(files / "x.npy", xyz)
    load(files, {"video": "v.mp4", "xyz": "x.npy"})
    np.save(files / "x.npy", xyz * 1e-9)
    with pytest.raises(RowError, match=r"points \(by their largest \|coordinate\|\) as small as 1e-09 fall below"):
        load(files, {"video": "v.mp4", "xyz": "x.npy"})


def test_a_mask_of_other_integers_names_its_values(files):
    """A 0/255 uint8 mask was told 'valid must be bool or 0/1 integers, got uint8': the dtype is fine, the values
    are not."""
    np.save(files / "mask255.npy", np.full((T, H, W), 255, np.uint8) * (np.arange(W) % 2).astype(np.uint8))
    with pytest.raises(RowError, match=re.escape("valid must be bool or 0/1 integers; this uint8 mask holds values "
                                                 "{0, 255} (a 0/255 image mask: store mask > 0)")) as e:
        load(files, depth_row(valid="mask255.npy"))
    assert e.value.path.endswith("mask255.npy")
    np.save(files / "mask_f.npy", np.ones((T, H, W), np.float32))
    with pytest.raises(RowError, match="valid must be bool or 0/1 integers, got float32"):
        load(files, depth_row(valid="mask_f.npy"))
