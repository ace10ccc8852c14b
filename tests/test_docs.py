"""The docs stay true to the code: the configuration page is the schema, every config file is described,
README stays short and points at every page, and every relative link resolves."""
import re

from distcls import config
from conftest import ROOT


def test_the_configuration_page_is_the_schema_and_every_config_file_is_described():
    page = (ROOT / "docs/configuration.md").read_text()
    assert config.reference_markdown() in page, (
        "docs/configuration.md is out of date: paste distcls.config.reference_markdown() into it"
    )
    recipes = (ROOT / "docs/recipes.md").read_text()
    assert all(f"`{p.name}`" in recipes for p in (ROOT / "configs").glob("*.yaml") if not p.is_symlink())


def test_the_readme_is_short_and_points_at_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert all(f"(docs/{page.name})" in readme for page in (ROOT / "docs").glob("*.md"))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path) -> set:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_every_relative_link_of_the_docs_resolves():
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "slurm/README.md", ROOT / "tests/README.md"]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_quick_start_is_one_bash_block_of_two_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [l for l in block.splitlines() if l.strip() and not l.strip().startswith("#")]
    assert len(commands) == 2
    assert "torchrun --nproc_per_node=2 -m distcls.train" in commands[0] and "pytest" in commands[1]
