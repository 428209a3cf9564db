#!/usr/bin/env bash
# Install the Fashion-MNIST IDX files from the Debian package `dataset-fashion-mnist`
# (-> /usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz).
# Idempotent and quiet. Never fails the caller: without apt or root it prints how to get the
# data instead (msq_hf then falls back to $MSQ_FASHION_MNIST_DIR, the Hub, or the sklearn digits).
set -u
PKG=dataset-fashion-mnist
DIR=/usr/share/datasets/fashion-mnist
FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"

have_files() {
  local d="$1" f
  [ -n "$d" ] || return 1
  for f in $FILES; do
    [ -f "$d/$f" ] || [ -f "$d/${f%.gz}" ] || return 1
  done
}

if have_files "${MSQ_FASHION_MNIST_DIR:-}"; then
  echo "[setup-data] Fashion-MNIST: using \$MSQ_FASHION_MNIST_DIR=${MSQ_FASHION_MNIST_DIR}"
  exit 0
fi
if have_files "$DIR"; then
  echo "[setup-data] Fashion-MNIST: present in $DIR"
  exit 0
fi

note() {
  echo "[setup-data] note: $1" >&2
  echo "[setup-data]   Fashion-MNIST is optional (tests skip, examples fall back to 'digits')." >&2
  echo "[setup-data]   To get it: (as root) apt-get install -y $PKG, or set MSQ_FASHION_MNIST_DIR to a" >&2
  echo "[setup-data]   directory with $FILES," >&2
  echo "[setup-data]   or allow Hub access (dataset id zalando-datasets/fashion_mnist)." >&2
}

if ! command -v apt-get >/dev/null 2>&1; then
  note "apt-get not available; not installing $PKG"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  note "not root; not installing $PKG"
  exit 0
fi

echo "[setup-data] installing $PKG with apt-get (about 30 MB)"
export DEBIAN_FRONTEND=noninteractive
# `apt-get update` only when the package is unknown to the local index (keeps re-runs fast).
if ! apt-cache show "$PKG" >/dev/null 2>&1; then
  apt-get update -qq >/dev/null 2>&1 || true
fi
if apt-get install -y -qq --no-install-recommends "$PKG" >/dev/null 2>&1 && have_files "$DIR"; then
  echo "[setup-data] Fashion-MNIST installed in $DIR"
else
  note "apt-get install $PKG failed (no network or package not in the configured suites)"
fi
exit 0
