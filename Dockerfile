# One image for both roles: `sfrelay serve` (the default) and `sfrelay worker`.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /srv/sfrelay
RUN pip install --no-cache-dir uv==0.13.9
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY app ./app
COPY workers ./workers
COPY wsdl ./wsdl
RUN uv sync --frozen --no-dev && useradd --system --uid 10001 --no-create-home sfrelay

USER sfrelay
EXPOSE 8000
ENV SFRELAY_HOST=0.0.0.0 SFRELAY_PORT=8000
HEALTHCHECK --interval=30s --timeout=5s \
  CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"
CMD ["sfrelay", "serve"]
