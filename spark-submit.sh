#!/usr/bin/env bash
# Submit a job of this suite with the spark-submit that ships with the pinned pyspark.
#
#   ./spark-submit.sh [--master URL | --remote URL] [spark-submit options] jobs/<job>.py [job options]
#
# Local mode (local[*]) by default; --master spark://host:port (or yarn, k8s://...) for a cluster;
# --remote URL (e.g. local[2] or sc://host:15002) runs the job over Spark Connect. Adds the Delta
# package, the Delta SQL settings and the `lib` package (as a zip for executors). On first use it
# creates .venv with the pinned dependencies.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/venv.sh"

master="local[*]"
remote=""
submit_args=()
job_args=()
job=""
while [ $# -gt 0 ]; do
  if [ -z "$job" ]; then
    case "$1" in
      --master) master="$2"; shift 2; continue ;;
      --remote) remote="$2"; shift 2; continue ;;
      *.py) job="$1"; shift; continue ;;
      *) submit_args+=("$1"); shift; continue ;;
    esac
  fi
  job_args+=("$1"); shift
done
if [ -z "$job" ]; then
  echo "usage: $0 [--master URL | --remote URL] [spark-submit options] jobs/<job>.py [--conf FILE] [--set key=value ...]" >&2
  exit 2
fi

# Executors on a cluster import lib from this archive. It is named by a hash of the sources, so it is
# never stale and a job running from this checkout never sees it rewritten by a later submit.
lib_zip="$(python - "$ROOT" <<'PY'
import hashlib, os, pathlib, sys, tempfile, zipfile
root = pathlib.Path(sys.argv[1])
sources = sorted((root / "lib").rglob("*.py"))
digest = hashlib.sha256()
for path in sources:
    digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
target = root / "dist" / f"lib-{digest.hexdigest()[:12]}" / "lib.zip"
if not target.exists():
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".zip")
    with os.fdopen(handle, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sources:
            archive.write(path, path.relative_to(root))
    os.replace(temporary, target)
print(target)
PY
)"

delta_package="$(python -c 'from lib.platform.session import DELTA_PACKAGE; print(DELTA_PACKAGE)')"

# Heap sizes ([spark] driver_memory / executor_memory after the job's --conf files and --set
# overrides, resolved by lib.platform.settings) must reach the JVM before it starts; an option given here
# (--driver-memory 8g, --conf spark.driver.memory=8g) wins.
given() {
  local arg
  for arg in ${submit_args[@]+"${submit_args[@]}"}; do
    case "$arg" in "$1" | "$1="* | "$2="*) return 0 ;; esac
  done
  return 1
}
memory_args=()
while read -r option value; do
  case "$option" in
    --driver-memory) given --driver-memory spark.driver.memory || memory_args+=("$option" "$value") ;;
    --executor-memory) given --executor-memory spark.executor.memory || memory_args+=("$option" "$value") ;;
  esac
done < <(python -c 'import sys; from jobs.common import submit_options; o = submit_options(sys.argv[1:])
print("\n".join(f"{name} {value}" for name, value in zip(o[::2], o[1::2])))' ${job_args[@]+"${job_args[@]}"})
# Local mode (executors inside the driver's JVM): lib.platform.session.LOCAL_CONF, so that a task's
# OutOfMemoryError fails the stage, which is then rolled back and recorded, instead of exiting the JVM.
local_conf=()
case "${remote:-$master}" in
  local*)
    while read -r pair; do local_conf+=(--conf "$pair"); done < <(python -c '
from lib.platform.session import LOCAL_CONF
print("\n".join(f"{key}={value}" for key, value in LOCAL_CONF.items()))') ;;
esac
common=(
  --packages "$delta_package"
  --conf spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension
  --conf spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog
  --conf spark.sql.session.timeZone=UTC
  --conf spark.ui.showConsoleProgress=false
  --conf "spark.driver.extraJavaOptions=-Dlog4j2.configurationFile=file:$ROOT/conf/log4j2.properties"
  --conf "spark.pyspark.python=$PYSPARK_PYTHON"
  --py-files "$lib_zip"
  ${memory_args[@]+"${memory_args[@]}"}
  ${local_conf[@]+"${local_conf[@]}"}
)
if [ -n "$remote" ]; then
  # pyspark 4.2's `spark-submit --remote` builds a client-only classpath, so the local Connect
  # server it should start fails (SparkConnectPlugin, then classic SparkSession, not found).
  # Instead the job runs as a plain Python client with SPARK_REMOTE: for local[...] pyspark
  # starts the server in a JVM launched with PYSPARK_SUBMIT_ARGS (Delta, confs, lib.zip).
  case "$remote" in
    local*)
      printf -v PYSPARK_SUBMIT_ARGS '%q ' "${common[@]}" ${submit_args[@]+"${submit_args[@]}"}
      export PYSPARK_SUBMIT_ARGS="${PYSPARK_SUBMIT_ARGS}pyspark-shell" ;;
    *)
      if [ ${#submit_args[@]} -gt 0 ]; then
        echo "spark-submit options (${submit_args[*]}) do not reach a running Connect server ($remote);" \
             "configure the server instead" >&2
        exit 2
      fi ;;
  esac
  export SPARK_REMOTE="$remote"
  exec python "$job" ${job_args[@]+"${job_args[@]}"}
fi
exec spark-submit --master "$master" "${common[@]}" ${submit_args[@]+"${submit_args[@]}"} "$job" ${job_args[@]+"${job_args[@]}"}
