"""The configuration contract: names, precedence, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dicom_node.config import ConfigError, load_config, reference_markdown

EXAMPLE = """
[node]
ae_title = "CXRNODE"
host = "0.0.0.0"
port = 11112
storage_dir = "/var/lib/cxrnode"
database_url = "sqlite:////var/lib/cxrnode/cxrnode.db"
max_associations = 16
[security]
allowed_calling_ae_titles = []
allowed_networks = []
tls_certificate = ""
[study]
quiet_period_s = 10
[model]
bundle = "default"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242
send = "signed"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cxrnode.toml"
    p.write_text(text)
    return p


def test_issue_example_loads(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, EXAMPLE), env={})
    assert c.node.port == 11112
    assert c.study.quiet_period_s == 10.0
    assert c.destinations[0].ae_title == "PACS"
    assert c.destinations[0].send == "signed"
    assert c.node.resolved_database_url() == "sqlite:////var/lib/cxrnode/cxrnode.db"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.node.port = 1  # type: ignore[misc]


def test_defaults_without_file() -> None:
    c = load_config(env={})
    assert c.node.ae_title == "CXRNODE"
    assert c.node.resolved_database_url().endswith("/var/lib/cxrnode/cxrnode.db")
    assert c.destinations == ()


def test_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\nport = 2000\nae_title = 'FILE'\n")
    env = {"CXRNODE_NODE_PORT": "3000", "CXRNODE_NODE_AE_TITLE": "ENVAE"}
    c = load_config(path, overrides=["node.port=4000"], env=env)
    assert c.node.port == 4000
    assert c.node.ae_title == "ENVAE"
    c = load_config(path, env=env)
    assert c.node.port == 3000
    c = load_config(path, env={})
    assert c.node.port == 2000


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\nport = 2001\n")
    assert load_config(env={"CXRNODE_CONFIG": str(path)}).node.port == 2001


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[node]\nport = 'eleven'\n", "node.port"),
        ("[node]\nport = 70000\n", "node.port"),
        ("[node]\nprot = 1\n", "node.prot"),
        ("[nodes]\nport = 1\n", "nodes"),
        ("[node]\nae_title = 'THIS_IS_FAR_TOO_LONG'\n", "node.ae_title"),
        ("[security]\nallowed_networks = ['10.0.0.0/33']\n", "security.allowed_networks[0]"),
        ("[security]\ntls_certificate = 'a.pem'\n", "security.tls_certificate"),
        ("[[destinations]]\nname='p'\nae_title='P'\nhost='h'\nport=1\nsend='always'\n", "destinations[0].send"),
        ("[[destinations]]\nname='p'\nae_title='P'\nhost='h'\n[[destinations]]\nname='p'\nae_title='Q'\nhost='h'\n", "destinations[1].name"),
        ("[model]\nproviders = ['CUDA']\n", "model.providers[0]"),
        ("[node]\nfsync = 1\n", "node.fsync"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    assert str(info.value).startswith(key), str(info.value)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[node\n"), env={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", env={})


def test_override_syntax_error() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=["port=1"], env={})


def test_reference_lists_every_key() -> None:
    ref = reference_markdown()
    for key in ("[node] ae_title", "[security] tls_ca", "[study] quiet_period_s", "[[destinations]] send"):
        assert f"`{key}`" in ref


def test_readme_reference_is_current() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert reference_markdown() in readme, "regenerate the README's configuration reference from reference_markdown()"


def test_indication_sources_must_be_dicom_keywords(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^pipeline.indication_sources\[1\]"):
        load_config(write(tmp_path, "[pipeline]\nindication_sources = ['ReasonForStudy', 'Reason']\n"), env={})
