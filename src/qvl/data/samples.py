"""Sample formats: the official LLaVA-style format and OpenAI-style messages, read into one shape.

Official format (Qwen fine-tuning README)::

    {"image": "a.png" | ["a.png", ...], "video": "v.mp4" | [...],
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

Each ``<image>`` / ``<video>`` tag in a human turn takes the next file of its kind, in order
across turns. Text around a tag is stripped, exactly as the official preprocessing does, so
token sequences match the official recipe.

Messages format (OpenAI / LLaMA-Factory / ms-swift style)::

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": "A cat."}]}

Content may also be a string with ``<image>`` tags drawing from top-level ``images`` /
``videos`` lists. Parsing never raises on bad data: it returns every problem found, each
naming the field and the fix, so ``qvl data check`` can list them all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from qvl.models.tokens import IMAGE_TAG, VIDEO_TAG

ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant",
    "system": "system",
}
_TAG_RE = re.compile(r"(<image>|<video>)")
# Special tokens a user must never write in data: they would corrupt the prompt structure.
_FORBIDDEN_TEXT = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                   "<|video_pad|>", "<|endoftext|>")


@dataclass(frozen=True)
class Media:
    kind: str  # "image" | "video"
    source: object  # resolved path (str), URL/data URL (str), PIL image or frames
    options: dict = field(default_factory=dict, hash=False, compare=False)  # per-item budget overrides

    @property
    def is_file(self) -> bool:
        return isinstance(self.source, str) and not self.source.startswith(("http://", "https://", "data:"))


@dataclass
class Message:
    role: str  # system | user | assistant
    parts: list  # str for text, Media for images/videos

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))

    def media(self, kind: str | None = None) -> list[Media]:
        return [p for p in self.parts if isinstance(p, Media) and (kind is None or p.kind == kind)]


@dataclass
class Problem:
    index: int
    field: str
    what: str
    fix: str
    severity: str = "error"

    def render(self) -> str:
        return f"sample {self.index}: {self.field}: {self.what} -> {self.fix}"


@dataclass
class Sample:
    messages: list[Message]
    index: int = -1
    origin: str = ""  # "name:index" or "file:line", for messages

    def media(self, kind: str | None = None) -> list[Media]:
        return [m for msg in self.messages for m in msg.media(kind)]


def _resolve(path: str, data_path: Path | None) -> str:
    if path.startswith(("http://", "https://", "data:")):
        return path
    if path.startswith("file://"):
        path = path[len("file://"):]
    p = Path(path).expanduser()
    if not p.is_absolute() and data_path is not None:
        p = Path(data_path) / p
    return str(p)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _split_tags(text: str, pools: dict[str, list], used: dict[str, int], where: str, index: int,
                problems: list[Problem], strip: bool, options: dict | None = None) -> list:
    options = options or {}
    parts: list = []
    for piece in _TAG_RE.split(text):
        if piece in (IMAGE_TAG, VIDEO_TAG):
            kind = piece[1:-1]
            pool = pools[kind]
            if used[kind] < len(pool):
                parts.append(Media(kind, pool[used[kind]], dict(options) if kind == "video" else {}))
            used[kind] += 1
        else:
            seg = piece.strip() if strip else piece
            if seg:
                parts.append(seg)
    return parts


def _content_parts(content, data_path, index, where, problems) -> list:
    """Parts of an OpenAI-style content list (or None when not a list)."""
    parts: list = []
    for j, part in enumerate(content):
        f = f"{where}.content[{j}]"
        if isinstance(part, str):
            parts.append(part)
            continue
        if not isinstance(part, dict):
            problems.append(Problem(index, f, f"content part is {type(part).__name__}", "use {'type': 'text', ...}"))
            continue
        kind = part.get("type") or next((k for k in ("text", "image", "video", "image_url", "video_url") if k in part), None)
        if kind == "text":
            parts.append(str(part.get("text", "")))
        elif kind in ("image", "image_url", "video", "video_url"):
            value = part.get(kind) or part.get("image") or part.get("video") or part.get("path") or part.get("url")
            if isinstance(value, dict):
                value = value.get("url")
            options = {k: v for k, v in part.items()
                       if k in ("min_pixels", "max_pixels", "fps", "max_frames", "min_frames", "sample_fps")}
            if kind.startswith("video") and isinstance(value, list) and value:
                parts.append(Media("video", tuple(_resolve(str(f), data_path) for f in value), options))
                continue
            if not isinstance(value, str) or not value:
                problems.append(Problem(index, f, f"{kind} part has no path or url", f"add '{kind}': 'path/to/file'"))
                continue
            parts.append(Media(kind.removesuffix("_url"), _resolve(value, data_path), options))
        else:
            problems.append(Problem(index, f, f"unknown content part type {kind!r}", "use text, image or video"))
    return parts


def parse_sample(raw, index: int = 0, data_path: Path | str | None = None, origin: str = "") -> tuple[Sample | None, list[Problem]]:
    """Read one raw record into a Sample, returning every structural problem found."""
    problems: list[Problem] = []
    data_path = Path(data_path) if data_path not in (None, "") else None
    if not isinstance(raw, dict):
        return None, [Problem(index, "<record>", f"record is {type(raw).__name__}, not an object",
                              "each line/item must be a JSON object with 'conversations' or 'messages'")]
    if isinstance(raw.get("data_path"), str) and raw["data_path"]:
        data_path = Path(raw["data_path"])  # packed files carry each sample's own media root
    if "conversations" in raw:
        turns, role_key, text_key, fmt = raw["conversations"], "from", "value", "conversations"
    elif "messages" in raw:
        turns, role_key, text_key, fmt = raw["messages"], "role", "content", "messages"
    else:
        return None, [Problem(index, "<record>", "no 'conversations' or 'messages' field",
                              "use the official format {'image': ..., 'conversations': [{'from': 'human', 'value': ...}]}")]
    if not isinstance(turns, list) or not turns:
        return None, [Problem(index, fmt, "must be a non-empty list of turns", "add the user and assistant turns")]

    pools = {
        "image": [_resolve(str(p), data_path) for p in _as_list(raw.get("image", raw.get("images")))],
        # a video is a file, or a list of frame files (shot at the sample's "sample_fps")
        "video": [tuple(_resolve(str(f), data_path) for f in p) if isinstance(p, (list, tuple)) else _resolve(str(p), data_path)
                  for p in _as_list(raw.get("video", raw.get("videos")))],
    }
    video_options = {"sample_fps": raw["sample_fps"]} if "sample_fps" in raw else {}
    used = {"image": 0, "video": 0}
    strip = fmt == "conversations"  # the official preprocessing strips text around tags
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        where = f"{fmt}[{i}]"
        if not isinstance(turn, dict):
            problems.append(Problem(index, where, f"turn is {type(turn).__name__}", f"use {{'{role_key}': ..., '{text_key}': ...}}"))
            continue
        raw_role = turn.get(role_key)
        role = ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            problems.append(Problem(index, f"{where}.{role_key}", f"unknown role {raw_role!r}",
                                    "use human/gpt (conversations) or user/assistant/system (messages)"))
            continue
        content = turn.get(text_key)
        if isinstance(content, list):
            parts = _content_parts(content, data_path, index, where, problems)
            expanded = []
            for p in parts:  # strings inside content lists may still carry tags
                expanded.extend(_split_tags(p, pools, used, where, index, problems, strip and role != "assistant", video_options)
                                if isinstance(p, str) else [p])
            parts = expanded
        elif isinstance(content, str):
            if role == "assistant" and _TAG_RE.search(content):
                problems.append(Problem(index, f"{where}.{text_key}", "media tag in an assistant turn",
                                        "move <image>/<video> tags into the human turn"))
                parts = [content]
            else:
                parts = _split_tags(content, pools, used, where, index, problems, strip and role != "assistant",
                                    video_options)
        else:
            problems.append(Problem(index, f"{where}.{text_key}", f"missing or not text ({type(content).__name__})",
                                    "give every turn a text value"))
            continue
        text = "".join(p for p in parts if isinstance(p, str))
        if not text.strip() and not any(isinstance(p, Media) for p in parts):
            problems.append(Problem(index, f"{where}.{text_key}", "empty turn", "remove the turn or give it text"))
        for tok in _FORBIDDEN_TEXT:
            if tok in text:
                problems.append(Problem(index, f"{where}.{text_key}", f"contains the special token {tok}",
                                        "remove chat-template tokens from the data; qvl adds them"))
        if role == "assistant" and any(isinstance(p, Media) for p in parts):
            problems.append(Problem(index, f"{where}.{text_key}", "media in an assistant turn",
                                    "only user turns may hold images or videos"))
        messages.append(Message(role, parts))

    for kind in ("image", "video"):
        tags, files = used[kind], len(pools[kind])
        if fmt == "conversations" or files:
            if tags != files:
                problems.append(Problem(index, kind, f"{tags} <{kind}> tag(s) but {files} file(s)",
                                        f"make the number of <{kind}> tags in human turns equal the number of files"))
    problems.extend(_check_roles(messages, index, fmt))
    if any(p.severity == "error" for p in problems):
        return None, problems
    return Sample(messages, index, origin), problems


def _check_roles(messages: list[Message], index: int, fmt: str) -> list[Problem]:
    problems = []
    body = messages[1:] if messages and messages[0].role == "system" else messages
    if any(m.role == "system" for m in body):
        problems.append(Problem(index, fmt, "system turn after the start", "put the system prompt first"))
    if not body or body[0].role != "user":
        problems.append(Problem(index, fmt, "conversation does not start with a user turn",
                                "start with a human/user turn (after an optional system turn)"))
    for a, b in zip(body, body[1:]):
        if a.role == b.role and a.role in ("user", "assistant"):
            problems.append(Problem(index, fmt, f"two {a.role} turns in a row", "alternate user and assistant turns"))
            break
    if body and body[-1].role != "assistant":
        problems.append(Problem(index, fmt, "last turn is not an assistant reply",
                                "end with a gpt/assistant turn (it is what the model learns)"))
    return problems


def prompt_messages(messages: list[Message]) -> list[dict]:
    """Chat-template messages (content parts) for a list of Messages; media become placeholders."""
    out = []
    for m in messages:
        content = []
        for p in m.parts:
            if isinstance(p, Media):
                content.append({"type": p.kind})
            else:
                content.append({"type": "text", "text": p})
        out.append({"role": m.role, "content": content})
    return out
