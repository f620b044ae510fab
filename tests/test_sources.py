from pipeline import sources
from pipeline.config import Config


def test_local_listing_is_recursive_case_insensitive_and_sorted(tmp_path):
    for name in ["b.mp4", "a/UPPER.MOV", "a/deep/er/c.mkv", "d.webm", "e.avi", "f.txt", "g", "h.mp4.part"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    rows = sources.list_videos(Config(input=str(tmp_path), output="o", model="m"))
    names = [r["source_uri"][len(str(tmp_path)) + 1:] for r in rows]
    assert names == ["a/UPPER.MOV", "a/deep/er/c.mkv", "b.mp4", "d.webm", "e.avi"]
    assert all(r["size"] == 1 for r in rows)
    only_mp4 = sources.list_videos(Config(input=str(tmp_path), output="o", model="m", extensions=("mp4",)))
    assert [r["source_uri"].rsplit("/", 1)[1] for r in only_mp4] == ["b.mp4"]


def test_a_single_file_is_taken_as_given(tmp_path):
    path = str(tmp_path / "clip.bin")
    (tmp_path / "clip.bin").write_bytes(b"any extension")
    rows = sources.list_videos(Config(input=path, output="o", model="m"))
    assert [r["source_uri"] for r in rows] == [path]


def test_s3_listing(s3_server, s3_bucket):
    client, bucket = s3_bucket
    for key in ["in/x.mp4", "in/sub/y.MKV", "in/z.json", "other/w.mp4"]:
        client.put_object(Bucket=bucket, Key=key, Body=b"abc")
    cfg = Config(input=f"s3://{bucket}/in/", output="o", model="m", s3_endpoint=s3_server)
    rows = sources.list_videos(cfg)
    assert [(r["source_uri"], r["size"]) for r in rows] == [(f"s3://{bucket}/in/sub/y.MKV", 3),
                                                            (f"s3://{bucket}/in/x.mp4", 3)]
