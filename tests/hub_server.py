"""A small Hub-protocol test server on 127.0.0.1.

It stands in for the Hugging Face Hub's HTTP *protocol*, not for the Hub: just enough of the API for the real
`huggingface_hub` client (`create_repo`, `create_branch`, `upload_folder` over the legacy LFS path, `model_info`,
`list_repo_tree`, `get_paths_info`, `hf_hub_download`) and for `transformers`' `from_pretrained` / `pipeline` to push
and pull model repos in tests. Everything lives in memory; there is no git, no Xet (clients must set
`HF_HUB_DISABLE_XET=1`), no pull requests, and only model repos.

Bounded by design: it binds 127.0.0.1 on a free port, answers at most `max_requests` requests and bodies of at most
`max_body_bytes`, drops idle connections after a few seconds, and shuts itself down after `max_lifetime_s` even if the
test forgets to. Authorization headers are checked, never logged or stored.

    with HubServer(users={"secret-token": "user"}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "secret-token", "HF_HUB_DISABLE_XET": "1", ...}
        ...  # run the client (in a subprocess: huggingface_hub reads HF_ENDPOINT at import)
        hub.files("user/repo")  # {path: bytes} at the head of main
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# Files the Hub stores with LFS whatever their size (a subset of its default .gitattributes), plus images.
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack", ".npz", ".pkl", ".png",
                 ".jpg", ".jpeg", ".gif", ".webp", ".zip", ".tar", ".gz", ".parquet", ".arrow")
_REGULAR_MAX_BYTES = 5 * 1024 * 1024  # the client expects regular (non-LFS) files to be small


def git_blob_sha(content: bytes) -> str:
    """Git's object id of a blob (what the Hub reports as `oid` / `blobId` of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file committed in place of an LFS object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class StoredFile:
    """One file of a commit. `sha256` is set for LFS files (their content lives in the LFS store)."""

    content: bytes
    sha256: str | None = None

    @property
    def blob_id(self) -> str:
        return git_blob_sha(lfs_pointer(self.sha256, len(self.content)) if self.sha256 else self.content)

    @property
    def etag(self) -> str:
        return self.sha256 or self.blob_id

    def tree_entry(self, path: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.blob_id, "size": len(self.content), "path": path}
        if self.sha256:
            pointer_size = len(lfs_pointer(self.sha256, len(self.content)))
            entry["lfs"] = {"oid": self.sha256, "size": len(self.content), "pointerSize": pointer_size}
        return entry


@dataclass
class Repo:
    """A model repo: branches point at commits, each commit is a full `{path: StoredFile}` snapshot."""

    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, revision: str) -> str | None:
        """Commit sha of a branch name or a (full) commit sha; None if unknown."""
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class HTTPFailure(Exception):
    """An HTTP error answer, with the Hub's `X-Error-Code` when the client maps it to a specific exception."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}  # more JSON fields of the error body


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _front_matter(readme: bytes) -> dict[str, Any] | None:
    """The YAML metadata block of a README (`---` ... `---`), parsed; None if there is none."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme.decode("utf-8", "replace"), re.DOTALL)
    if not match:
        return None
    data = yaml.safe_load(match.group(1))
    if data is not None and not isinstance(data, dict):
        raise ValueError("metadata must be a YAML mapping")
    return data or {}


class HubState:
    """The server's memory: repos, LFS objects, pending upload tickets, users and a request log."""

    def __init__(self, users: dict[str, str], max_requests: int) -> None:
        self.users = dict(users)  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.tickets: dict[str, tuple[str, int]] = {}  # one-time upload ticket -> (sha256, size)
        self.requests: list[tuple[str, str, int, bool]] = []  # (method, path, status, authenticated)
        self.max_requests = max_requests
        self.lock = threading.RLock()
        self._commit_counter = 0

    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, StoredFile], message: str) -> str:
        with self.lock:
            self._commit_counter += 1
            seed = f"{repo.repo_id}\0{parent}\0{self._commit_counter}\0{message}\0" + "\0".join(sorted(files))
            sha = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[sha] = files
            repo.messages[sha] = message
            return sha


