"""Request fields -> checked values, or an :class:`APIError` carrying OpenAI's error body."""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from typing import Any, Literal

_SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
MAX_SEED = 2**63 - 1


class APIError(ValueError):
    """A request error with OpenAI's error body; a ``ValueError`` for Python callers of ``generate``.  ``headers``:
    extra response headers (``Retry-After`` on 429 / 503)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = int(status), message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_size(size: str | int | None, sizes: Sequence[int]) -> int:
    """``"WxH"`` (square), an int side, or None / ``"auto"`` (the largest) -> a side in ``sizes``; else APIError 400."""
    sizes = [int(s) for s in sizes]
    choices = ", ".join(f"'{s}x{s}'" for s in sizes)
    if size is None or (isinstance(size, str) and size.strip().lower() == "auto"):
        return max(sizes)
    if isinstance(size, bool):
        side = None
    elif isinstance(size, int):
        side = size
    elif isinstance(size, str) and (m := _SIZE_RE.match(size)):
        w, h = int(m.group(1)), int(m.group(2))
        if w != h:
            raise APIError(
                400, f"size {size!r} is not square; this model makes {choices}", param="size", code="invalid_size"
            )
        side = w
    else:
        side = None
    if side is None:
        raise APIError(400, f"size must be 'WxH' (one of {choices}), got {size!r}", param="size", code="invalid_size")
    if side not in sizes:
        raise APIError(
            400,
            f"size {side}x{side} is not supported by this cascade; expected one of {choices}",
            param="size",
            code="invalid_size",
        )
    return side


def check_prompt(prompt: Any, *, max_chars: int = 1000) -> str:
    if not isinstance(prompt, str):
        raise APIError(
            400,
            f"prompt must be a string, got {type(prompt).__name__}",
            param="prompt",
            code="invalid_prompt" if prompt is not None else "missing_required_parameter",
        )
    if not prompt.strip():
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_prompt")
    if len(prompt) > max_chars:
        raise APIError(
            400,
            f"prompt is {len(prompt)} characters long; the maximum is {max_chars}",
            param="prompt",
            code="invalid_prompt",
        )
    return prompt


def check_int(value: Any, *, name: str, lo: int, hi: int, default: int | None = None) -> int | None:
    """An int (JSON number or form string) in ``[lo, hi]``; None -> ``default``."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return default
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise APIError(400, f"{name} must be an integer, got {value!r}", param=name, code="invalid_value") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{name} must be an integer, got {value!r}", param=name, code="invalid_value")
    if not lo <= value <= hi:
        raise APIError(400, f"{name} must be between {lo} and {hi}, got {value}", param=name, code="invalid_value")
    return value


def check_response_format(value: Any) -> Literal["url", "b64_json"]:
    if value is None or value == "":
        return "url"
    if value not in ("url", "b64_json"):
        raise APIError(
            400,
            f"response_format must be 'url' or 'b64_json', got {value!r}",
            param="response_format",
            code="invalid_value",
        )
    return value


def random_seed() -> int:
    return secrets.randbits(31)
