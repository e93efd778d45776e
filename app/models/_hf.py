"""Hugging Face Hub source, through `huggingface_hub` (HF_ENDPOINT and HF_TOKEN respected).

Listing: one `model_info(files_metadata=True)` call gives the commit the revision resolves to
and, per file, its size and either the LFS sha256 (weights) or the git blob id (small files).
Bytes: the same HEAD + GET as `hf_hub_download`, but into our own staging file with a Range
offset, because `hf_hub_download` deletes its partial file when the process dies and so
cannot resume a pull across a Job retry. Xet transfers are not used: their chunk cache lives
in HOME (a small emptyDir in the pull Job), while plain HTTP from the CDN resumes with Range.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from app.models.sources import FileEntry, Resolved, Sink, SourceError, check_relative_path


class HubSource:
    def __init__(self, repo: str, revision: str) -> None:
        self.repo = repo
        self.revision = revision
        self.uri = f"hf://{repo}@{revision}"
        self._commit: str | None = None

    def resolve(self) -> Resolved:
        from huggingface_hub import HfApi
        from huggingface_hub.utils.tqdm import disable_progress_bars

        disable_progress_bars()  # our own progress reporting covers every source
        try:
            info = HfApi().model_info(self.repo, revision=self.revision, files_metadata=True)
        except Exception as exc:  # RepositoryNotFound, RevisionNotFound, gated, network...
            raise SourceError(f"{self.uri}: {type(exc).__name__}: {exc}") from exc
        if not info.sha:
            raise SourceError(f"{self.uri}: the Hub did not say which commit this revision is")
        files = []
        for sib in info.siblings or []:
            path = check_relative_path(sib.rfilename)
            if sib.lfs is not None:
                files.append(
                    FileEntry(
                        path,
                        size=int(sib.lfs.size),
                        sha256=str(sib.lfs.sha256).lower(),
                        checksum_from="Hub LFS sha256",
                    )
                )
            else:
                files.append(
                    FileEntry(
                        path,
                        size=sib.size,
                        git_sha1=sib.blob_id,
                        checksum_from="Hub git blob id" if sib.blob_id else "",
                    )
                )
        self._commit = info.sha
        return Resolved(commit=info.sha, files=tuple(files))

    def fetch(self, entry: FileEntry, sink: Sink, offset: int) -> None:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

        # Pinned to the commit resolved above: a branch moving mid-pull cannot mix revisions.
        url = hf_hub_url(self.repo, entry.path, revision=self._commit or self.revision)
        meta = get_hf_file_metadata(url)
        if meta.commit_hash and self._commit and meta.commit_hash != self._commit:
            raise SourceError(
                f"{entry.path}: served from commit {meta.commit_hash}, not {self._commit}"
            )
        if meta.size is not None and entry.size is not None and meta.size != entry.size:
            raise SourceError(
                f"{entry.path}: the Hub lists {entry.size} bytes but serves {meta.size}"
            )
        headers: dict[str, Any] = build_hf_headers()
        location = meta.location or url
        if urlsplit(location).netloc != urlsplit(url).netloc:
            headers.pop("authorization", None)  # signed CDN URL: the token stays on the Hub
        http_get(location, sink, resume_size=offset, headers=headers, expected_size=entry.size)  # type: ignore[arg-type]
