# Squall: realtime event server (Tornado, Python 3.11).
#
#   docker build -t squall .
#   docker run --rm -p 8888:8888 squall
#
# Configure with SQUALL_* environment variables, e.g.
#   -e SQUALL_BROKER=redis://redis:6379/0 -e SQUALL_API_KEYS=... -e SQUALL_JWT_SECRET=...
FROM docker.io/library/python:3.11-slim

LABEL org.opencontainers.image.title="squall" \
      org.opencontainers.image.description="Realtime event server: publish over HTTP, subscribe over WebSocket." \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Unprivileged runtime user with a fixed uid/gid (for volume permissions and
# runAsNonRoot policies).
RUN groupadd --system --gid 10001 squall \
    && useradd --system --uid 10001 --gid squall --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin squall

# Dependencies first, so that code changes do not re-install them. Exact versions
# and hashes come from requirements.lock (regenerate: scripts/container/lock.sh).
COPY requirements.lock /tmp/requirements.lock
RUN python -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir --require-hashes -r /tmp/requirements.lock \
    && rm /tmp/requirements.lock

# The application source, owned by root and read-only for the runtime user.
WORKDIR /app
COPY . .
RUN python -m compileall -q /app

# Settings (see the README for all SQUALL_* variables). Listen on all
# interfaces inside the container; auth is off until SQUALL_API_KEYS or
# SQUALL_JWT_SECRET is set.
ENV SQUALL_HOST=0.0.0.0 \
    SQUALL_PORT=8888 \
    SQUALL_LOG_FORMAT=json

USER 10001:10001
EXPOSE 8888

# Liveness without curl: the standard library only, bypassing any HTTP proxy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % os.environ.get('SQUALL_PORT', '8888'), timeout=3)"]

# Squall shuts down gracefully on SIGTERM (closes WebSockets with 1001, exits 0).
STOPSIGNAL SIGTERM
CMD ["python", "run.py"]
