"""What the gateway reads out of OpenAI-style requests and answers.

The prompt (chat messages flattened, or the completion prompt), the answer's
text, finish reason and token log-probabilities, from a whole JSON answer or
from the server-sent events of a streamed one (:class:`StreamAccumulator`,
fed chunks as they pass through; it never changes what the client gets).
Both shapes of log-probabilities are read: chat's
``choices[].logprobs.content[].logprob`` and completions'
``choices[].logprobs.token_logprobs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from atlas_sidecar_client._json import JSONDecodeError, loads

__all__ = ["Answer", "StreamAccumulator", "answer_of", "prompt_of"]

#: Log-probabilities kept per answer (the sidecar's ingest.max_logprobs default is 32768).
MAX_LOGPROBS = 32_768
#: Text kept per answer (the sidecar's ingest.max_text_bytes default is 256 KiB).
MAX_TEXT_CHARS = 64 * 1024


def _content_text(content: Any) -> str:
    """A message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def prompt_of(body: dict[str, Any], chat: bool) -> str:
    """The prompt as the sidecar stores it: chat messages as ``role: content`` lines."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return ""
        lines = []
        for m in messages:
            if isinstance(m, dict):
                lines.append(f"{m.get('role', 'user')}: {_content_text(m.get('content'))}")
        return "\n".join(lines)[:MAX_TEXT_CHARS]
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        prompt = "\n".join(p for p in prompt if isinstance(p, str))
    return prompt[:MAX_TEXT_CHARS] if isinstance(prompt, str) else ""


@dataclass
class Answer:
    text: str = ""
    finish_reason: str = ""
    logprobs: list[float] = field(default_factory=list)
    #: The upstream's own error, when its body said one.
    error: str = ""

    def add_logprobs(self, lp: Any) -> None:
        if not isinstance(lp, dict) or len(self.logprobs) >= MAX_LOGPROBS:
            return
        content = lp.get("content")
        if isinstance(content, list):
            for item in content:
                if isinstance(item, dict) and isinstance(item.get("logprob"), int | float):
                    self.logprobs.append(min(0.0, float(item["logprob"])))
        tokens = lp.get("token_logprobs")
        if isinstance(tokens, list):
            self.logprobs.extend(min(0.0, float(x)) for x in tokens if isinstance(x, int | float))
        del self.logprobs[MAX_LOGPROBS:]

    def add_choice(self, choice: Any, chat: bool, *, delta: bool) -> None:
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            return
        if chat:
            msg = choice.get("delta" if delta else "message")
            piece = _content_text(msg.get("content")) if isinstance(msg, dict) else ""
        else:
            text = choice.get("text")
            piece = text if isinstance(text, str) else ""
        if piece and len(self.text) < MAX_TEXT_CHARS:
            self.text = (self.text + piece)[:MAX_TEXT_CHARS]
        if isinstance(choice.get("finish_reason"), str):
            self.finish_reason = choice["finish_reason"]
        self.add_logprobs(choice.get("logprobs"))


def answer_of(doc: Any, chat: bool) -> Answer:
    """The first choice of a whole (unstreamed) answer."""
    out = Answer()
    if not isinstance(doc, dict):
        return out
    if isinstance(doc.get("error"), dict):
        out.error = str(doc["error"].get("message", ""))[:500]
    choices = doc.get("choices")
    if isinstance(choices, list) and choices:
        out.add_choice(choices[0], chat, delta=False)
    return out


class StreamAccumulator:
    """Reads ``data: {...}`` events out of a streamed answer's bytes as they pass."""

    #: A line longer than this is not an event we can read; it is skipped.
    MAX_LINE = 1 << 20

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.answer = Answer()
        self.done = False
        self.chunks = 0
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self.MAX_LINE:
                    self._buf.clear()
                return
            line = bytes(self._buf[:nl]).rstrip(b"\r")
            del self._buf[: nl + 1]
            self._line(line)

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            doc = loads(payload)
        except JSONDecodeError:
            return
        self.chunks += 1
        if isinstance(doc, dict):
            if isinstance(doc.get("error"), dict):
                self.answer.error = str(doc["error"].get("message", ""))[:500]
            choices = doc.get("choices")
            if isinstance(choices, list):
                for choice in choices:
                    self.answer.add_choice(choice, self.chat, delta=True)
