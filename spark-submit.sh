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

delta_package="$(python -c 'from lib.session import DELTA_PACKAGE; print(DELTA_PACKAGE)')"
common=(
  --packages "$delta_package"
  --conf spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension
  --conf spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog
  --conf spark.sql.session.timeZone=UTC
  --conf spark.ui.showConsoleProgress=false
  --conf "spark.driver.extraJavaOptions=-Dlog4j2.configurationFile=file:$ROOT/conf/log4j2.properties"
  --conf "spark.pyspark.python=$PYSPARK_PYTHON"
  --py-files "$lib_zip"
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
