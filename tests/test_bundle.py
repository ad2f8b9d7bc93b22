"""The Databricks Asset Bundle: its job is valid for the Jobs API, runs every stage in order from
console scripts the wheel really declares, passes parameters the jobs accept, on a valid schedule."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tomllib
import zipfile
import zoneinfo
from pathlib import Path
from typing import Any

import pytest
import yaml
from databricks.sdk.service import jobs as dbjobs

from jobs import entrypoints
from jobs.common import load_settings, parse_args, tables_of
from jobs.stages import ALL_STAGES, PIPELINE
from lib.platform import catalog as C

REPO_ROOT = Path(__file__).resolve().parents[1]
JOB_KEY = "email_personalization"
SAMPLE_RUN_ID = "987654321"


def load_bundle() -> dict[str, Any]:
    """databricks.yml with its included resource files merged and ``${var.*}`` set to the defaults."""
    bundle = yaml.safe_load((REPO_ROOT / "databricks.yml").read_text())
    resources: dict[str, dict] = {}
    for pattern in bundle.get("include", []):
        for path in sorted(REPO_ROOT.glob(pattern)):
            for kind, items in yaml.safe_load(path.read_text()).get("resources", {}).items():
                resources.setdefault(kind, {}).update(items)
    bundle["resources"] = resources
    defaults = {name: spec.get("default") for name, spec in bundle.get("variables", {}).items()}

    def substitute(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: substitute(value) for key, value in node.items()}
        if isinstance(node, list):
            return [substitute(value) for value in node]
        if isinstance(node, str):
            whole = re.fullmatch(r"\$\{var\.(\w+)\}", node)
            if whole:  # keeps the variable's type, e.g. num_workers stays an int
                return defaults[whole.group(1)]
            return re.sub(r"\$\{var\.(\w+)\}", lambda m: str(defaults[m.group(1)]), node)
        return node

    return substitute(bundle)


@pytest.fixture(scope="module")
def bundle() -> dict[str, Any]:
    return load_bundle()


@pytest.fixture(scope="module")
def job(bundle) -> dbjobs.JobSettings:
    return dbjobs.JobSettings.from_dict(bundle["resources"]["jobs"][JOB_KEY])


def unknown_keys(given: Any, parsed: Any, where: str = "") -> list[str]:
    """Keys of the YAML that the SDK's model dropped (from_dict ignores what it does not know)."""
    if isinstance(given, dict) and isinstance(parsed, dict):
        found = [f"{where}.{key}" for key in given if key not in parsed]
        for key in given.keys() & parsed.keys():
            found += unknown_keys(given[key], parsed[key], f"{where}.{key}")
        return found
    if isinstance(given, list) and isinstance(parsed, list):
        return [k for i, (g, p) in enumerate(zip(given, parsed)) for k in unknown_keys(g, p, f"{where}[{i}]")]
    return []


def project_scripts() -> dict[str, str]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def resolved_parameters(job: dbjobs.JobSettings, task: dbjobs.Task) -> list[str]:
    """The task's parameters as a run sees them: job parameter defaults and the run id filled in."""
    values = {f"job.parameters.{p.name}": p.default for p in job.parameters or []}
    values["job.run_id"] = SAMPLE_RUN_ID

    def fill(text: str) -> str:
        return re.sub(r"\{\{\s*([\w.]+)\s*\}\}", lambda m: values[m.group(1)], text)

    return [fill(parameter) for parameter in task.python_wheel_task.parameters]


# ---------------------------------------------------------------- Quartz cron, as Databricks reads it

_MONTHS = "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split()
_DAYS = "SUN MON TUE WED THU FRI SAT".split()


def _quartz_value(text: str, low: int, high: int, names: list[str]) -> bool:
    if text.upper() in names:
        return True
    return text.isdigit() and low <= int(text) <= high


