# mailgun-sync: one image for the daemon, the CronJob run, the backfill and migrations.
# Build: docker build -t mailgun-sync .

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/mailgun-sync
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY worker ./worker
COPY sql ./sql
# pip and setuptools only install: the image runs without them (a third of the venv's size).
RUN /opt/mailgun-sync/bin/pip install -c constraints.txt . \
    && /opt/mailgun-sync/bin/pip uninstall --yes pip setuptools

FROM python:3.11-slim
# The user and group the Kubernetes manifests name (runAsUser, runAsGroup, fsGroup).
RUN groupadd --gid 10001 mailgun-sync \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin mailgun-sync
COPY --from=build /opt/mailgun-sync /opt/mailgun-sync
ENV PATH=/opt/mailgun-sync/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HTTP_PORT=8080
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['HTTP_PORT'] + '/healthz', timeout=2)"]
ENTRYPOINT ["mailgun-sync"]
CMD ["daemon"]
