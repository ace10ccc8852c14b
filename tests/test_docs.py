"""README stays true to the code: every config key and every config file is documented."""
from distcls import config
from conftest import ROOT


def test_readme_documents_every_config_key_and_config_file():
    readme = (ROOT / "README.md").read_text()
    missing = [key for key, _, _ in config.describe() if f"`{key}`" not in readme]
    assert not missing, f"README's config reference lacks {missing}"
    configs = [p.name for p in (ROOT / "configs").glob("*.yaml")]
    assert all(f"`{name}`" in readme for name in configs)


def test_quick_start_is_one_bash_block_of_two_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [l for l in block.splitlines() if l.strip() and not l.strip().startswith("#")]
    assert len(commands) == 2
    assert "torchrun --nproc_per_node=2 -m distcls.train" in commands[0] and "pytest" in commands[1]