def _quartz_field(field: str, low: int, high: int, names: list[str] = (), special: str = "") -> bool:
    for item in field.split(","):
        if special == "dom" and re.fullmatch(r"L(-\d{1,2})?|LW|\d{1,2}W", item):
            if not re.search(r"\d", item) or 1 <= int(re.search(r"\d+", item).group()) <= 31:
                continue
            return False
        if special == "dow" and re.fullmatch(r"[1-7]L|[1-7]#[1-5]|L", item):
            continue
        base, _, step = item.partition("/")
        if step and not (step.isdigit() and int(step) >= 1):
            return False
        if base == "*":
            continue
        start, _, end = base.partition("-")
        if not _quartz_value(start, low, high, names) or (end and not _quartz_value(end, low, high, names)):
            return False
    return True


def is_valid_quartz_cron(expression: str) -> bool:
    """Quartz syntax: seconds minutes hours day-of-month month day-of-week [year]; exactly one of
    day-of-month and day-of-week is '?'."""
    fields = expression.split()
    if len(fields) not in (6, 7):
        return False
    seconds, minutes, hours, dom, month, dow = fields[:6]
    if (dom == "?") == (dow == "?"):
        return False
    return (_quartz_field(seconds, 0, 59) and _quartz_field(minutes, 0, 59) and _quartz_field(hours, 0, 23)
            and (dom == "?" or _quartz_field(dom, 1, 31, special="dom"))
            and _quartz_field(month, 1, 12, _MONTHS)
            and (dow == "?" or _quartz_field(dow, 1, 7, _DAYS, special="dow"))
            and (len(fields) == 6 or _quartz_field(fields[6], 1970, 2099)))


@pytest.mark.parametrize("expression, valid", [
    ("0 0 5 * * ?", True),
    ("0 30 6 ? * MON-FRI", True),
    ("0 0/15 * * * ?", True),
    ("0 0 2 L * ?", True),
    ("0 0 2 ? * 6#3 2027", True),
    ("0 5 * * *", False),          # Unix cron: five fields
    ("0 0 24 * * ?", False),       # no hour 24
    ("0 0 5 * * MON", False),      # neither day field is '?'
    ("0 0 5 ? * ?", False),        # both are
    ("0 61 5 * * ?", False),
    ("0 0 5 * FOO ?", False),
])
def test_quartz_cron_check(expression, valid):
    assert is_valid_quartz_cron(expression) is valid


# ---------------------------------------------------------------- the job

def test_job_is_valid_for_the_jobs_api(bundle, job):
    spec = bundle["resources"]["jobs"][JOB_KEY]
    assert unknown_keys(spec, job.as_dict()) == []
    leftovers = re.findall(r"\$\{[^}]+\}", yaml.safe_dump(spec))
    assert leftovers == [], f"unresolved bundle references: {leftovers}"
    assert job.max_concurrent_runs == 1
    clusters = {cluster.job_cluster_key for cluster in job.job_clusters}
    assert all(task.job_cluster_key in clusters for task in job.tasks)


def test_schedule_is_a_valid_quartz_cron(job):
    assert job.schedule.pause_status == dbjobs.PauseStatus.UNPAUSED
    assert is_valid_quartz_cron(job.schedule.quartz_cron_expression), job.schedule.quartz_cron_expression
    assert job.schedule.timezone_id in zoneinfo.available_timezones()


def test_task_graph_is_the_stage_registry(job):
    """One task per pipeline stage, each downstream of every stage that writes a table it reads."""
    tasks = {task.task_key: task for task in job.tasks}
    assert set(tasks) == {stage.name for stage in PIPELINE}, "bundle tasks and jobs/stages.PIPELINE differ"
    upstream = {key: {dep.task_key for dep in task.depends_on or []} for key, task in tasks.items()}
    assert all(deps <= tasks.keys() for deps in upstream.values())

    order: list[str] = []  # a topological order; fails on a cycle
    while len(order) < len(tasks):
        ready = sorted(key for key in tasks if key not in order and upstream[key] <= set(order))
        assert ready, f"cycle among {set(tasks) - set(order)}"
        order += ready

    def ancestors(key: str) -> set[str]:
        return upstream[key].union(*(ancestors(dep) for dep in upstream[key]))

    writers = {table.name: stage.name for stage in PIPELINE for table in stage.writes}
    for stage in PIPELINE:
        producers = {writers[table.name] for table in stage.reads if table.name in writers} - {stage.name}
        assert producers <= ancestors(stage.name), f"{stage.name} reads tables of {producers - ancestors(stage.name)}"


