"""Gunicorn settings picked up by `gunicorn main:app -w 4 -k uvicorn.workers.UvicornWorker`.

Binds where the service's own settings say (HOST/PORT, default 0.0.0.0:8000) so every
documented way of starting the service listens on the same address.
"""

import os

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
worker_class = "uvicorn.workers.UvicornWorker"
# Post-call audio bodies run to tens of megabytes; give slow uploads time.
timeout = 120
graceful_timeout = 30

# Phone numbers are masked in every log record from the master's first line on; workers
# are forked from it and inherit the masking (the app installs it again, idempotently).
from elaoms.operations.logs import install_masking  # noqa: E402

install_masking()
