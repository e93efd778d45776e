"""S3 source through boto3 (credentials, region and AWS_ENDPOINT_URL resolved as boto3 does).

Checksums, strongest first: a `SHA256SUMS` file at the prefix (sha256sum format); the object's
full-object `ChecksumSHA256` (uploads made with `--checksum-algorithm SHA256`); its ETag when
that is an MD5 (single-part upload without KMS). The GET is pinned to the listed ETag, so an
object overwritten mid-pull fails loudly instead of mixing two uploads.
"""

from __future__ import annotations

import base64
import re
from typing import Any

from app.models.sources import (
    FileEntry,
    Resolved,
    Sink,
    SourceError,
    check_relative_path,
    parse_sha256sums,
)

_MD5 = re.compile(r"^[0-9a-f]{32}$")
SUMS_FILE = "SHA256SUMS"
CHUNK = 1 << 20


class S3Source:
    def __init__(self, bucket: str, prefix: str, revision: str) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.revision = revision
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._client: Any = None

    def _s3(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3", config=Config(retries={"mode": "standard", "max_attempts": 8})
            )
        return self._client

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def resolve(self) -> Resolved:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._resolve()
        except (BotoCoreError, ClientError) as exc:
            raise SourceError(f"{self.uri}: {exc}") from exc

    def _resolve(self) -> Resolved:
        s3 = self._s3()
        start = f"{self.prefix}/" if self.prefix else ""
        entries: dict[str, FileEntry] = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(start) :]
                if not rel or rel.endswith("/"):
                    continue  # the console's "folder" markers
                entries[rel] = self._entry(check_relative_path(rel))
        if not entries:
            raise SourceError(f"{self.uri}: no objects under this prefix")
        if SUMS_FILE in entries:
            body = s3.get_object(Bucket=self.bucket, Key=self._key(SUMS_FILE))["Body"].read()
            for rel, digest in parse_sha256sums(body.decode()).items():
                entry = entries.get(rel)
                if entry is None:
                    raise SourceError(f"{self.uri}: {SUMS_FILE} lists {rel!r}, which is missing")
                if entry.sha256 and entry.sha256 != digest:
                    raise SourceError(
                        f"{self.uri}: {rel}: {SUMS_FILE} and S3's ChecksumSHA256 disagree"
                    )
                entries[rel] = FileEntry(
                    rel,
                    entry.size,
                    sha256=digest,
                    md5=entry.md5,
                    checksum_from=SUMS_FILE,
                    extra=entry.extra,
                )
        return Resolved(commit=None, files=tuple(entries[k] for k in sorted(entries)))

    def _entry(self, rel: str) -> FileEntry:
        head = self._s3().head_object(
            Bucket=self.bucket, Key=self._key(rel), ChecksumMode="ENABLED"
        )
        etag = str(head.get("ETag", "")).strip('"')
        sha256 = None
        checksum = head.get("ChecksumSHA256")
        # A multipart upload's default checksum is a checksum of part checksums ("...-N").
        if checksum and (head.get("ChecksumType") == "FULL_OBJECT" or "-" not in checksum):
            sha256 = base64.b64decode(checksum).hex()
        md5 = None
        if _MD5.match(etag) and head.get("ServerSideEncryption") != "aws:kms":
            md5 = etag
        return FileEntry(
            rel,
            size=int(head["ContentLength"]),
            sha256=sha256,
            md5=md5,
            checksum_from="S3 ChecksumSHA256" if sha256 else ("S3 ETag (MD5)" if md5 else ""),
            extra={"etag": str(head.get("ETag", ""))},
        )

    def fetch(self, entry: FileEntry, sink: Sink, offset: int) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        if entry.size is not None and offset >= entry.size:
            return
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(entry.path)}
        if entry.extra.get("etag"):
            kwargs["IfMatch"] = entry.extra["etag"]
        if offset:
            kwargs["Range"] = f"bytes={offset}-"
        try:
            body = self._s3().get_object(**kwargs)["Body"]
            try:
                for chunk in body.iter_chunks(CHUNK):
                    sink.write(chunk)
            finally:
                body.close()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in {"PreconditionFailed", "412"}:
                raise SourceError(f"{entry.path}: the object changed during the pull") from exc
            raise SourceError(f"{self.uri}/{entry.path}: {exc}") from exc
        except BotoCoreError as exc:
            raise SourceError(f"{self.uri}/{entry.path}: {exc}") from exc
