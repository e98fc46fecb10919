"""Reading OpenAI-style requests and answers, and feedback bodies, for a capture in front of
or inside a model server (the gateway, the vLLM middleware)."""

from atlas_sidecar_client._feedback import (
    MAX_FEEDBACK_BYTES,
    SIGNALS,
    BadFeedback,
    FeedbackFields,
    parse_feedback,
)
from atlas_sidecar_client._openai import Answer, StreamAccumulator, answer_of, prompt_of

__all__ = [
    "MAX_FEEDBACK_BYTES",
    "SIGNALS",
    "Answer",
    "BadFeedback",
    "FeedbackFields",
    "StreamAccumulator",
    "answer_of",
    "parse_feedback",
    "prompt_of",
]
