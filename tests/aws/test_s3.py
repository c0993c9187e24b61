"""Folders to and from S3 (moto)."""
import logging

from twotower_lit.aws.s3 import delete_prefix, download_prefix, list_objects, upload_directory


def test_upload_summary_counts_local_files_not_objects_already_there(ctx, tmp_path, caplog):
    src = tmp_path / "prepared"
    src.mkdir()
    for i in range(3):
        (src / f"part-{i}.parquet").write_bytes(b"x" * (i + 1))
    uri = ctx.s3_uri("data", "summary")
    with caplog.at_level(logging.INFO, logger="twotower_lit.aws.s3"):
        upload_directory(ctx.s3, str(src), uri)
        (src / "part-0.parquet").write_bytes(b"changed")
        ctx.s3.put_object(Bucket=ctx.cfg.bucket, Key=f"{ctx.cfg.prefix}/data/summary/stale.bin", Body=b"s")
        upload_directory(ctx.s3, str(src), uri)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("uploaded")]
    assert lines == [f"uploaded 3 files to {uri} (0 unchanged)", f"uploaded 1 files to {uri} (2 unchanged)"]


def test_upload_skips_unchanged_files_and_download_restores_the_tree(ctx, tmp_path):
    src = tmp_path / "prepared"
    (src / "train").mkdir(parents=True)
    (src / "manifest.json").write_text('{"a": 1}')
    (src / "train" / "part-0.parquet").write_bytes(b"x" * 1000)
    (src / ".prepare.lock").write_text("")  # lock files and dot files stay local
    uri = ctx.s3_uri("data", "prepared")
    assert upload_directory(ctx.s3, str(src), uri) == {"uploaded": 2, "unchanged": 0}
    assert upload_directory(ctx.s3, str(src), uri) == {"uploaded": 0, "unchanged": 2}
    (src / "manifest.json").write_text('{"a": 2}')
    assert upload_directory(ctx.s3, str(src), uri) == {"uploaded": 1, "unchanged": 1}
    assert sorted(list_objects(ctx.s3, uri)) == ["manifest.json", "train/part-0.parquet"]

    dst = tmp_path / "back"
    paths = download_prefix(ctx.s3, uri, str(dst))
    assert len(paths) == 2
    assert (dst / "manifest.json").read_text() == '{"a": 2}'
    assert (dst / "train" / "part-0.parquet").read_bytes() == b"x" * 1000
    assert delete_prefix(ctx.s3, uri) == 2 and list_objects(ctx.s3, uri) == {}


def test_default_bucket_is_sagemakers_and_created_when_missing(moto_server, recording_session, project):
    from twotower_lit.aws.config import AwsConfig
    from twotower_lit.aws.session import AwsContext

    c = AwsContext(AwsConfig(endpoint_url=moto_server, region="eu-west-1", project=project), session=recording_session)
    assert c.bucket == "sagemaker-eu-west-1-123456789012"
    assert c.s3.head_bucket(Bucket=c.bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert c.s3_uri("data", "x/") == "s3://sagemaker-eu-west-1-123456789012/twotower/data/x"