class HubRequestHandler(BaseHTTPRequestHandler):
    """Routes one request to a `_route_*` method; answers JSON with the headers huggingface_hub expects."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub; every answer carries a Content-Length
    timeout = 60  # seconds an idle keep-alive connection may stay open (clients pause while loading models)
    server: HubHTTPServer

    # ----------------------------------------------------------------------------------------------------- plumbing
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass  # the request log is `HubState.requests` (no headers, so never a token)

    @property
    def hub(self) -> HubState:
        return self.server.hub

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self._status = 500
        try:
            with self.hub.lock:
                if len(self.hub.requests) >= self.hub.max_requests:
                    # 400 (not 429/5xx) so that the client does not retry against an exhausted budget
                    raise HTTPFailure(400, "request budget of the test server exhausted")
            for pattern, methods, handler in _ROUTES:
                match = pattern.match(url.path)
                if match and method in methods:
                    groups = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                    getattr(self, handler)(method, **groups)
                    break
            else:
                raise HTTPFailure(404, f"no such route: {method} {url.path}")
        except HTTPFailure as failure:
            self._send_error(failure)
        except Exception as error:  # a server bug must fail the request, not hang the client
            self._send_error(HTTPFailure(500, f"test server error: {type(error).__name__}: {error}"))
        finally:
            with self.hub.lock:
                self.hub.requests.append((method, url.path, self._status, self._bearer() is not None))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self._status = status
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

    def _send_error(self, failure: HTTPFailure) -> None:
        # The request body may be unread: close, and say so, or the client would reuse a dead connection.
        headers = {"X-Error-Message": failure.message, "Connection": "close", **failure.headers}
        if failure.code:
            headers["X-Error-Code"] = failure.code
        self._send_json(failure.status, {"error": failure.message, **failure.extra}, headers)

    def _body(self) -> bytes:
        """The request body, plain or chunked, refused above the server's size bound."""
        limit = self.server.max_body_bytes
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024).strip():  # trailers
                        pass
                    return b"".join(chunks)
                total += size
                if total > limit:
                    raise HTTPFailure(413, "request body too large for the test server")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(8)
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            raise HTTPFailure(413, "request body too large for the test server")
        return self.rfile.read(length)

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body() or b"null")
        except json.JSONDecodeError as error:
            raise HTTPFailure(400, f"invalid JSON body: {error}") from None

    # --------------------------------------------------------------------------------------------------------- auth
    def _bearer(self) -> str | None:
        value = self.headers.get("Authorization", "")
        return value[7:] if value.startswith("Bearer ") and len(value) > 7 else None

    def _user(self) -> str | None:
        """The user of the request's token; None if anonymous. An unknown token is a 401, as on the Hub."""
        token = self._bearer()
        if token is None:
            return None
        user = self.hub.users.get(token)
        if user is None:
            raise HTTPFailure(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, ns: str, name: str, *, write: bool = False) -> Repo:
        """The repo, if this request may read it (or write to it). Private or missing repos look alike: 401/404."""
        user = self._user()
        repo = self.hub.repos.get(f"{ns}/{name}")
        if repo is None or (repo.private and user != repo.namespace):
            status = 404 if user else 401
            raise HTTPFailure(status, "Repository not found", code="RepoNotFound")
        if write and user != repo.namespace:
            raise HTTPFailure(403 if user else 401, f"You don't have write access to {repo.repo_id}")
        return repo

    def _snapshot(self, repo: Repo, revision: str) -> tuple[str, dict[str, StoredFile]]:
        sha = repo.resolve(revision)
        if sha is None:
            raise HTTPFailure(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return sha, repo.commits[sha]

    # ---------------------------------------------------------------------------------------------- account & repo
    def _route_whoami(self, method: str) -> None:
        user = self._user()
        if user is None:
            raise HTTPFailure(401, "Unauthorized")
        token_info = {"displayName": "test-token", "role": "write"}
        self._send_json(200, {"type": "user", "name": user, "fullname": user, "orgs": [],
                              "auth": {"type": "access_token", "accessToken": token_info}})

    def _route_create_repo(self, method: str) -> None:
        user = self._user()
        payload = self._json_body() or {}
        if payload.get("type", "model") not in (None, "model"):
            raise HTTPFailure(400, "this test server only hosts model repos")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload.get('name')}"
        if user is None:
            raise HTTPFailure(401, "You must be authenticated to create a repo")
        if namespace != user:
            raise HTTPFailure(403, f"You don't have the rights to create a repo under {namespace}")
        url = f"{self.server.url}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                # the client reads the repo URL from the 409 answer too (create_repo(exist_ok=True))
                raise HTTPFailure(409, "You already created this model repo", extra={"url": url})
            private = payload.get("private") or payload.get("visibility") == "private"
            repo = Repo(repo_id=repo_id, private=bool(private), created_at=_now())
            readme = StoredFile(b"---\n{}\n---\n")
            repo.branches["main"] = self.hub.new_commit(repo, None, {".gitattributes": StoredFile(b""),
                                                                     "README.md": readme}, "initial commit")
            self.hub.repos[repo_id] = repo
        self._send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _route_create_branch(self, method: str, ns: str, name: str, rev: str) -> None:
        repo = self._repo(ns, name, write=True)
        start = (self._json_body() or {}).get("startingPoint") or "main"
        sha, _ = self._snapshot(repo, start)
        with self.hub.lock:
            if rev in repo.branches:
                raise HTTPFailure(409, f"Reference already exists: {rev}")
            repo.branches[rev] = sha
        self._send_json(200, {})

    def _route_validate_yaml(self, method: str) -> None:
        content = (self._json_body() or {}).get("content", "")
        try:
            _front_matter(content.encode())
        except (yaml.YAMLError, ValueError) as error:
            self._send_json(400, {"errors": [{"message": str(error)}], "warnings": []})
            return
        self._send_json(200, {"errors": [], "warnings": []})

    def _route_model_info(self, method: str, ns: str, name: str, rev: str | None = None) -> None:
        repo = self._repo(ns, name)
        sha, files = self._snapshot(repo, rev or "main")
        info: dict[str, Any] = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.namespace,
            "sha": sha,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "createdAt": repo.created_at,
            "lastModified": _now(),
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [
                {"rfilename": path, "size": len(f.content), "blobId": f.blob_id,
                 **({"lfs": {"sha256": f.sha256, "size": len(f.content),
                             "pointerSize": len(lfs_pointer(f.sha256, len(f.content)))}} if f.sha256 else {})}
                for path, f in sorted(files.items())
            ],
        }
        card = _front_matter(files["README.md"].content) if "README.md" in files else None
        if card:
            info["cardData"] = card
            info["tags"] = list(card.get("tags") or [])
            for key in ("pipeline_tag", "library_name"):
                if key in card:
                    info[key] = card[key]
            if "model-index" in card:
                info["model-index"] = card["model-index"]
        if "config.json" in files:
            config = json.loads(files["config.json"].content)
            info["config"] = {k: config[k] for k in ("architectures", "model_type", "auto_map") if k in config}
        self._send_json(200, info)

    # -------------------------------------------------------------------------------------------------- tree & paths
    def _route_tree(self, method: str, ns: str, name: str, rev: str, path: str | None = None) -> None:
        repo = self._repo(ns, name)
        _, files = self._snapshot(repo, rev)
        prefix = f"{path.strip('/')}/" if path else ""
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for file_path, stored in sorted(files.items()):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix) :]
            parts = rest.split("/")
            for depth in range(1, len(parts)):  # the folders on the way to this file
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append(stored.tree_entry(file_path))
        if prefix and not entries and not folders:
            raise HTTPFailure(404, f"{path} does not exist on {rev}", code="EntryNotFound")
        tree_ids = [{"type": "directory", "oid": git_blob_sha(f.encode()), "size": 0, "path": f} for f in folders]
        self._send_json(200, sorted(tree_ids, key=lambda e: e["path"]) + entries)

    def _route_paths_info(self, method: str, ns: str, name: str, rev: str) -> None:
        repo = self._repo(ns, name)
        _, files = self._snapshot(repo, rev)
        form = parse_qs(self._body().decode())
        answer = []
        for wanted in form.get("paths", []):
            wanted = wanted.strip("/")
            if wanted in files:
                answer.append(files[wanted].tree_entry(wanted))
            elif any(p.startswith(wanted + "/") for p in files):
                answer.append({"type": "directory", "oid": git_blob_sha(wanted.encode()), "size": 0, "path": wanted})
        self._send_json(200, answer)

    # ---------------------------------------------------------------------------------------------------- upload
    def _route_preupload(self, method: str, ns: str, name: str, rev: str) -> None:
        repo = self._repo(ns, name, write=True)
        _, existing = self._snapshot(repo, rev)
        answer = []
        for item in (self._json_body() or {}).get("files", []):
            sample = base64.b64decode(item.get("sample", ""))
            lfs = (item["path"].lower().endswith(_LFS_SUFFIXES) or item.get("size", 0) > _REGULAR_MAX_BYTES
                   or b"\0" in sample)
            current = existing.get(item["path"])
            oid = None
            if current is not None:
                oid = current.sha256 if current.sha256 else git_blob_sha(current.content)
            answer.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular",
                           "shouldIgnore": False, "oid": oid})
        self._send_json(200, {"files": answer, "commitOid": repo.resolve(rev)})

    def _route_lfs_batch(self, method: str, ns: str, name: str) -> None:
        repo = self._repo(ns, name, write=True)
        request = self._json_body() or {}
        if request.get("operation") != "upload":
            raise HTTPFailure(400, "this test server only takes LFS uploads")
        objects = []
        for obj in request.get("objects", []):
            oid, size = str(obj["oid"]), int(obj["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.lfs:
                # Like a pre-signed storage URL: the ticket is the credential, no Authorization header is sent.
                ticket = secrets.token_hex(16)
                with self.hub.lock:
                    self.hub.tickets[ticket] = (oid, size)
                answer["actions"] = {
                    "upload": {"href": f"{self.server.url}/lfs-upload/{ticket}", "expires_in": 600},
                    "verify": {"href": f"{self.server.url}/{repo.repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(answer)
        self._send_json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                        {"Content-Type": "application/vnd.git-lfs+json"})

    def _route_lfs_put(self, method: str, ticket: str) -> None:
        with self.hub.lock:
            expected = self.hub.tickets.pop(ticket, None)
        if expected is None:
            raise HTTPFailure(403, "unknown or used upload ticket")
        content = self._body()
        oid, size = expected
        if len(content) != size or hashlib.sha256(content).hexdigest() != oid:
            raise HTTPFailure(400, "uploaded content does not match its sha256 / size")
        with self.hub.lock:
            self.hub.lfs[oid] = content
        self._send(200, b"", {"ETag": f'"{hashlib.md5(content).hexdigest()}"'})

    def _route_lfs_verify(self, method: str, ns: str, name: str) -> None:
        self._repo(ns, name, write=True)
        obj = self._json_body() or {}
        stored = self.hub.lfs.get(str(obj.get("oid")))
        if stored is None or len(stored) != obj.get("size"):
            raise HTTPFailure(404, "object not found or wrong size")
        self._send_json(200, {"oid": obj["oid"], "size": obj["size"]})

    def _route_commit(self, method: str, ns: str, name: str, rev: str) -> None:
        repo = self._repo(ns, name, write=True)
        if self.query.get("create_pr"):
            raise HTTPFailure(400, "pull requests are not implemented by the test server")
        parent, files = self._snapshot(repo, rev)
        if rev not in repo.branches:
            raise HTTPFailure(400, f"can only commit to a branch, not {rev}")
        files = dict(files)
        header: dict[str, Any] = {}
        for line in self._body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value") or {}
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]))
            elif key == "lfsFile":
                content = self.hub.lfs.get(value["oid"])
                if content is None:
                    raise HTTPFailure(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = StoredFile(content, sha256=value["oid"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HTTPFailure(404, "A file with this name doesn't exist", code="EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: f for p, f in files.items() if not p.startswith(folder)}
            else:
                raise HTTPFailure(400, f"unknown commit operation {key!r}")
        if header.get("parentCommit") not in (None, parent):
            raise HTTPFailure(412, "parent commit is not the head of the branch")
        with self.hub.lock:
            if repo.branches[rev] != parent:
                raise HTTPFailure(409, "the branch moved during the commit, retry")
            sha = self.hub.new_commit(repo, parent, files, header.get("summary", ""))
            repo.branches[rev] = sha
        self._send_json(200, {"success": True, "commitOid": sha, "pullRequestUrl": None,
                              "commitUrl": f"{self.server.url}/{repo.repo_id}/commit/{sha}"})

    # -------------------------------------------------------------------------------------------------- download
    def _route_resolve(self, method: str, ns: str, name: str, rev: str, path: str) -> None:
        repo = self._repo(ns, name)
        sha, files = self._snapshot(repo, rev)
        stored = files.get(path)
        if stored is None:
            raise HTTPFailure(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": sha})
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{stored.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        if stored.sha256:  # the Hub's LFS headers: the object's sha256 and real size, not the pointer's
            headers["X-Linked-Etag"] = f'"{stored.sha256}"'
            headers["X-Linked-Size"] = str(len(stored.content))
        body, status = stored.content, 200
        byte_range = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if byte_range and method == "GET":
            start = int(byte_range.group(1))
            end = int(byte_range.group(2)) if byte_range.group(2) else len(body) - 1
            if start >= len(body):
                raise HTTPFailure(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(body)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
            body, status = body[start : end + 1], 206
        self._send(status, body, headers, head=method == "HEAD")


_REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
_ROUTES: list[tuple[re.Pattern[str], tuple[str, ...], str]] = [
    (re.compile(p), m, h)
    for p, m, h in [
        (r"^/api/whoami-v2$", ("GET",), "_route_whoami"),
        (r"^/api/repos/create$", ("POST",), "_route_create_repo"),
        (r"^/api/validate-yaml$", ("POST",), "_route_validate_yaml"),
        (rf"^/api/models/{_REPO}$", ("GET",), "_route_model_info"),
        (rf"^/api/models/{_REPO}/revision/(?P<rev>[^/]+)$", ("GET",), "_route_model_info"),
        (rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$", ("GET",), "_route_tree"),
        (rf"^/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)$", ("POST",), "_route_paths_info"),
        (rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$", ("POST",), "_route_preupload"),
        (rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$", ("POST",), "_route_commit"),
        (rf"^/api/models/{_REPO}/branch/(?P<rev>.+)$", ("POST",), "_route_create_branch"),
        (rf"^/{_REPO}\.git/info/lfs/objects/batch$", ("POST",), "_route_lfs_batch"),
        (rf"^/{_REPO}\.git/info/lfs/objects/verify$", ("POST",), "_route_lfs_verify"),
        (r"^/lfs-upload/(?P<ticket>[0-9a-f]+)$", ("PUT",), "_route_lfs_put"),
        (rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", ("GET", "HEAD"), "_route_resolve"),
    ]
]


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client connection never blocks shutdown
    allow_reuse_address = True

    def __init__(self, hub: HubState, max_body_bytes: int) -> None:
        super().__init__(("127.0.0.1", 0), HubRequestHandler)
        self.hub = hub
        self.max_body_bytes = max_body_bytes
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class HubServer:
    """Context manager running the test server in a background thread; see the module docstring.

    Args:
        users: token -> user name; a user may create and write repos in its own namespace only.
        max_requests: requests answered before every further one gets a 400.
        max_body_bytes: largest request body accepted.
        max_lifetime_s: the server shuts itself down after this many seconds.
    """

    def __init__(
        self,
        users: dict[str, str],
        *,
        max_requests: int = 2000,
        max_body_bytes: int = 256 * 1024 * 1024,
        max_lifetime_s: float = 600.0,
    ) -> None:
        self.state = HubState(users, max_requests)
        self._server = HubHTTPServer(self.state, max_body_bytes)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._timer = threading.Timer(max_lifetime_s, self._server.shutdown)
        self._timer.daemon = True

    @property
    def url(self) -> str:
        return self._server.url

    def __enter__(self) -> HubServer:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._timer.cancel()
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()

    # ---------------------------------------------------------------------------------------------- test helpers
    @property
    def requests(self) -> list[tuple[str, str, int, bool]]:
        """`(method, path, status, authenticated)` of every request answered so far."""
        with self.state.lock:
            return list(self.state.requests)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """`{path: content}` of a repo at a branch or commit (LFS files resolved to their content)."""
        repo = self.state.repos[repo_id]
        return {path: f.content for path, f in repo.commits[repo.resolve(revision)].items()}

    def stored_blobs(self) -> list[bytes]:
        """Every byte string the server holds: all files of all commits of all repos and every LFS object."""
        with self.state.lock:
            blobs = [f.content for r in self.state.repos.values() for c in r.commits.values() for f in c.values()]
            return blobs + list(self.state.lfs.values())
