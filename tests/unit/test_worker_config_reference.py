"""README's config.yaml reference is a valid config that spells out every field at its default."""

from __future__ import annotations

from pathlib import Path

import yaml

from worker.config import ModelConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def reference_block() -> str:
    text = README.read_text()
    section = text[text.index("## Model repository") :]
    start = section.index("```yaml\n") + len("```yaml\n")
    return section[start : section.index("```", start)]


def test_the_readme_reference_lists_every_field_at_its_default() -> None:
    documented = yaml.safe_load(reference_block())
    assert set(documented) == set(ModelConfig.model_fields)
    assert ModelConfig.model_validate(documented) == ModelConfig()
