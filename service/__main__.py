"""Start the API: ``python -m service [--warehouse DIR] [--host H] [--port P] [--workers N]``.

The flags set the matching environment variables (``--warehouse`` is ``RECS_WAREHOUSE``); every other
setting comes from the environment (service/settings.py). The settings are checked here, before
uvicorn starts, so a missing token or a bad value stops the start with one line naming the variable.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from service import settings as settings_mod


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="service/serve.sh", description="recommendations API")
    parser.add_argument("--warehouse", help="root of the Delta tables (RECS_WAREHOUSE; default warehouse)")
    parser.add_argument("--host", default=os.environ.get("RECS_HOST", "127.0.0.1"),
                        help="address to listen on (RECS_HOST; default 127.0.0.1, 0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("RECS_PORT", "8080")),
                        help="port (RECS_PORT; default 8080)")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("RECS_WORKERS", "1")),
                        help="uvicorn worker processes, each with its own copy of the tables (default 1)")
    parser.add_argument("--log-level", default=os.environ.get("RECS_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)
    if args.warehouse:
        os.environ["RECS_WAREHOUSE"] = os.path.abspath(args.warehouse)
    try:
        settings = settings_mod.from_env()
    except settings_mod.SettingsError as exc:
        print(f"service: cannot start: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.allow_no_auth:
        logging.getLogger("service").warning("RECS_ALLOW_NO_AUTH=1: serving WITHOUT authentication")
    import uvicorn

    uvicorn.run("service.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level=args.log_level, access_log=False, proxy_headers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