def test_console_scripts_are_the_stage_registry():
    scripts = project_scripts()
    expected = {stage.console_script: f"jobs.entrypoints:{stage.name}" for stage in ALL_STAGES}
    expected["email-personalization-pipeline"] = "jobs.entrypoints:pipeline"
    assert scripts == expected


def test_tasks_run_declared_console_scripts_of_their_stage(job, monkeypatch):
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    scripts = project_scripts()
    for task in job.tasks:
        wheel_task = task.python_wheel_task
        assert wheel_task is not None, task.task_key
        assert wheel_task.package_name == re.sub(r"[-.]+", "_", project["name"])
        assert wheel_task.entry_point in scripts, f"{task.task_key}: {wheel_task.entry_point} not in [project.scripts]"
        module, function = scripts[wheel_task.entry_point].split(":")
        assert module == "jobs.entrypoints"
        calls = []
        monkeypatch.setattr(entrypoints, "main_for", calls.append)
        getattr(entrypoints, function)()
        assert calls == [task.task_key]
        assert callable(importlib.import_module(f"jobs.{task.task_key}").run)
        assert [library.whl for library in task.libraries] == ["../dist/*.whl"]


def test_task_parameters_load_the_databricks_config_in_catalog_mode(bundle, job):
    variables = {name: spec["default"] for name, spec in bundle["variables"].items()}
    for task in job.tasks:
        parameters = resolved_parameters(job, task)
        args = parse_args("bundle", parameters)
        assert args.run_id == SAMPLE_RUN_ID
        settings = load_settings(args.conf, args.sets)  # unknown keys, wrong types, bad values raise here
        assert settings.output.root == ""
        assert tables_of(settings.output).location(C.EVENTS) == f"{variables['catalog']}.{variables['schema']}.events"
        assert settings.input.events == variables["events_table"]
        assert settings.recommend.model_dir == variables["model_dir"]


# ---------------------------------------------------------------- the wheel the tasks install

def test_the_wheel_carries_the_entry_points_and_the_config(bundle, job, tmp_path):
    """Build the wheel as the bundle's artifact does, install it apart from the repository and load
    the Databricks configuration through the installed package."""
    build = bundle["artifacts"]["python_wheel"]["build"].split()
    assert build[:3] == ["python", "-m", "pip"] and "--wheel-dir" in build
    out = tmp_path / "dist"
    build[build.index("--wheel-dir") + 1] = str(out)
    subprocess.run([sys.executable, *build[1:], "--quiet"], cwd=REPO_ROOT, check=True, timeout=300)
    (wheel,) = out.glob("*.whl")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert {"conf/base.toml", "conf/databricks.toml", "conf/sources/retailrocket.toml", "jobs/entrypoints.py",
            "jobs/stages.py", "lib/platform/storage.py", "lib/nmf/fit.py"} <= names
    for task in job.tasks:
        assert re.search(rf"^{re.escape(task.python_wheel_task.entry_point)} = ", entry_points, re.M)
    requirements = re.findall(r"^Requires-Dist: (.*)$", metadata, re.M)
    unconditional = [r for r in requirements if "extra ==" not in r]
    assert not [r for r in unconditional if re.match(r"(pyspark|delta-spark)\b", r)], unconditional

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, timeout=300)
    site_packages = next(Path(sys.prefix).glob("lib/python3*/site-packages"))
    probe = (
        "import jobs.common as c; from lib.platform import catalog; from importlib.metadata import entry_points; "
        "settings = c.load_settings(['conf/databricks.toml'], []); "
        "print(c.__file__); print(c.tables_of(settings.output).location(catalog.EVENTS)); "
        "print(sorted(e.name for e in entry_points(group='console_scripts') if e.dist.name == 'email-personalization'))"
    )
    # -S: no site hooks, so the repository's editable install cannot stand in for the wheel.
    done = subprocess.run([sys.executable, "-S", "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": f"{target}:{site_packages}", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    module_file, location, scripts = done.stdout.splitlines()
    assert module_file.startswith(str(target))
    assert location == "main.email_personalization.events"
    assert set(eval(scripts)) == set(project_scripts())  # noqa: S307 - our own printed list
