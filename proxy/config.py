"""The configuration file of `pgseal serve --config FILE` and the key commands.

A file looks like this::

    keyrings:
      default: ["sodium:/etc/pgseal/keys"]
      critical: ["aws-kms:alias/pgseal", "sodium:/etc/pgseal/keys"]
    audit_file: /var/log/pgseal/audit.jsonl

`keyrings` names keyring sets. Each set is a list of keyring specs, as for
`--keyring`. A rule column picks its set with `keyring: NAME`, and columns
without one use `default`, which every file must define. Every data key of
a column is created through every keyring of its set, and unwrapped by the
first keyring of the set that succeeds. `audit_file` is optional and has the
meaning of `--audit-log`.

Validation is strict, as for rule files: an unknown key, a wrong type, an
empty set or a repeated name is an error that names the file and the line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml  # type: ignore[import-untyped]
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode  # type: ignore[import-untyped]

from proxy.errors import ConfigError

__all__ = [
    "DEFAULT_SET",
    "KeyringOptions",
    "PgsealConfig",
    "keyring_options",
    "load_config",
]

DEFAULT_SET = "default"
"""The keyring set of columns whose rule names none."""

_TOP_KEYS = ("audit_file", "keyrings")
_SET_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_SCHEMES = ("sodium:", "aws-kms:", "vault-transit:")


@dataclass(frozen=True)
class PgsealConfig:
    """A loaded configuration file."""

    path: Path
    keyring_sets: Mapping[str, tuple[str, ...]]
    """Keyring specs per set name, in the order given. Always contains `default`."""
    audit_file: Path | None = None

    @property
    def default_set(self) -> tuple[str, ...]:
        return self.keyring_sets[DEFAULT_SET]

    def named_sets(self) -> dict[str, tuple[str, ...]]:
        """Return the sets other than `default`."""
        return {n: s for n, s in self.keyring_sets.items() if n != DEFAULT_SET}

    def all_specs(self) -> tuple[str, ...]:
        """Return every distinct spec, in the order of first mention."""
        return tuple(
            dict.fromkeys(spec for specs in self.keyring_sets.values() for spec in specs)
        )


def load_config(path: Path) -> PgsealConfig:
    """Read and validate a configuration file. Raises ConfigError."""
    path = Path(path)
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: invalid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read: {exc}") from exc
    if root is None:
        raise ConfigError(f"config file {path} is empty; it needs 'keyrings'")
    top = _mapping(path, root, "the document", _TOP_KEYS)
    if "keyrings" not in top:
        raise ConfigError(f"{_where(path, root)}: missing key 'keyrings'")
    sets = _keyring_sets(path, top["keyrings"][1])
    audit_file = None
    if "audit_file" in top:
        audit_file = Path(_scalar(path, top["audit_file"][1], "audit_file"))
    return PgsealConfig(path, sets, audit_file)


def _keyring_sets(path: Path, node: Node) -> dict[str, tuple[str, ...]]:
    mapping = _mapping(path, node, "'keyrings'", None)
    sets: dict[str, tuple[str, ...]] = {}
    for name, (key_node, value_node) in mapping.items():
        if not _SET_NAME.fullmatch(name):
            raise ConfigError(
                f"{_where(path, key_node)}: invalid keyring set name {name!r}; "
                "use a letter followed by letters, digits, '_' or '-'"
            )
        sets[name] = _specs(path, name, value_node)
    if DEFAULT_SET not in sets:
        raise ConfigError(
            f"{_where(path, node)}: 'keyrings' has no set named '{DEFAULT_SET}', "
            "which columns without a 'keyring' in their rule use"
        )
    return sets


def _specs(path: Path, name: str, node: Node) -> tuple[str, ...]:
    if not isinstance(node, SequenceNode):
        raise ConfigError(
            f"{_where(path, node)}: keyring set {name!r} must be a list of "
            "keyring specs"
        )
    if not node.value:
        raise ConfigError(f"{_where(path, node)}: keyring set {name!r} is empty")
    specs: list[str] = []
    for item in node.value:
        spec = _scalar(path, item, f"keyring set {name!r}")
        if not spec.startswith(_SCHEMES) or spec.endswith(":"):
            raise ConfigError(
                f"{_where(path, item)}: invalid keyring spec {spec!r} in set "
                f"{name!r}; expected sodium:KEYDIR, aws-kms:KEY or "
                "vault-transit:KEY_NAME"
            )
        if spec in specs:
            raise ConfigError(
                f"{_where(path, item)}: keyring set {name!r} lists {spec!r} twice"
            )
        specs.append(spec)
    return tuple(specs)


def _where(path: Path, node: Node) -> str:
    return f"config file {path} line {node.start_mark.line + 1}"


def _mapping(
    path: Path, node: Node, what: str, allowed: tuple[str, ...] | None
) -> dict[str, tuple[Node, Node]]:
    """Return the entries of a mapping node by key; reject unknown and repeated keys."""
    if not isinstance(node, MappingNode):
        raise ConfigError(f"{_where(path, node)}: {what} must be a mapping")
    result: dict[str, tuple[Node, Node]] = {}
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, ScalarNode) else None
        if not isinstance(key, str) or (allowed is not None and key not in allowed):
            expected = ", ".join(allowed) if allowed else "a name"
            raise ConfigError(
                f"{_where(path, key_node)}: unknown key {key!r} in {what}; "
                f"expected {expected}"
            )
        if key in result:
            raise ConfigError(
                f"{_where(path, key_node)}: key {key!r} appears twice in {what}"
            )
        result[key] = (key_node, value_node)
    return result


def _scalar(path: Path, node: Node, what: str) -> str:
    if not isinstance(node, ScalarNode) or not node.value:
        raise ConfigError(f"{_where(path, node)}: {what} must be a non-empty string")
    return str(node.value)


@dataclass(frozen=True)
class KeyringOptions:
    """The keyring sets and audit file of a command, from its options or --config."""

    default: tuple[str, ...]
    named: Mapping[str, tuple[str, ...]]
    """Sets other than `default`; empty without a config file."""
    audit_file: Path | None = None


def keyring_options(
    keyrings: list[str] | None, config: Path | None, audit_log: Path | None
) -> KeyringOptions:
    """Combine --keyring, --config and --audit-log into one set of choices.

    --keyring defines the default set when no config file is given. Giving
    both is rejected rather than merged, because a merged set would wrap new
    data keys under keyrings that the config file does not name.
    """
    if config is None:
        if not keyrings:
            raise ConfigError("give --keyring SPEC (repeatable) or --config FILE")
        return KeyringOptions(tuple(keyrings), {}, audit_log)
    if keyrings:
        raise ConfigError(
            f"--keyring and --config {config} were both given; the config file "
            "defines the keyring sets, so give one or the other"
        )
    loaded = load_config(config)
    if audit_log is not None and loaded.audit_file is not None:
        raise ConfigError(
            f"--audit-log and audit_file in config file {config} were both given; "
            "give one or the other"
        )
    return KeyringOptions(
        loaded.default_set, loaded.named_sets(), audit_log or loaded.audit_file
    )
