# The bpfexec server. Configure it with BPFEXEC_* variables (one per
# `bpfexec serve --help` flag), e.g. `docker run -e BPFEXEC_MAX_FUEL=1000000 ...`.
# BPFEXEC_WORKERS=N runs N server processes on the port (needs a writable /tmp
# for their shared metrics). Deployment: docs/deploy.md.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY bpfexec ./bpfexec
COPY vm ./vm
COPY server ./server
COPY client ./client
# With the JIT (llvmlite): without it every module runs on the interpreter, 10-100x
# slower. The server's start-up line names the engine it runs.
RUN pip install ".[jit]" && rm -rf /src

RUN useradd --system --uid 10001 --no-create-home bpfexec
USER bpfexec
WORKDIR /home/bpfexec

ENV BPFEXEC_PORT=50051 \
    BPFEXEC_METRICS_PORT=9090
EXPOSE 50051 9090

# `bpfexec health` checks localhost on $BPFEXEC_PORT and exits 0 only when SERVING.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["bpfexec", "health", "--timeout", "4"]

# Listen on every interface inside the container; SIGTERM (docker stop) lets
# in-flight executions finish within BPFEXEC_GRACE_PERIOD seconds.
CMD ["bpfexec", "serve", "--host", "0.0.0.0"]
