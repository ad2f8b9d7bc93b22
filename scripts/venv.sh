# Sourced by spark-submit.sh and test.sh: creates (once) and activates the project's virtual
# environment with the pinned dependencies, so a fresh clone needs nothing installed by hand.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
_python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
_stamp="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$_stamp" ]; then
  echo "bootstrapping $VENV (first use or pyproject.toml changed)" >&2
  [ -x "$VENV/bin/python" ] || "$_python" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[spark,dev,service,airflow,tracking]" >&2
  rm -f "$VENV"/.installed-*
  touch "$_stamp"
fi
# Workers must import the same packages as the driver.
export PYSPARK_PYTHON="$VENV/bin/python"
export PYSPARK_DRIVER_PYTHON="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
