"""Shard urls: expansion and checking, and opening a shard as a byte stream.

A shard url is one of

* a local path (``/data/00001.tar``, ``file:/data/00001.tar``; globs and braces expand, missing files fail);
* ``pipe:<shell command>``: the command's stdout is the tar (``pipe:aws s3 cp s3://b/00001.tar -``);
* ``http://`` / ``https://``: read by webdataset with ``curl -f -s -L`` (retries, fails on HTTP errors);
* ``<scheme>://...`` for a scheme with a command template (:data:`DEFAULT_URL_COMMANDS`: ``s3://`` →
  ``aws s3 cp <url> -``, ``gs://`` → ``gcloud storage cat <url>``), read as ``pipe:<template with {url}>``.
  Templates are overridden or added per scheme by the ``DALLE2_URL_COMMANDS`` environment variable (a JSON
  object, seen by every reader: training, precompute_embeddings, evaluation) and then by the ``url_commands``
  argument (``data.url_commands``); ``{url}`` is replaced by the shell-quoted url.

Any other scheme fails in :func:`expand_urls`, before training, naming the url. A shard whose command exits
non-zero is reported by :func:`close_shard` (the reader counts it as a bad shard; it is never fatal).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import tarfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from braceexpand import braceexpand
from webdataset.gopen import Pipe, gopen

DEFAULT_URL_COMMANDS: dict[str, str] = {"s3": "aws s3 cp {url} -", "gs": "gcloud storage cat {url}"}
URL_COMMANDS_ENV = "DALLE2_URL_COMMANDS"
CURL_SCHEMES = ("http", "https")  # webdataset's own reader (curl)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_OK_STATUS = (0, 141, -13)  # SIGPIPE (141 from a shell, -13 killed): the reader stopped before the end


def resolve_url_commands(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Scheme → shell command template: the defaults, then ``$DALLE2_URL_COMMANDS`` (JSON), then ``overrides``."""
    out = dict(DEFAULT_URL_COMMANDS)
    env = os.environ.get(URL_COMMANDS_ENV)
    if env:
        try:
            extra = json.loads(env)
        except ValueError as exn:
            raise ValueError(f"{URL_COMMANDS_ENV} must be a JSON object {{scheme: command}}: {exn}") from None
        if not isinstance(extra, dict):
            raise ValueError(f"{URL_COMMANDS_ENV} must be a JSON object {{scheme: command}}, got {env!r}")
        out.update(extra)
    out.update(overrides or {})
    for scheme, template in out.items():
        if not isinstance(template, str) or "{url}" not in template:
            raise ValueError(f"url command for {scheme}:// must be a string containing {{url}}, got {template!r}")
    return {str(s).lower(): t for s, t in out.items()}


def url_scheme(url: str) -> str | None:
    """``"pipe"``, the ``<scheme>`` of ``<scheme>://...`` (lower case), or ``None`` for a local path / ``file:``."""
    if url.startswith("pipe:"):
        return "pipe"
    m = _SCHEME.match(url)
    if m is None or m.group(1).lower() == "file":
        return None
    return m.group(1).lower()


def is_remote(url: str) -> bool:
    return url_scheme(url) is not None


def shard_command(url: str, commands: Mapping[str, str]) -> str | None:
    """The ``pipe:`` url that reads ``url`` (object stores: the scheme's template), or ``None`` when webdataset
    opens it as is (local paths, ``pipe:``, http/https). Raises ``ValueError`` on a scheme nothing reads."""
    scheme = url_scheme(url)
    if scheme is None or scheme == "pipe" or scheme in CURL_SCHEMES:
        return None
    if scheme in commands:
        return "pipe:" + commands[scheme].replace("{url}", shlex.quote(url))
    handled = ", ".join(["local paths", "file:", "pipe:<command>", *(f"{s}://" for s in (*CURL_SCHEMES, *commands))])
    raise ValueError(
        f"shard url {url!r}: no reader for {scheme}:// (read: {handled}). Set a command that writes the tar to "
        f'stdout: +data.url_commands.{scheme}="<command> {{url}}" (WebDataModule/make_dataset url_commands=, or '
        f"${URL_COMMANDS_ENV}), or give a pipe:<command> url"
    )


