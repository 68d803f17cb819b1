"""S3 streaming against a real S3-compatible server (moto's server mode on 127.0.0.1).

A small TCP proxy sits between the client and the server so a test can cut a connection in the middle
of a shard, as a flaky network would; the reader must reconnect and continue where it stopped.
"""

import contextlib
import logging
import os
import socket
import threading

import pytest

from clip_tao.config.schema import DatasetConfig, WdsConfig
from clip_tao.data import s3, wds
from clip_tao.data.custom import SkipCounter
from clip_tao.data.loaders import build_train_loader
from clip_tao.errors import DataError
from clip_tao.models import create_model
from tests.shards import write_shardwriter

SECRET = "not-a-real-secret-but-must-never-be-logged"


class BreakingProxy:
    """Forwards TCP to ``upstream``; when armed, closes the first connection that has sent
    ``break_after`` bytes towards the client (the middle of a response body)."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.break_after: int | None = None
        self.breaks = 0
        self._lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        upstream = socket.create_connection(self.upstream)
        threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
        self._pump(upstream, client, True)

    def _pump(self, source, target, downstream):
        sent = 0
        try:
            while True:
                data = source.recv(4096)
                if not data:
                    break
                if downstream:
                    with self._lock:
                        limit = self.break_after
                        if limit is not None and sent + len(data) > limit:
                            self.break_after, self.breaks = None, self.breaks + 1
                            target.sendall(data[: max(0, limit - sent)])
                            break
                target.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (source, target):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto on 127.0.0.1, a proxy before it, a bucket with four shards and their sizes.json."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SHARED_CREDENTIALS_FILE",
                                            "AWS_CONFIG_FILE", "AWS_DEFAULT_REGION")}  # fmt: skip
    # Credentials from the standard environment chain, as users give them.
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY=SECRET, AWS_SHARED_CREDENTIALS_FILE="/dev/null",
                      AWS_CONFIG_FILE="/dev/null", AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = BreakingProxy((host, port))
    root = tmp_path_factory.mktemp("s3data")
    local = write_shardwriter(root / "shards", 40, per_shard=10)
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
    client.create_bucket(Bucket="clip-data")
    for path in local:
        client.upload_file(str(path), "clip-data", f"train/{path.name}")
    client.put_object(
        Bucket="clip-data", Key="train/sizes.json", Body=b'{"shard-000000.tar": 10, "shard-000001.tar": 10}'
    )
    query = f"endpoint=http://127.0.0.1:{proxy.port}&region=us-east-1"
    yield {"proxy": proxy, "query": query, "local": local, "root": root}
    server.stop()
    proxy.server.close()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_url_form_and_refusals():
    location = s3.parse_s3_url("s3://bucket/a/b.tar?endpoint=s3.us-east-1.amazonaws.com&region=us-east-1")
    assert location == s3.S3Location("bucket", "a/b.tar", "https://s3.us-east-1.amazonaws.com", "us-east-1")
    assert location.name == "s3://bucket/a/b.tar"
    with pytest.raises(DataError, match="credentials do not belong in URLs") as info:
        s3.parse_s3_url(f"s3://bucket/a.tar?aws_secret_access_key={SECRET}")
    assert SECRET not in str(info.value)
    with pytest.raises(DataError, match="credentials do not belong in URLs") as info:
        s3.parse_s3_url(f"s3://key:{SECRET}@bucket/a.tar")
    assert SECRET not in str(info.value)
    with pytest.raises(DataError, match="unknown URL parameter 'endpiont'"):
        s3.parse_s3_url("s3://bucket/a.tar?endpiont=x")
    with pytest.raises(DataError, match="is not an S3 object URL"):
        s3.parse_s3_url("s3://bucket")


def test_a_shard_streams_and_survives_a_connection_cut_mid_shard(s3_server):
    local = s3_server["local"][0]
    expected = local.read_bytes()
    proxy = s3_server["proxy"]
    proxy.break_after = len(expected) // 3  # the first response is cut a third of the way through
    url = f"s3://clip-data/train/{local.name}?{s3_server['query']}"
    stream = s3.open_s3(url, buffer_size=4096)
    reader = stream.raw
    reader.backoff_s = 0.01
    assert stream.read() == expected
    assert proxy.breaks == 1 and reader.retries >= 1
    stream.close()
    # and through webdataset's tar reading: the same samples as the local file
    proxy.break_after = len(expected) // 2
    remote = [r["__key__"] for r in wds.iter_raw_samples(wds.Shard(url, None), SkipCounter())]
    assert remote == [r["__key__"] for r in wds.iter_raw_samples(wds.Shard(str(local), None), SkipCounter())]
    assert len(remote) == 10 and proxy.breaks == 2


def test_training_loader_reads_s3_shard_list(s3_server, tmp_path, caplog):
    listing = tmp_path / "shards.txt"
    query = s3_server["query"]
    listing.write_text(
        f"s3://clip-data/train/shard-{{000000..000003}}.tar?{query}\ns3://clip-data/train/gone.tar?{query}\n"
    )
    shards = wds.list_shards(WdsConfig(shard_list_file=str(listing), samples_per_shard=10), "dataset.train.wds")
    assert len(shards) == 5 and [s.num_samples for s in shards] == [10, 10, None, None, None]  # sizes.json on S3
    cfg = DatasetConfig(seed=3)
    cfg.train.type = "wds"
    cfg.train.batch_size = 5
    cfg.train.num_workers = 2
    cfg.train.wds = WdsConfig(shard_list_file=str(listing), samples_per_shard=10)
    model = create_model("tiny-clip", pretrained=False)
    s3_server["proxy"].break_after = 15000  # cut one connection on the way
    bundle = build_train_loader(cfg, model.preprocess, model.tokenizer)  # 2 worker processes
    bundle.set_epoch(0)
    batches = list(bundle.loader)
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == 50 and {k.split("/")[1] for k in keys} <= {f"{i:06d}" for i in range(40)}
    assert len(set(keys)) >= 30
    skipped = SkipCounter()
    for b in batches:
        skipped.update(b["skipped"])
    assert skipped["unreadable_shard"] >= 1  # gone.tar
    # a shard that cannot be opened is reported by name (logged here in this process)
    with caplog.at_level(logging.WARNING):
        wds._warned.clear()
        assert list(wds.iter_raw_samples(shards[-1], skipped)) == []
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("clip_tao"))
    assert "s3://clip-data/train/gone.tar: cannot open (NoSuchKey)" in ours
    assert SECRET not in caplog.text and "127.0.0.1" not in ours  # no query string, no credentials
