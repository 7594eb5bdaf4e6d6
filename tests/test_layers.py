"""The folder tree is the layer diagram of docs/architecture.md: no module imports a layer above its own."""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "stasisfs"
# Top to bottom, as docs/architecture.md lists them; a layer may import any layer after it.
LAYERS = ["cli", "jobs", "schedule", "mount", "ops", "backup", "remote", "repo", "system", "format"]
SHARED = {"config", "errors", "progress", "__version__"}
IMPORT = re.compile(r"^\s*from stasisfs(?:\.(\w+))?(?:\.\w+)* import (\w+)", re.MULTILINE)


def layer_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def test_no_module_imports_upwards() -> None:
    upward = []
    for path in PACKAGE.rglob("*.py"):
        source = layer_of(path)
        if source not in LAYERS:
            continue
        for match in IMPORT.finditer(path.read_text()):
            target = match.group(1) or match.group(2)
            if target in SHARED or target == source:
                continue
            if target not in LAYERS or LAYERS.index(target) < LAYERS.index(source):
                upward.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert upward == []


def test_the_architecture_document_lists_every_layer_folder() -> None:
    document = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert folders == sorted(layer for layer in LAYERS if (PACKAGE / layer).is_dir())
    listed = [layer for layer in LAYERS if re.search(rf"^  {layer}(/|\.py)", document, re.MULTILINE)]
    assert listed == LAYERS  # in the same order, top to bottom
