# The SuperLink on Flower's official image (the version pyproject.toml pins).
# Its ServerApp runs in the SuperExec container (superexec.Dockerfile).
FROM flwr/superlink:1.42.0
ENTRYPOINT ["flower-superlink", \
  "--ssl-ca-certfile", "/certs/ca.crt", "--ssl-certfile", "/certs/superlink.crt", "--ssl-keyfile", "/certs/superlink.key", \
  "--enable-supernode-auth", "--database", "/state/state.db", "--disable-runtime-dependency-installation", \
  "--isolation", "process", "--host", "0.0.0.0", "--port", "9093"]
