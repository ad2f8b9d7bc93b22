"""The table catalog and the stage registry (Spark-free): one home for names, schemas and wiring."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from jobs.stages import ALL_STAGES, PIPELINE, tables_markdown
from lib.platform import catalog as C

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_list_is_the_catalog():
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"<!-- tables:[^\n]*-->\n(.*?)\n<!-- /tables -->", readme, re.S)
    assert block, "README.md lacks the generated table list"
    assert block.group(1).strip() == tables_markdown(), "README table list is stale: run python -m jobs.stages"


def test_every_table_is_written_by_a_registered_stage_and_names_are_unique():
    names = [table.name for table in C.ALL_TABLES]
    assert len(names) == len(set(names))
    written = ({table.name for stage in ALL_STAGES for table in (*stage.writes, *stage.keeps)}
               | {t.name for t in C.BOOKKEEPING})
    assert written == set(names)
    for table in C.ALL_TABLES:
        assert set(table.partition_by) <= set(table.columns), table.name
        assert table.description


def test_pipeline_stages_read_only_what_earlier_stages_write():
    written: set[str] = set()
    for stage in PIPELINE:
        assert {table.name for table in stage.reads} <= written, f"{stage.name} reads a table written later"
        written |= {table.name for table in stage.writes}


TABLE_METHODS = {"read", "require", "exists", "overwrite", "append", "insert_new", "location", "sql_name"}


def _table_literals(path: Path, names: set[str]) -> set[str]:
    """Table names passed as string literals to a Tables method (instead of a lib.platform.catalog spec)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in TABLE_METHODS:
            found |= {arg.value for arg in node.args
                      if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value in names}
    return found


def test_no_table_name_literal_outside_the_catalog():
    names = {table.name for table in C.ALL_TABLES}
    for path in sorted((REPO_ROOT / "jobs").glob("*.py")) + sorted((REPO_ROOT / "lib").rglob("*.py")):
        found = _table_literals(path, names)
        assert not found, f"{path.relative_to(REPO_ROOT)} names table(s) {found} as literals; use lib.platform.catalog"


def test_each_table_leads_to_its_job_and_lib_package():
    """The README's table list names each table's stage and package: the job must call that package,
    and every lib package says in its docstring what it owns."""
    for stage in ALL_STAGES:
        assert callable(stage.run), stage.name  # the job module imports (its lib names exist)
        source = (REPO_ROOT / "jobs" / f"{stage.name}.py").read_text()
        assert f"from {stage.package}" in source, f"jobs/{stage.name}.py does not use {stage.package}"
    packages = sorted(path.parent for path in (REPO_ROOT / "lib").glob("*/__init__.py"))
    assert {f"lib.{path.name}" for path in packages} >= {stage.package for stage in ALL_STAGES}
    for package in packages:
        docstring = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert docstring and len(docstring) > 40, f"lib/{package.name}/__init__.py says nothing of what it owns"
    assert [path.name for path in (REPO_ROOT / "lib").glob("*.py")] == ["__init__.py"], "lib/ holds packages only"


def test_no_job_imports_another_job():
    helpers = {"common", "stages", "entrypoints", "__init__"}
    for path in sorted((REPO_ROOT / "jobs").glob("*.py")):
        if path.stem in helpers or path.stem == "run_pipeline":
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= ({f"{node.module}.{a.name}" for a in node.names} if node.module == "jobs" else {node.module})
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        jobs = {name.split(".")[1] for name in imported if name.startswith("jobs.")} - helpers
        assert not jobs, f"jobs/{path.name} imports job(s) {jobs}"
    for path in sorted((REPO_ROOT / "lib").rglob("*.py")):
        assert "from jobs" not in path.read_text() and "import jobs" not in path.read_text(), path
