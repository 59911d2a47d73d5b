#!/bin/sh
# Real Fashion-MNIST (MIT) for the offline demo and the tests: the Debian package dataset-fashion-mnist.
set -e
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/t10k-images-idx3-ubyte.gz" ] || [ -n "$BLOCKLORA_FASHION_MNIST" ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist, 31 MB)..."
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  exit 0
fi
echo "Fashion-MNIST is not installed: run 'sudo apt-get install dataset-fashion-mnist', or set" >&2
echo "BLOCKLORA_FASHION_MNIST to a folder holding the four *-ubyte.gz files (torchvision downloads them where a" >&2
echo "network exists: blocklora demo --root DIR fetches them)." >&2
exit 0
