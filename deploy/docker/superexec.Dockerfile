# The SuperExec image: Flower's, with metafed's dependencies installed once
# (the SuperLink runs with dependency installation off). It runs the ServerApp
# next to the SuperLink and the ClientApp next to each SuperNode.
# Build from the repository root: docker build -f deploy/docker/superexec.Dockerfile .
FROM flwr/superexec:1.42.0
WORKDIR /app
COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app client ./client
COPY --chown=app:app common ./common
COPY --chown=app:app server ./server
COPY --chown=app:app simulations ./simulations
# torch first, pinned: the CPU or CUDA build of this version, not the newest release.
RUN python -m pip install --no-cache-dir 'torch==2.13.*' && python -m pip install --no-cache-dir -e .
ENTRYPOINT ["flower-superexec"]
