import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import layout, sink
from pipeline.config import Config


def batch(n, shape=(3, 4, 8, 8), dtype=np.float16):
    rng = np.random.default_rng(0)
    return {
        "clip_id": np.array([f"id{i}" for i in range(n)], dtype=object),
        "source_uri": np.array([f"s3://b/v{i}.mp4" for i in range(n)], dtype=object),
        "clip_index": np.arange(n), "start_frame": np.arange(n) * 9,
        "num_frames": np.full(n, 9), "fps": np.full(n, 29.97),
        "height": np.full(n, 64), "width": np.full(n, 64),
        "latents": rng.standard_normal((n, *shape)).astype(dtype),
    }


def test_latents_round_trip_through_parquet_in_axis_order(tmp_path):
    cfg = Config(input="i", output=str(tmp_path), model="m")
    b = batch(3)
    # A strided (permuted) input must still be stored row-major with its logical shape.
    b["latents"] = np.ascontiguousarray(b["latents"].transpose(0, 2, 1, 3, 4)).transpose(0, 2, 1, 3, 4)
    assert not b["latents"].flags.c_contiguous
    out = sink.write_latents(b, cfg, json.dumps({"layout": "TCHW"}))
    assert list(out["num_rows"]) == [3]
    table = pq.read_table(out["path"][0])
    typ = table.schema.field("latents").type
    assert typ.shape == [3, 4, 8, 8] and typ.permutation is None
    np.testing.assert_array_equal(table.column("latents").combine_chunks().to_numpy_ndarray(), b["latents"])
    assert table.schema.field("start_frame").type == pa.int32()
    assert table.column("clip_id").to_pylist() == ["id0", "id1", "id2"]
    assert json.loads(table.schema.metadata[b"video_latents"]) == {"layout": "TCHW"}


def test_file_names_derive_from_clip_ids_not_input_names(tmp_path):
    cfg = Config(input="i", output=str(tmp_path), model="m")
    b = batch(2)
    b["source_uri"] = np.array(["../../etc/passwd.mp4", "a b/ü.mp4"], dtype=object)
    first = sink.write_latents(b, cfg, "{}")["path"][0]
    again = sink.write_latents(b, cfg, "{}")["path"][0]
    assert first == again and first.startswith(str(tmp_path / "latents" / "part-"))
    assert sorted(p.name for p in (tmp_path / "latents").iterdir()) == [first.rsplit("/", 1)[1]]


def test_dist_mode_columns(tmp_path):
    cfg = Config(input="i", output=str(tmp_path), model="m", latent_mode="dist")
    b = batch(1)
    b["latents_mean"] = b.pop("latents")
    b["latents_logvar"] = b["latents_mean"] * 0
    table = pq.read_table(sink.write_latents(b, cfg, "{}")["path"][0])
    assert "latents" not in table.column_names
    assert table.schema.field("latents_logvar").type.shape == [3, 4, 8, 8]


def test_errors_markers_and_counts(tmp_path):
    cfg = Config(input="i", output=str(tmp_path), model="m", job_fingerprint="f00d")
    out = str(tmp_path)
    assert layout.count_rows(out, layout.ERRORS_DIR) == 0
    sink.write_error(cfg, sink.error_row("u1", "decode", "InvalidDataError", "bad\nsecond line"))
    sink.write_error(cfg, sink.error_row("u2", "encode", "OutOfMemory", "", clip_id="c",
                                         error_class="resource", retryable=True))
    sink.write_error(cfg, sink.error_row("u2", "encode", "NonFinite", "nan", clip_id="d"))
    rows = sorted(pq.read_table(tmp_path / "errors").to_pylist(), key=lambda r: (r["source_uri"], r["clip_id"] or ""))
    assert rows[0]["message"] == "bad" and rows[0]["clip_id"] is None and rows[0]["error_class"] == "input"
    assert rows[1]["message"] == "OutOfMemory" and rows[1]["retryable"] and rows[1]["clip_id"] == "c"
    assert layout.count_rows(out, layout.ERRORS_DIR) == 3  # one file per input or clip: none overwrote another
    sink.write_error(cfg, sink.error_row("u1", "decode", "InvalidDataError", "again"))
    assert layout.count_rows(out, layout.ERRORS_DIR) == 3  # the same input's row is replaced, not added
    sink.write_marker(cfg, "u3", ["a", "b"])
    assert layout.read_columns(out, layout.MARKERS_DIR, ["clip_ids"]).to_pylist() == [{"clip_ids": ["a", "b"]}]
    for folder in ("errors", "_markers"):  # the job's fingerprint travels in every file
        for f in os.listdir(tmp_path / folder):
            meta = json.loads(pq.read_schema(tmp_path / folder / f).metadata[b"video_latents"])
            assert meta == {"job_fingerprint": "f00d"}
    layout.clear(out)
    assert os.listdir(tmp_path) == []


def test_big_files_are_written_in_row_groups_a_reader_can_stream(tmp_path):
    """About ROW_GROUP_BYTES per row group: a training reader holds one group, not a file."""
    from pipeline.config import ROW_GROUP_BYTES

    cfg = Config(input="i", output=str(tmp_path), model="m")
    per_row = ROW_GROUP_BYTES // 8  # 8 rows per group
    b = batch(20, shape=(per_row // 2,), dtype=np.float16)
    path = sink.write_latents(b, cfg, "{}")["path"][0]
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 20 and meta.num_row_groups == 3  # 8 + 8 + 4
