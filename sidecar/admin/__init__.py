"""AdminService and the status document shared by gRPC, HTTP and the CLI."""

from sidecar.admin._service import (
    AdminHandlers,
    AdminServicer,
    CandidateRegistry,
    LearningControl,
    ReportSource,
    RolloutControl,
    StatusSource,
)
from sidecar.admin._status import status_to_dict

__all__ = [
    "AdminHandlers",
    "AdminServicer",
    "CandidateRegistry",
    "LearningControl",
    "ReportSource",
    "RolloutControl",
    "StatusSource",
    "status_to_dict",
]