def expand_urls(urls: str | Sequence[str], *, url_commands: Mapping[str, str] | None = None) -> list[str]:
    """Expand shard URLs: braces (``/d/{00000..00099}.tar``), ``::``-separated strings, lists of either.

    Local paths must exist (globs ``*`` are expanded too); ``pipe:``, ``http(s)://`` and schemes with a command
    (``s3://``, ``gs://``, see the module docstring) pass through unchecked. Raises ``FileNotFoundError`` naming
    the pattern and its first missing path, ``ValueError`` naming a url whose scheme nothing reads, and
    ``ValueError`` when nothing is given. ``url_commands`` as in :func:`resolve_url_commands`.
    """
    commands = resolve_url_commands(url_commands)
    if isinstance(urls, (str, os.PathLike)):
        patterns = [p for p in os.fspath(urls).split("::") if p.strip()]
    else:
        patterns = [os.fspath(p) for p in urls]
    if not patterns:
        raise ValueError(f"no shard urls given: {urls!r}")
    out: list[str] = []
    for pattern in patterns:
        pattern = pattern.strip()
        for url in braceexpand(pattern):
            if is_remote(url):
                shard_command(url, commands)  # raises on an unknown scheme
                out.append(url)
                continue
            path = url[len("file:") :] if url.startswith("file:") else url
            if any(c in path for c in "*?["):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise FileNotFoundError(f"shard pattern {pattern!r} matches no file ({path!r})")
                out.extend(matches)
            elif not os.path.isfile(path):
                raise FileNotFoundError(f"shard pattern {pattern!r}: missing shard {path!r}")
            else:
                out.append(path)
    return out


def count_samples(urls: Sequence[str]) -> int:
    """Number of samples in local tar shards (reads only the tar headers); remote urls raise ``ValueError``."""
    total = 0
    for url in urls:
        if is_remote(url):
            raise ValueError(f"cannot count samples of remote shard {url!r}; set epoch_size explicitly")
        keys = set()
        try:
            with tarfile.open(url) as tar:
                for m in tar:
                    if m.isfile() and "." in os.path.basename(m.name):
                        keys.add(m.name.split(".", 1)[0])
        except (tarfile.TarError, OSError) as exn:
            warnings.warn(
                f"while counting samples, shard {url!r} is unreadable ({exn}); counted what was read", stacklevel=2
            )
        total += len(keys)
    return total


def open_shard(url: str, commands: Mapping[str, str]) -> Any:
    """A readable byte stream of the shard at ``url``. A command's exit status is not checked while reading
    (so every complete member is read) but by :func:`close_shard`."""
    stream = gopen(shard_command(url, commands) or url, "rb")
    if isinstance(stream, Pipe):
        stream.ignore_errors = True
    return stream


def close_shard(stream: Any, *, abandon: bool = False) -> str | None:
    """Close a stream from :func:`open_shard`; returns why the shard is bad (a command's non-zero exit status,
    its arguments), else ``None``. ``abandon``: the reader stopped early, so a command is terminated rather than
    waited for, and its status is not checked. Never raises."""
    try:
        if abandon and isinstance(stream, Pipe) and stream.proc.poll() is None:
            stream.proc.terminate()
        stream.close()
        if abandon:
            return None
    except Exception as exn:  # noqa: BLE001 - a close that fails makes the shard bad, never the run
        return f"closing failed: {exn}"
    if isinstance(stream, Pipe):
        status = stream.status
        if status not in _OK_STATUS and status not in stream.ignore_status:
            args = stream.args[0][0] if stream.args and stream.args[0] else stream.args
            return f"command {args!r} exited with status {status}"
    return None
