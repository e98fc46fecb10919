"""Config: precedence, env keys, errors that name the key, the example file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from sidecar.config import SidecarConfig, load_config
from sidecar.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_match_the_design() -> None:
    c = load_config(None, environ={})
    assert c.server.listen == ["127.0.0.1:50051"]
    assert c.server.http_listen == "127.0.0.1:9464"
    assert c.store.data_dir == Path("./var/atlas-sidecar")


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "store:\n  commit_window_ms: 3\n  retention_batch: 500\nserver:\n  grace_seconds: 4\n"
    )
    env = {
        "ATLAS_SIDECAR__STORE__COMMIT_WINDOW_MS": "7",
        "ATLAS_SIDECAR__SERVER__LISTEN": "127.0.0.1:1,unix:/tmp/s",
    }
    c = load_config(f, environ=env, overrides={"server": {"grace_seconds": 9}})
    assert c.store.commit_window_ms == 7  # env beats file
    assert c.store.retention_batch == 500  # file beats default
    assert c.server.grace_seconds == 9  # flags beat file
    assert c.server.listen == ["127.0.0.1:1", "unix:/tmp/s"]


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ("store:\n  colour: blue\n", {}, "store.colour: Extra inputs are not permitted"),
        ("store:\n  commit_window_ms: -1\n", {}, "store.commit_window_ms"),
        ("server:\n  listen: nonsense\n", {}, "server.listen"),
        ("", {"ATLAS_SIDECAR__INGEST__MAX_ATTRIBUTES": "lots"}, "ingest.max_attributes"),
        ("", {"ATLAS_SIDECAR__NOPE": "1"}, "ATLAS_SIDECAR__NOPE: expected"),
        ("- a\n- b\n", {}, "top level must be a mapping"),
        ("store: [\n", {}, "not valid YAML"),
    ],
)
def test_errors_name_the_bad_key(
    tmp_path: Path, text: str, env: dict[str, str], needle: str
) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f, environ=env)
    assert needle in str(err.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml", environ={})


def _missing(model: type[BaseModel], doc: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys of ``model`` (recursively) that ``doc`` does not spell out."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        ann: Any = field.annotation
        if name not in doc:
            out.append(f"{prefix}{name}")
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _missing(ann, doc[name] or {}, f"{prefix}{name}.")
    return out


def test_example_file_documents_every_key_with_its_default() -> None:
    doc = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    assert _missing(SidecarConfig, doc) == []
    example = load_config(ROOT / "config.example.yaml", environ={})
    assert example == load_config(None, environ={})


def test_help_lists_every_command_with_a_line() -> None:
    import argparse

    from sidecar.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    described = {a.dest: a.help for a in sub._choices_actions}
    assert set(sub.choices) == set(described), set(sub.choices) ^ set(described)
    assert all(described.values()), [name for name, h in described.items() if not h]
    text = parser.format_help()
    assert all(name in text for name in sub.choices)
