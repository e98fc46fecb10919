"""A real llama-server with LoRA versions: what the gateway will be built on.

Router mode serves a version per ``model`` name (base, two adapters, one added at
run time); single mode loads every adapter at start and picks them per request.
Answers are greedy, so one prompt gives one answer per version.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.testing import LlamaServerError, LlamaServerProcess

PROMPT = "Name a colour."


def test_router_serves_each_version_by_model_name(router: LlamaServerProcess) -> None:
    assert router.models() == {"base": "loaded", "v1": "loaded", "v2": "loaded"}
    answers = {name: router.chat(PROMPT, model=name) for name in ("base", "v1", "v2")}

    assert all(answers.values()), answers
    assert answers["v1"] != answers["v2"], answers
    assert answers["v1"] != answers["base"], answers
    assert answers["v2"] != answers["base"], answers
    # greedy: the same version answers the same again
    assert router.chat(PROMPT, model="v1") == answers["v1"]


def test_router_loads_a_version_added_at_run_time(
    router: LlamaServerProcess, adapters: dict[str, Path]
) -> None:
    router.add_version("v3", adapters["b"])
    assert router.models()["v3"] == "unloaded"

    status, body = router.request(
        "POST", "/v1/chat/completions", router.chat_body(PROMPT, "v3", 16, {})
    )
    assert status == 400
    assert "not loaded" in str(body)

    router.load("v3")
    assert router.models()["v3"] == "loaded"
    # the same adapter file as v2: the same greedy answer
    assert router.chat(PROMPT, model="v3") == router.chat(PROMPT, model="v2")
    router.unload("v3")


def test_router_refuses_an_unknown_model(router: LlamaServerProcess) -> None:
    status, body = router.request(
        "POST", "/v1/chat/completions", router.chat_body(PROMPT, "nope", 16, {})
    )

    assert status == 400
    assert "model 'nope' not found" in str(body)


def test_router_streams_server_sent_events(router: LlamaServerProcess) -> None:
    chunks = router.chat_stream(PROMPT, model="v1")

    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert len(chunks) > 1
    assert text == router.chat(PROMPT, model="v1")


def test_single_mode_picks_adapters_per_request(
    tmp_path: Path, llama_binary: Path, base_model: Path, adapters: dict[str, Path]
) -> None:
    server = LlamaServerProcess.single(
        tmp_path, [adapters["a"], adapters["b"]], model=base_model, binary=llama_binary
    )
    with server:
        status, body = server.request("GET", "/lora-adapters")
        assert status == 200
        assert [Path(a["path"]).name for a in body["data"]] == ["a.gguf", "b.gguf"]

        def answer(scale_a: float, scale_b: float) -> str:
            lora = [{"id": 0, "scale": scale_a}, {"id": 1, "scale": scale_b}]
            return server.chat(PROMPT, lora=lora)

        base, only_a, only_b = answer(0, 0), answer(1, 0), answer(0, 1)

    assert all((base, only_a, only_b))
    assert only_a != only_b
    assert only_a != base


def test_single_mode_cannot_add_a_version(
    tmp_path: Path, llama_binary: Path, base_model: Path
) -> None:
    server = LlamaServerProcess.single(tmp_path, model=base_model, binary=llama_binary)

    with pytest.raises(LlamaServerError, match="single mode"):
        server.add_version("v1", None)
