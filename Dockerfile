# batchwire server (and trainer/loadtest, same image): docker compose up
#
#   docker build -t batchwire .                                     # CPU torch
#   docker build -t batchwire:cu126 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#   docker build -t batchwire:full --build-arg EXTRAS=examples,sources,ray .   # parquet/s3, Ray
#
# Worker processes hand finished batches over in /dev/shm: give the container
# room there (docker run --shm-size=1g; compose sets shm_size).
FROM python:3.11-slim

# Another torch: a version spec and the index that has it (CUDA builds, say).
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
# The package's extras to install (pyproject.toml): sources (parquet, s3://), ray, plot.
ARG EXTRAS="examples"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 batchwire
WORKDIR /app

# torch first, in its own layer: the largest, slowest step changes least often,
# and installing it first keeps pip from pulling a CUDA build for `torch>=`.
RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple "${TORCH_SPEC}"

# Only what the package, the examples and EXTRAS need (see .dockerignore).
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY core/ core/
COPY server/ server/
COPY client/ client/
RUN pip install ".[${EXTRAS}]"
COPY examples/ examples/

USER batchwire
EXPOSE 50051 9090
HEALTHCHECK --interval=5s --timeout=4s --start-period=60s --retries=3 \
    CMD ["batchwire", "health", "--target", "localhost:50051"]
CMD ["batchwire", "serve", "--config", "examples/digits.toml", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090"]
