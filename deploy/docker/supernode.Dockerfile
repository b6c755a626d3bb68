# A site's SuperNode on Flower's official image; its ClientApp runs in a
# SuperExec container (superexec.Dockerfile) next to it.
FROM flwr/supernode:1.42.0
ENTRYPOINT ["flower-supernode", "--isolation", "process", "--root-certificates", "/certs/ca.crt", \
  "--auth-supernode-private-key", "/keys/site", "--node-config", "/site/site.toml"]
