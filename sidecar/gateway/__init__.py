"""``atlas-sidecar gateway``: an OpenAI-compatible proxy that joins the loop with no code.

It stands in front of vLLM, SGLang, LoRAX or llama-server as they ship, and is
one more inference-server replica to the sidecar, built from the client
library's own Router, EventStream and ControlLoop. See docs/gateway.md.
"""

from atlas_sidecar_client.openai import BadFeedback, FeedbackFields, parse_feedback

from sidecar.gateway._backends import Backend, make_backend
from sidecar.gateway._proxy import Gateway
from sidecar.gateway._run import add_gateway_args, run_gateway_command

__all__ = [
    "Backend",
    "BadFeedback",
    "FeedbackFields",
    "Gateway",
    "add_gateway_args",
    "make_backend",
    "parse_feedback",
    "run_gateway_command",
]
