# pgwarden: a PostgreSQL proxy that watches for bulk reads of customer data.
#
#   docker build -t pgwarden .
#   docker run -p 6432:6432 -p 9930:9930 -v ./pgwarden.yaml:/etc/pgwarden/pgwarden.yaml:ro \
#       pgwarden serve -c /etc/pgwarden/pgwarden.yaml --listen 0.0.0.0:6432 --admin 0.0.0.0:9930
#
# Multi-stage: wheels are built (pglast and uvloop compile C) in a builder image with the
# toolchain; the runtime image has only Python, the wheels and a non-root user.

FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY proxy ./proxy
COPY policy ./policy
COPY audit ./audit
COPY loadtests ./loadtests
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
RUN groupadd --system pgwarden \
 && useradd --system --gid pgwarden --home-dir /var/lib/pgwarden --create-home pgwarden
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config /etc/pgwarden/examples
USER pgwarden
WORKDIR /var/lib/pgwarden
EXPOSE 6432 9930
# /healthz answers while the process serves; the admin listener must be reachable in the
# container (--admin 0.0.0.0:9930 or admin_listen in the config).
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9930/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["pgwarden"]
CMD ["serve", "--listen", "0.0.0.0:6432", "--admin", "0.0.0.0:9930", "--upstream", "postgres:5432"]
