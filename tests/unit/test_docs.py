"""The manual: the MkDocs site builds with no broken link, the README's links resolve, no page names a missing file,
and the configuration page is the one ``docs/gen_settings.py`` generates from ``Settings``."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# [text](target) outside code; images too. Targets with a scheme or a bare anchor are handled apart.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"`[^`\n]+`")
# A repository path written in a code span or in italics: a known top-level folder, then a file with an extension.
REPO_PATH = re.compile(r"\b((?:orchestrator|workers|scripts|tests|examples|deploy|docs)/[\w./-]*\w\.[a-z]{2,4})\b")


def _gen_settings() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_settings", DOCS / "gen_settings.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _slug(heading: str) -> str:
    # Python-Markdown's toc slugify (what MkDocs uses), which GitHub's anchors match for plain headings.
    from markdown.extensions.toc import slugify  # type: ignore[import-untyped]

    return str(slugify(heading, "-"))


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    headings = re.findall(r"^#+\s+(.+?)\s*$", text, re.MULTILINE)
    return {_slug(re.sub(r"[`*]", "", heading)) for heading in headings}


def _links(page: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    return LINK.findall(text)


def _broken_relative_links(page: Path) -> list[str]:
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # http:, https:, mailto:
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            broken.append(f"{target} (no file {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading for #{anchor} in {resolved.relative_to(ROOT)})")
    return broken


def test_the_docs_site_builds_in_strict_mode_with_no_broken_link(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        if IN_CI:
            pytest.fail("mkdocs is not installed (CI=true: the docs must build); pip install -e '.[dev]'")
        pytest.skip("mkdocs is not installed; pip install -e '.[dev]'")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml")]
    command += ["--site-dir", str(tmp_path / "site")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=50, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "configuration" / "index.html").exists()


def test_every_relative_link_in_the_readme_reaches_a_file_and_heading() -> None:
    links = _links(ROOT / "README.md")
    assert any(link.startswith("docs/") for link in links), "the README should link into docs/"
    assert _broken_relative_links(ROOT / "README.md") == []


def test_every_relative_link_in_the_docs_reaches_a_file_and_heading() -> None:
    broken = {page.name: found for page in PAGES if (found := _broken_relative_links(page))}
    assert broken == {}


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=lambda page: page.name)
def test_every_repository_file_a_page_names_exists(page: Path) -> None:
    named = set(REPO_PATH.findall(page.read_text(encoding="utf-8")))
    assert sorted(path for path in named if not (ROOT / path).exists()) == []


def test_the_readme_stays_a_front_door_under_twelve_thousand_characters() -> None:
    assert len((ROOT / "README.md").read_text(encoding="utf-8")) <= 12_000


def test_the_readme_keeps_the_two_commands_that_ci_and_newcomers_run() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/orchestrator demo" in readme
    assert "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_configuration_page_matches_the_settings_class() -> None:
    generator = _gen_settings()
    expected = generator.render()
    assert (DOCS / "configuration.md").read_text(encoding="utf-8") == expected, (
        "docs/configuration.md is stale: run .venv/bin/python docs/gen_settings.py"
    )


def test_the_configuration_page_lists_every_variable_settings_reads() -> None:
    from orchestrator.infra.settings import Settings

    asked: list[str] = []

    class Recording(dict[str, str]):
        def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
            asked.append(key)
            return super().get(key, default)

    Settings.from_env(Recording())
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert asked, "Settings.from_env read no variable through the mapping it was given"
    assert [name for name in dict.fromkeys(asked) if f"| `{name}` |" not in page] == []
