"""What a newcomer reads matches what the code does: the README's settings table and
`.env.example` name every setting the service reads, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import AliasChoices
from pydantic.fields import FieldInfo

from elaoms.config import Settings

from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"


def readme_settings() -> set[str]:
    """Variables named in the first column of the README's 'Environment variables' table."""
    section = README.read_text().split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first_column = line.split("|")[1]
            names |= set(re.findall(r"`([A-Z][A-Z0-9_]*)`", first_column))
    return names


def settings_by_variable() -> dict[str, FieldInfo]:
    """Each setting under the environment variable it is read from (its first alias, if any)."""
    variables = {}
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            name = str(alias.choices[0])
        variables[name.upper()] = field
    return variables


def setting_names() -> set[str]:
    return set(settings_by_variable())


def test_the_readme_settings_table_names_every_setting_and_only_those() -> None:
    documented, read = readme_settings(), setting_names()
    missing, unknown = sorted(read - documented), sorted(documented - read)
    fields = settings_by_variable()
    rows = "\n".join(
        f"| `{name}` | `{fields[name].default}` | {fields[name].description or '...'} |"
        for name in missing
    )
    assert not missing, f"add these rows to the README's settings table:\n{rows}"
    assert not unknown, f"the README documents settings the code does not read: {unknown}"


def test_every_variable_in_env_example_is_a_setting() -> None:
    text = (REPO_ROOT / ".env.example").read_text()
    named = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE))
    assert named, "no variable found in .env.example"
    assert named <= setting_names(), f"not settings: {sorted(named - setting_names())}"


# A relative path that climbs out of its folder ("../<folder>/..."): fine inside the
# repository (a doc linking ../docs/), wrong when it leaves the clone.
CLIMBING = re.compile(r"(?:\.\./)+[A-Za-z_-]+/")


def leaves_the_clone(path: Path, text: str) -> bool:
    return any(
        not (path.parent / found.group(0)).resolve().is_relative_to(REPO_ROOT)
        for found in CLIMBING.finditer(text)
    )


def test_the_readme_has_no_internal_references() -> None:
    """Read by people outside the team: no issue numbers, sibling folders or machine paths."""
    text = README.read_text()
    machine_path = re.escape(str(REPO_ROOT.parent) + "/")
    for pattern in (r"\bissue \d+", r"\.\./[A-Za-z_-]+/", machine_path, r"\bseed\b"):
        assert not re.search(pattern, text, flags=re.IGNORECASE), pattern


def test_nothing_in_the_repository_reads_a_folder_beside_it() -> None:
    """A clone stands alone: tests, benchmarks and tools read nothing from a folder beside
    it (example payloads are in tests/fixtures/, the recall data comes from a path)."""
    offenders = []
    for path in REPO_ROOT.rglob("*"):
        if path == Path(__file__).resolve() or any(
            part in {".git", ".venv", "__pycache__", ".mypy_cache"} for part in path.parts
        ):
            continue
        readable = path.suffix in {".py", ".md", ".toml", ".yaml", ".sh"} or path.name == "Makefile"
        if readable and leaves_the_clone(path, path.read_text(errors="replace")):
            offenders.append(str(path.relative_to(REPO_ROOT)))
    assert offenders == []
