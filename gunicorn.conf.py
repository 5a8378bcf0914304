"""Gunicorn settings picked up by `gunicorn main:app -w 4 -k uvicorn.workers.UvicornWorker`.

Binds where the service's own settings say (HOST/PORT from the environment, then `.env`,
default 0.0.0.0:8000), read through the same `Settings` as `python main.py` and
`elaoms serve`, so every documented way of starting the service listens on one address.
"""

import os
from typing import Any

from elaoms.config import Settings
from elaoms.operations.logs import install_masking

_settings = Settings()
bind = f"{_settings.host}:{_settings.port}"
worker_class = "uvicorn.workers.UvicornWorker"
# Post-call audio bodies run to tens of megabytes; give slow uploads time.
timeout = 120
graceful_timeout = 30

# Phone numbers are masked in every log record from the master's first line on; workers
# are forked from it and inherit the masking (the app installs it again, idempotently).
install_masking()


def child_exit(server: Any, worker: Any) -> None:
    # With multiprocess metrics, a dead worker's live gauges must stop counting.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
