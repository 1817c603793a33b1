# pgwarden: a PostgreSQL proxy that watches for bulk reads of customer data.
#
#   docker build -t pgwarden .
#   docker run -p 6432:6432 -p 9930:9930 -v ./pgwarden.yaml:/etc/pgwarden/pgwarden.yaml:ro \
#       pgwarden serve -c /etc/pgwarden/pgwarden.yaml --listen 0.0.0.0:6432 --admin 0.0.0.0:9930
#
# Multi-stage: pgwarden and its dependencies are installed into a virtualenv (/opt/pgwarden)
# in a builder image that has a C toolchain (pglast, uvloop, asyncpg... ship wheels for
# x86_64/aarch64; elsewhere they compile); the runtime image gets only that virtualenv and
# a non-root user.  A virtualenv rather than the system site-packages, so the same file
# works on the official python image and on a Debian python3 whose system Python is
# "externally managed" (PEP 668).

FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/pgwarden
ENV PATH=/opt/pgwarden/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY proxy ./proxy
COPY policy ./policy
COPY audit ./audit
RUN pip install --no-cache-dir --disable-pip-version-check . \
 && pgwarden --help >/dev/null

FROM python:3.11-slim-bookworm
# /var/lib/pgwarden is the state directory (SQLite audit trail, ledger key): owned by the
# user, private, and without /etc/skel's dotfiles (a named volume mounted there is seeded
# from it).
RUN groupadd --system pgwarden \
 && useradd --system --gid pgwarden --home-dir /var/lib/pgwarden --no-create-home \
      --shell /usr/sbin/nologin pgwarden \
 && install -d -o pgwarden -g pgwarden -m 0750 /var/lib/pgwarden
COPY --from=build /opt/pgwarden /opt/pgwarden
ENV PATH=/opt/pgwarden/bin:$PATH \
    PGWARDEN_HEALTHCHECK_URL=http://127.0.0.1:9930/healthz
COPY config /etc/pgwarden/examples
USER pgwarden
WORKDIR /var/lib/pgwarden
EXPOSE 6432 9930
# /healthz answers while the process serves; the admin listener must be reachable in the
# container (--admin 0.0.0.0:9930 or admin_listen in the config).  With the admin listener
# elsewhere, set PGWARDEN_HEALTHCHECK_URL (docker run -e ...) to match.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os,sys,urllib.request; sys.exit(0 if urllib.request.urlopen(os.environ['PGWARDEN_HEALTHCHECK_URL'], timeout=2).status == 200 else 1)"]
ENTRYPOINT ["pgwarden"]
CMD ["serve", "--listen", "0.0.0.0:6432", "--admin", "0.0.0.0:9930", "--upstream", "postgres:5432"]
