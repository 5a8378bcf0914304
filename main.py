"""Entry point the seed documents: `python main.py`, `uvicorn main:app`, gunicorn."""

from elaoms.app import create_app
from elaoms.config import get_settings

app = create_app()

if __name__ == "__main__":
    import uvicorn

    settings = get_settings()
    # Uvicorn's own X-Forwarded-For handling stays off: ELAOMS believes a proxy header only
    # when TRUSTED_PROXY_HEADER names it.
    uvicorn.run(
        "main:app", host=settings.host, port=settings.port, log_config=None, proxy_headers=False
    )
