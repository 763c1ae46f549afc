"""The README and docs/: every relative link and #anchor resolves, the README stays short, and it starts with the
two commands that CI runs."""

import re

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, each space a hyphen (code blocks hold none)."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_relative_link_and_anchor_resolves(doc):
    targets = [t for t in LINK.findall(doc.read_text()) if not t.startswith(("http://", "https://", "mailto:"))]
    for target in targets:
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.exists(), f"{doc.name}: {target}: no such file"
        if anchor:
            assert anchor in anchors(file.read_text()), f"{doc.name}: {target}: no such heading"


def test_the_readme_is_short_and_starts_with_the_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 25_000
    first_block = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert commands == ["pip install -r requirements.txt", "python light-weight-vlm.py --demo",
                        "python -m pytest -q tests"]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-2:] == ["python -m pip install -q -r requirements.txt", commands[2]]


HISTORY = re.compile(r"\b(?:issues?\s*#?\s*[0-9]+|rounds?|sessions?)\b", flags=re.I)


def test_the_readme_speaks_of_the_program_not_of_its_history():
    """No issue numbers, rounds or sessions, in any case: the record of how it came to be is docs/experiments.md."""
    assert not [m.group() for m in HISTORY.finditer((ROOT / "README.md").read_text())]


def test_the_history_check_is_case_insensitive_and_word_bounded():
    assert [m.group() for m in HISTORY.finditer("Issue 31, Rounds of probes; a Session. Issue #7")] == [
        "Issue 31", "Rounds", "Session", "Issue #7"]
    assert not HISTORY.findall("around the background, an issue of sessionless runs, rounded values")
