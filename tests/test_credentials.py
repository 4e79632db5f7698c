"""Where S3 keys travel. With ``s3.credentials: worker`` (the default) the filesystem that Ray
pickles to every worker carries no keys: each process resolves the AWS chain itself. With the
opt-in ``driver`` the keys ride inside it, in clear. tests/test_s3_faults.py searches whole
runs (worker mode) and a driver-mode job for a fake secret, on disk and in the bucket.
"""

from __future__ import annotations

import pickle
import uuid

from pipeline.config import S3Config


def test_default_is_worker_and_ships_no_keys(monkeypatch, s3_server):
    from pipeline.data import fs as fsx

    secret = "FAKESECRET-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    assert S3Config().credentials == "worker"
    shipped = pickle.dumps(fsx.s3_filesystem(S3Config(endpoint_url=s3_server)))
    assert secret.encode() not in shipped
    opt_in = pickle.dumps(fsx.s3_filesystem(S3Config(endpoint_url=s3_server,
                                                     credentials="driver")))
    assert secret.encode() in opt_in  # in clear, wherever Ray puts the pickled filesystem
