"""An S3-compatible bucket (AWS S3, MinIO, Ceph RGW, Garage) through boto3.

`s3://BUCKET/PREFIX`. Credentials, region and endpoint come from the standard
`AWS_*` variables (`AWS_ENDPOINT_URL` among them). Large objects go up in
multipart uploads; throttling is retried by botocore's adaptive mode.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from . import ObjectNotFound, ObjectStore

MULTIPART_ABOVE = 64 * 1024 * 1024


class S3Store(ObjectStore):
    def __init__(self, bucket: str, prefix: str = "") -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        self.client: Any = boto3.client("s3", config=Config(retries={"mode": "adaptive", "max_attempts": 10}, max_pool_connections=32))
        self.transfer = TransferConfig(multipart_threshold=MULTIPART_ABOVE, multipart_chunksize=16 * 1024 * 1024)

    def _key(self, key: str) -> str:
        return self.prefix + key

    def put(self, key: str, data: bytes | list[bytes]) -> None:
        body = b"".join(data) if isinstance(data, list) else data
        if len(body) > MULTIPART_ABOVE:
            self.client.upload_fileobj(io.BytesIO(body), self.bucket, self._key(key), Config=self.transfer)
        else:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body)  # S3 makes a PUT visible whole or not at all

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        extra = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            extra["Range"] = f"bytes={offset}-{end}"
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **extra)
        except self.client.exceptions.NoSuchKey:
            raise ObjectNotFound(key) from None
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("InvalidRange", "416"):
                return b""
            raise
        return bytes(response["Body"].read())

    def stream(self, key: str, offset: int, length: int) -> Iterator[bytes]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes={offset}-{offset + length - 1}")
        except self.client.exceptions.NoSuchKey:
            raise ObjectNotFound(key) from None
        yield from response["Body"].iter_chunks(1 << 20)

    def size(self, key: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def delete(self, key: str) -> bool:
        existed = self.size(key) is not None
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        return existed

    def keys(self, prefix: str = "") -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            for item in page.get("Contents", []):
                yield item["Key"][len(self.prefix) :]
